"""The Teacher contract: [0,1] RGB in, (B, N, D) patch features on the student's token grid out.

A teacher owns its preprocessing (input size, normalisation, prefix tokens to drop) in ``TeacherSpec``; the
training loop never looks at teacher names. Teachers are frozen, in eval mode, and never receive gradients.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .spec import (  # noqa: F401  (re-exported: the Teacher contract's data half)
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SIGLIP_MEAN,
    SIGLIP_STD,
    STUDENT_GRID,
    TeacherSpec,
    TeacherWeightsNotFound,
)

logger = logging.getLogger(__name__)


def random_weights_warning(name: str) -> None:
    msg = (
        f"!!! Teacher {name!r} is built with RANDOM weights (allow_random=True). Its features are meaningless: "
        "use this only for smoke tests, never for training runs. !!!"
    )
    warnings.warn(msg, stacklevel=3)
    logger.warning(msg)


def wants_random(name: str, path, allow_random: bool) -> bool:
    """True when the caller asked for random weights (then warn loudly); weights are never looked up then."""
    if allow_random and path is not None:
        raise ValueError(
            f"Teacher {name!r}: teacher_path={path} and allow_random=True contradict each other; random weights are "
            "for smoke tests without any weights. Drop one of them."
        )
    if allow_random:
        random_weights_warning(name)
    return allow_random


def resample_grid(feats: torch.Tensor, src: Tuple[int, int], dst: Tuple[int, int]) -> torch.Tensor:
    """Resample (B, src_h*src_w, D) token features to the ``dst`` grid.

    The feature map is treated as a D-channel image and resized bilinearly (align_corners=False, with
    antialiasing when shrinking), exactly as an image would be; identical grids are returned untouched.
    """
    if tuple(src) == tuple(dst):
        return feats
    b, n, d = feats.shape
    if n != src[0] * src[1]:
        raise ValueError(f"Teacher produced {n} tokens, which is not a {src[0]}x{src[1]} grid.")
    fmap = feats.transpose(1, 2).reshape(b, d, src[0], src[1])
    shrink = dst[0] < src[0] or dst[1] < src[1]
    fmap = F.interpolate(fmap.float(), size=tuple(dst), mode="bilinear", align_corners=False, antialias=shrink)
    return fmap.to(feats.dtype).flatten(2).transpose(1, 2)


class Teacher(nn.Module):
    """Base class. Subclasses set ``spec`` and implement ``_features(x_normalised) -> (B, h*w, D)``."""

    spec: TeacherSpec

    def __init__(self, spec: TeacherSpec, resolution: Optional[int] = None, grid: Tuple[int, int] = STUDENT_GRID):
        super().__init__()
        self.spec = spec
        self.grid = tuple(grid)
        self.resolution = int(resolution or spec.default_resolution(self.grid))
        if self.resolution % spec.patch_size:
            raise ValueError(
                f"teacher_resolution={self.resolution} is not a multiple of {spec.name}'s patch size "
                f"{spec.patch_size}; use e.g. {spec.default_resolution(self.grid)}."
            )
        self.register_buffer("_mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    @property
    def width(self) -> int:
        return self.spec.width

    @property
    def native_grid(self) -> Tuple[int, int]:
        side = self.resolution // self.spec.patch_size
        return (side, side)

    def freeze(self) -> "Teacher":
        self.eval()
        self.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "Teacher":
        # A teacher never leaves eval mode (no dropout, no drop-path), even inside model.train().
        return super().train(False)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0,1] RGB (B,3,H,W) -> resized (bilinear, as the reference) and normalised model input."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Teacher {self.spec.name} expects (B, 3, H, W) RGB in [0, 1]; got {tuple(images.shape)}.")
        x = images
        if tuple(x.shape[-2:]) != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        if not self.spec.normalized_inside:
            x = (x - self._mean.to(x.dtype)) / self._std.to(x.dtype)
        return x

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.parameters(), None)
        x = self.preprocess(images.to(param.dtype if param is not None else images.dtype))
        feats = self._features(x)
        if feats.shape[-1] != self.spec.width:
            raise ValueError(
                f"Teacher {self.spec.name} returned width {feats.shape[-1]}, expected {self.spec.width}; "
                "the weights do not belong to this teacher variant."
            )
        side = math.isqrt(feats.shape[1])
        src = self.native_grid if feats.shape[1] == self.native_grid[0] * self.native_grid[1] else (side, side)
        return resample_grid(feats, src, self.grid)
