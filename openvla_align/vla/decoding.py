"""Next-token logits of a loaded VLA over right-padded token rows: the one place that knows where OpenVLA's logits
sit once the visual tokens are inserted after BOS."""

from __future__ import annotations

from typing import Sequence

import torch

from .checkpoint import LoadedVLA


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


@torch.no_grad()
def next_token_logits(loaded: LoadedVLA, seqs: Sequence[Sequence[int]], pixel_values: torch.Tensor) -> torch.Tensor:
    """One multimodal forward over the right-padded token rows ``seqs`` (BOS included); returns each row's
    next-token logits ``(len(seqs), vocab)``, read at its last real token. The model inserts visual tokens after
    BOS, so text position ``j`` is logits position ``j + (logits length - padded text length)``."""
    ids, mask = loaded.pad(seqs)
    width = ids.shape[1]
    out = loaded.model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, use_cache=False)
    logits = _logits(out)
    offset = logits.shape[1] - width  # visual tokens inserted after BOS (0 for a text-only forward)
    last = torch.tensor([len(s) - 1 + offset for s in seqs], device=logits.device)
    return logits[torch.arange(len(seqs), device=logits.device), last]
