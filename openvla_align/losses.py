"""Alignment losses: pure functions of (student, target) -> (scalar, metrics). No coefficients here.

``student`` is the projected (B, N, D) student features, ``target`` the teacher's (B, N, D) patch features.
Metrics are detached tensors, so logging never forces a device sync inside the step.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F

LossOut = Tuple[torch.Tensor, Dict[str, torch.Tensor]]


def _check(student: torch.Tensor, target: torch.Tensor) -> None:
    if student.shape != target.shape:
        raise ValueError(
            f"Student features {tuple(student.shape)} and teacher targets {tuple(target.shape)} differ: the token "
            "grids (N) or widths (D) do not match. Check the teacher's grid/resolution and the projector width."
        )


def _cos(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (F.normalize(student.float(), dim=-1) * F.normalize(target.float(), dim=-1)).sum(-1)


def cosine_loss(student: torch.Tensor, target: torch.Tensor, **_) -> LossOut:
    """-mean over batch and tokens of cos(student_i, target_i) (the paper's L_align)."""
    _check(student, target)
    cos = _cos(student, target)
    return -cos.mean(), {"cos": cos.detach().mean()}


def one_minus_cosine_loss(student: torch.Tensor, target: torch.Tensor, **_) -> LossOut:
    """Spatial Forcing's: per sample 1 - mean over tokens of cos(student_i, target_i), averaged over the batch (the
    same gradient as ``cosine``; the value is 1 higher)."""
    _check(student, target)
    cos = _cos(student, target)
    return (1 - cos.mean(dim=1)).mean(), {"cos": cos.detach().mean()}


def l2_loss(student: torch.Tensor, target: torch.Tensor, **_) -> LossOut:
    """Mean squared error over batch, tokens and channels of the raw (unnormalised) features."""
    _check(student, target)
    loss = F.mse_loss(student.float(), target.float())
    return loss, {"cos": _cos(student, target).detach().mean()}


def ntxent_loss(student: torch.Tensor, target: torch.Tensor, temperature: float = 0.1, **_) -> LossOut:
    """Symmetric NT-Xent (InfoNCE) over all B*N tokens of the batch.

    Token i of the student and token i of the teacher (same image, same grid cell) are the positive pair; every
    other teacher token in the batch is a negative, and vice versa. Similarities are cosines over ``temperature``.
    """
    _check(student, target)
    s = F.normalize(student.float().flatten(0, 1), dim=-1)
    t = F.normalize(target.float().flatten(0, 1), dim=-1)
    logits = s @ t.T / temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    return loss, {"cos": (s * t).sum(-1).detach().mean()}


LOSSES: Dict[str, Callable[..., LossOut]] = {
    "cosine": cosine_loss,
    "one-minus-cosine": one_minus_cosine_loss,
    "l2": l2_loss,
    "ntxent": ntxent_loss,
}


def get_loss(name: str) -> Callable[..., LossOut]:
    if name not in LOSSES:
        raise ValueError(f"Unknown alignment loss {name!r}; known: {', '.join(LOSSES)}.")
    return LOSSES[name]
