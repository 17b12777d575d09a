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

from .. import pooling
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
    antialiasing when shrinking), exactly as an image would be; identical grids are returned untouched
    (``pooling.resample``, the default pooling).
    """
    return pooling.resample(feats, src, dst)


def resize_bilinear(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, R, R), bilinear (``align_corners=False``), as the reference feeds its teachers."""
    if tuple(images.shape[-2:]) == (resolution, resolution):
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)


def resize_bicubic_crop(images: torch.Tensor, resolution: int, multiple: int = 14) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, R, R) as VGGT's loader prepares images ("crop" mode, Spatial Forcing's input): bicubic
    (``align_corners=False``) to width R, the height kept to the aspect ratio and rounded to a multiple of
    ``multiple``, then the centre R rows."""
    h, w = images.shape[-2:]
    new_h = round(h * (resolution / w) / multiple) * multiple
    if new_h < resolution:
        raise ValueError(
            f"Images of {h}x{w} px are wider than tall: resized to width {resolution} they are {new_h} px high, too "
            f"few rows to crop a {resolution}x{resolution} square; use --align.teacher_input reference."
        )
    x = F.interpolate(images, size=(new_h, resolution), mode="bicubic", align_corners=False)
    top = (new_h - resolution) // 2
    return x[:, :, top : top + resolution, :]


class Teacher(nn.Module):
    """Base class. Subclasses set ``spec`` and implement ``_features(x_normalised) -> (B, h*w, D)``.

    A single-view teacher (the default) sees each image on its own: (B, 3, H, W) in, (B, T, D) out, T the student
    grid's tokens. A *multi-view* teacher (``multi_view = True``, e.g. VGGT, whose global attention mixes frames) sees
    a sample's V camera images together: (B, V, 3, H, W) in, (B, V * T, D) out in the VLA's token order (view 0's T
    tokens, then view 1's ...); its ``_features`` gets (B, V, 3, R, R) and returns (B * V, h*w, D). Every caller
    (the Aligner, the feature cache, the probes, the bench) asks ``multi_view`` and nothing else.

    Two choices are set per run, not per teacher (``teachers.build.teacher_from_config``): ``resize`` (how [0,1]
    images reach the teacher's input size; default bilinear) and ``pool`` / ``pool_pos_embed`` (how the native patch
    grid is brought onto the student's; ``pooling.POOLINGS``).
    """

    spec: TeacherSpec
    multi_view: bool = False

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
        self.resize = resize_bilinear
        self.pool = pooling.resample
        self.pool_pos_embed = 0.0
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
        x = self.resize(images, self.resolution)
        if not self.spec.normalized_inside:
            x = (x - self._mean.to(x.dtype)) / self._std.to(x.dtype)
        return x

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.parameters(), None)
        images = images.to(param.dtype if param is not None else images.dtype)
        if self.multi_view:
            if images.ndim != 5 or images.shape[2] != 3:
                raise ValueError(
                    f"Teacher {self.spec.name} takes a sample's cameras together: (B, V, 3, H, W) RGB in [0, 1]; got "
                    f"{tuple(images.shape)}."
                )
            b, v = images.shape[:2]
            x = self.preprocess(images.flatten(0, 1))
            feats = self._features(x.view(b, v, *x.shape[1:]))  # (b * v, h*w, D)
        else:
            b, v = images.shape[0], 1
            feats = self._features(self.preprocess(images))
        if feats.shape[-1] != self.spec.width:
            raise ValueError(
                f"Teacher {self.spec.name} returned width {feats.shape[-1]}, expected {self.spec.width}; "
                "the weights do not belong to this teacher variant."
            )
        side = math.isqrt(feats.shape[1])
        src = self.native_grid if feats.shape[1] == self.native_grid[0] * self.native_grid[1] else (side, side)
        pooled = self.pool(feats, src, self.grid, pos_embed=self.pool_pos_embed, aspect=1.0)
        return pooled.reshape(b, v * pooled.shape[1], pooled.shape[2])
