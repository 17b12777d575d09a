"""The dense objective of the demo's vision pretraining and of its teacher, and the loop that fits it: each patch says
what covers it and where it is."""

from __future__ import annotations

from typing import Callable, Iterable, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

PATCH = 14


def patch_targets(cover: np.ndarray, n_classes: int, patch: int = PATCH) -> np.ndarray:
    """(H, W) class map -> (h, w, n_classes) fraction of each patch's pixels per class."""
    h, w = cover.shape[0] // patch, cover.shape[1] // patch
    onehot = np.eye(n_classes, dtype=np.float32)[cover[: h * patch, : w * patch]]
    return onehot.reshape(h, patch, w, patch, n_classes).mean((1, 3))


def dense_loss(logits: torch.Tensor, target: torch.Tensor, side: int) -> torch.Tensor:
    """(B, N, K + 2*side) logits of N = side**2 patches: soft cross-entropy to the K concept fractions plus
    cross-entropy of each patch's own row and column (so the features say what is where)."""
    k = target.shape[-1]
    concept = -(target * F.log_softmax(logits[..., :k], -1)).sum(-1).mean()
    pos = torch.arange(side * side, device=logits.device)
    rows = logits[..., k : k + side].flatten(0, 1)
    cols = logits[..., k + side :].flatten(0, 1)
    b = logits.shape[0]
    where = F.cross_entropy(rows, (pos // side).repeat(b)) + F.cross_entropy(cols, (pos % side).repeat(b))
    return concept + 0.5 * where


def fit_dense(
    encode: Callable[[torch.Tensor], torch.Tensor],
    params: Iterable[torch.nn.Parameter],
    scenes: Sequence,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    width: int,
    n_classes: int,
    steps: int,
    lr: float,
    seed: int,
    desc: str,
    batch_size: int = 32,
) -> List[float]:
    """Fit ``encode`` (``prepare``d images -> (B, N, width) patch features; ``params`` are its weights) and a
    throw-away linear head to ``dense_loss`` on the ``scenes``' pixel class maps; seeded, AdamW; returns the loss of
    every step. Batches are drawn and prepared one at a time (the whole set, prepared, would cost ~0.5 GB)."""
    from .scenes import images

    torch.manual_seed(seed)
    target = torch.from_numpy(np.stack([patch_targets(s.cover, n_classes).reshape(-1, n_classes) for s in scenes]))
    side = int(round(target.shape[1] ** 0.5))
    head = torch.nn.Linear(width, n_classes + 2 * side)
    opt = torch.optim.AdamW(list(params) + list(head.parameters()), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc=desc, unit="step", dynamic_ncols=True):
        idx = torch.randint(len(scenes), (batch_size,), generator=g)
        loss = dense_loss(head(encode(prepare(images([scenes[i] for i in idx])))), target[idx], side)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
