"""The dense objective of the demo's vision pretraining and of its teacher: each patch says what covers it and where
it is."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

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
