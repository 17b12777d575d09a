"""Poolings: how a teacher's native patch grid is brought onto the student's token grid, one registered name each.

A pooling takes (B, h*w, D) features on the ``src`` grid and returns (B, H*W, D) on the ``dst`` grid, with an optional
2D sin/cos embedding of the patches' (u, v) coordinates added first, scaled by ``pos_embed`` (0 adds nothing):

- ``resample`` (default; BlindVLA's teachers): the feature map is resized as an image would be, bilinear with
  ``align_corners=False`` and antialiasing when shrinking; identical grids are returned untouched.
- ``bilinear-corners`` (Spatial Forcing's ``custom_pooling``): bilinear with ``align_corners=True``, no antialiasing,
  corner patches mapped onto corner tokens.

The (u, v) embedding is VGGT's: coordinates on a grid spanning the image's aspect ratio normalised by its diagonal,
``u`` and ``v`` each embedded by sin/cos at frequencies ``100 ** (-k / (D/4))``, then [sin u, cos u, sin v, cos v].
Spatial Forcing adds it × 0.1 before pooling (``--align.pooling_pos_embed 0.1``).
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F

Grid = Tuple[int, int]


def _as_map(feats: torch.Tensor, src: Grid) -> torch.Tensor:
    b, n, d = feats.shape
    if n != src[0] * src[1]:
        raise ValueError(f"Teacher produced {n} tokens, which is not a {src[0]}x{src[1]} grid.")
    return feats.transpose(1, 2).reshape(b, d, src[0], src[1])


def uv_embedding(height: int, width: int, dim: int, aspect: float, device=None) -> torch.Tensor:
    """(dim, height, width) sin/cos embedding of a ``height`` x ``width`` patch grid's (u, v) coordinates (float32)."""
    if dim % 4:
        raise ValueError(f"A (u, v) sin/cos embedding needs a width divisible by 4; the teacher has {dim}.")
    diag = (aspect**2 + 1.0) ** 0.5
    span_u, span_v = aspect / diag, 1.0 / diag
    u = torch.linspace(-span_u * (width - 1) / width, span_u * (width - 1) / width, width, device=device)
    v = torch.linspace(-span_v * (height - 1) / height, span_v * (height - 1) / height, height, device=device)
    vv, uu = torch.meshgrid(v, u, indexing="ij")  # (height, width) each
    quarter = dim // 4
    omega = 1.0 / 100.0 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)

    def sincos(pos: torch.Tensor) -> torch.Tensor:
        angle = pos.reshape(-1, 1).double() * omega  # (h*w, dim/4)
        return torch.cat([angle.sin(), angle.cos()], dim=1).float()

    emb = torch.cat([sincos(uu), sincos(vv)], dim=1)  # (h*w, dim)
    return emb.T.reshape(dim, height, width)


def _with_pos_embed(fmap: torch.Tensor, pos_embed: float, aspect: float) -> torch.Tensor:
    if not pos_embed:
        return fmap
    _, d, h, w = fmap.shape
    return fmap + pos_embed * uv_embedding(h, w, d, aspect, fmap.device).to(fmap.dtype)


def resample(feats: torch.Tensor, src: Grid, dst: Grid, *, pos_embed: float = 0.0, aspect: float = 1.0) -> torch.Tensor:
    """Bilinear resize of the feature map (``align_corners=False``, antialiased when shrinking)."""
    if tuple(src) == tuple(dst) and not pos_embed:
        return feats
    fmap = _with_pos_embed(_as_map(feats, src), pos_embed, aspect)
    if tuple(src) != tuple(dst):
        shrink = dst[0] < src[0] or dst[1] < src[1]
        fmap = F.interpolate(fmap.float(), size=tuple(dst), mode="bilinear", align_corners=False, antialias=shrink)
    return fmap.to(feats.dtype).flatten(2).transpose(1, 2)


def bilinear_corners(
    feats: torch.Tensor, src: Grid, dst: Grid, *, pos_embed: float = 0.0, aspect: float = 1.0
) -> torch.Tensor:
    """Bilinear resize with ``align_corners=True`` and no antialiasing (Spatial Forcing's pooling)."""
    fmap = _with_pos_embed(_as_map(feats, src), pos_embed, aspect)
    if tuple(src) != tuple(dst):
        fmap = F.interpolate(fmap, size=tuple(dst), mode="bilinear", align_corners=True)
    return fmap.flatten(2).transpose(1, 2)


Pooling = Callable[..., torch.Tensor]
POOLINGS: Dict[str, Pooling] = {"resample": resample, "bilinear-corners": bilinear_corners}


def get_pooling(name: str) -> Pooling:
    if name not in POOLINGS:
        raise ValueError(f"Unknown pooling {name!r}; known: {', '.join(POOLINGS)}.")
    return POOLINGS[name]
