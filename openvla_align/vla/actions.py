"""OpenVLA's action tokens: the 256 bins on the top token ids, greedy batched decoding of them, un-normalisation.

One decoder serves every caller (``eval run``'s policy, the demo, the bench, the tests): the prompt rows as
``predict_action`` builds them, one multimodal prefill over the right-padded batch, then one single-token LLM step
per further token through the key/value cache, every step restricted to the action tokens (as the reference's
``AllowedTokensLogitsProcessor``), logits computed only where they are read (:class:`~.decoding.RowsHead`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import List, Optional, Sequence

import numpy as np
import torch

from .checkpoint import LoadedVLA, action_prompt
from .decoding import RowsHead, next_token_logits, preallocated_cache
from .layout import language_model, unwrap

N_BINS = 256
ACTION_DIM = 7


class ActionTokenizer:
    """OpenVLA's uniform 256-bin discretisation of actions in [-1, 1] onto the top 256 ids below ``vocab_size``."""

    def __init__(self, vocab_size: int, bins: int = N_BINS):
        self.vocab_size = vocab_size
        self.bins = np.linspace(-1, 1, bins)
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0
        self.action_token_begin_idx = vocab_size - (bins + 1)

    def encode(self, action: np.ndarray) -> List[int]:
        return (self.vocab_size - np.digitize(np.clip(action, -1.0, 1.0), self.bins)).tolist()

    def decode(self, token_ids: np.ndarray) -> np.ndarray:
        """Token ids -> normalised actions: bin ``clip(vocab_size - id - 1, 0, 254)`` of the 255 centres."""
        idx = np.clip(self.vocab_size - np.asarray(token_ids) - 1, 0, len(self.bin_centers) - 1)
        return self.bin_centers[idx]


def unnormalize_tokens(token_ids, vocab_size: int, q01, q99, mask) -> np.ndarray:
    """Action token ids (B, 7) -> un-normalised actions, as ``predict_action`` and the reference's wrapper compute
    them: the bin centre of each id, then q01/q99 on the masked dims."""
    normalized = ActionTokenizer(vocab_size).decode(token_ids)
    q01, q99 = np.asarray(q01, dtype=np.float64), np.asarray(q99, dtype=np.float64)
    return np.where(np.asarray(mask, dtype=bool), 0.5 * (normalized + 1) * (q99 - q01) + q01, normalized)


class ActionDecoder:
    """Greedy action tokens of a loaded VLA for a batch of prompt rows and pixel values.

    ``vocab_size`` is the unpadded vocabulary the action bins sit below (the model's ``vocab_size``, else the
    tokenizer's length). ``preallocate``: decode steps write into a preallocated key/value cache where the
    transformers release allows (:func:`~.decoding.preallocated_cache`), else the cache grows."""

    def __init__(self, loaded: LoadedVLA, n_tokens: int = ACTION_DIM, vocab_size: Optional[int] = None):
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {n_tokens}.")
        self.loaded = loaded
        self.n_tokens = n_tokens
        base = unwrap(loaded.model)
        self.vocab_size = int(vocab_size or getattr(base, "vocab_size", None) or len(loaded.tokenizer))
        self.first = self.vocab_size - N_BINS
        tok = loaded.tokenizer
        # predict_action appends Llama's "▁" (29871) to the prompt; so do the rows, when the vocabulary has it
        self.space_id = tok.convert_tokens_to_ids("▁") if "▁" in tok.get_vocab() else None
        self.preallocate = True

    def rows(self, instructions: Sequence[str]) -> List[List[int]]:
        """Token rows as ``predict_action`` builds them: BOS + the action prompt (instruction lower-cased) + "▁"."""
        rows = [self.loaded.tokenizer(action_prompt(str(i).lower())).input_ids for i in instructions]
        if self.space_id is not None:
            rows = [r if r[-1] == self.space_id else r + [self.space_id] for r in rows]
        return rows

    @torch.no_grad()
    def decode(self, rows: List[List[int]], pixel_values: torch.Tensor, *, kv_cache: bool = True) -> np.ndarray:
        """Greedy action token ids (B, n_tokens), each step restricted to the 256 action tokens. ``kv_cache=False``
        re-runs the whole multimodal forward per token (the reference; the same tokens)."""
        with self._eval():
            if kv_cache:
                return self._decode_cached(rows, pixel_values)
            generated: List[List[int]] = [[] for _ in rows]
            for _ in range(self.n_tokens):
                logits = next_token_logits(self.loaded, [r + g for r, g in zip(rows, generated)], pixel_values)
                for g, t in zip(generated, self._pick(logits).tolist()):
                    g.append(int(t))
            return np.asarray(generated)

    @torch.no_grad()
    def first_tokens(self, rows: List[List[int]], pixel_values: torch.Tensor) -> np.ndarray:
        """The first action token of each row from one multimodal prefill, without a cache or further steps: the
        floor any decoder of this policy pays (``bench --policy``)."""
        with self._eval():
            return self._prefill(rows, pixel_values, use_cache=False)[0].cpu().numpy()

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        """Argmax over the action tokens only: ids ``[vocab_size - 256, vocab_size)``."""
        return logits[:, self.first : self.vocab_size].float().argmax(-1) + self.first

    @contextmanager
    def _eval(self):
        was_training = self.loaded.model.training
        self.loaded.model.eval()
        try:
            yield
        finally:
            self.loaded.model.train(was_training)

    def _prefill(self, rows: List[List[int]], pixel_values: torch.Tensor, use_cache: bool):
        """One multimodal forward over the right-padded rows, logits only at each row's last prompt position and
        only for the 256 action tokens. Returns (first tokens, output, rows' lengths behind the visual tokens,
        padding mask, head)."""
        loaded = self.loaded
        ids, mask = loaded.pad(rows)
        lm = language_model(loaded.model)
        head = RowsHead(lm.lm_head, self.first, self.vocab_size)
        head.select(torch.tensor([len(r) - 1 for r in rows], device=ids.device), ids.shape[1])
        with head.installed(lm):
            out = loaded.model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, use_cache=use_cache)
        lengths = torch.tensor([len(r) + head.offset for r in rows], device=ids.device)
        return out.logits[:, -1].float().argmax(-1) + self.first, out, lengths, mask, head

    def _decode_cached(self, rows: List[List[int]], pixel_values: torch.Tensor) -> np.ndarray:
        """One multimodal prefill over the right-padded rows, then one single-token LLM step per further token.

        Each new token sits at cache index ``width + t`` for every row, with its row's true position id and an
        attention mask that hides the row's padding, so every row sees exactly what it would see alone."""
        token, out, lengths, mask, head = self._prefill(rows, pixel_values, use_cache=True)
        tokens = [token]
        offset, steps = head.offset, self.n_tokens - 1
        full_mask = torch.cat([mask[:, :1], torch.ones_like(mask[:, :1]).expand(-1, offset), mask[:, 1:]], dim=1)
        length = full_mask.shape[1]
        lm = language_model(self.loaded.model)
        cache = _cache(out)
        static = preallocated_cache(lm, cache, steps) if self.preallocate and steps else None
        if static is not None:  # steps write into buffers; the mask covers them, unwritten slots masked out
            cache, full_mask = static, torch.cat([full_mask, torch.zeros_like(full_mask[:, :steps])], dim=1)
        head.select(None)
        cache_arg = _cache_argument(lm)
        with head.installed(lm):
            for t in range(1, self.n_tokens):
                if static is not None:
                    full_mask[:, length + t - 1] = 1
                    where = {"cache_position": torch.tensor([length + t - 1], device=full_mask.device)}
                else:
                    full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], dim=1)
                    where = {}
                step = lm(
                    input_ids=tokens[-1][:, None],
                    attention_mask=full_mask,
                    position_ids=(lengths + t - 1)[:, None],
                    use_cache=True,
                    **{cache_arg: cache},
                    **where,
                )
                cache = static if static is not None else _cache(step)
                tokens.append(step.logits[:, -1].float().argmax(-1) + head.lo)
        return torch.stack(tokens, dim=1).cpu().numpy()


def _cache_argument(lm) -> str:
    """The LLM forward's name for the key/value cache: ``cache`` from transformers 5.x (``past_key_values`` is
    deprecated there, and removed in 5.40), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def _cache(out):
    """The LLM's key/value cache of a model output (``past_key_values``; ``cache`` in transformers >= 5)."""
    cache = getattr(out, "past_key_values", None)
    cache = cache if cache is not None else getattr(out, "cache", None)
    if cache is None:
        raise RuntimeError(f"{type(out).__name__} returned no key/value cache; decode with kv_cache=False.")
    return cache
