"""``demo-scenes``: a small convolutional patch encoder, the teacher of `openvla-align demo`.

A real registered teacher (same ``Teacher`` contract, weights loaded from a file by this factory) whose weights the
demo trains on its generated scenes in a few seconds (``openvla_align.demo.teacher``): the demo's stand-in for
C-RADIOv3, a frozen encoder whose patch features carry the visual concepts the VLA should keep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn as nn

from .base import Teacher, wants_random
from .spec import TeacherSpec, TeacherWeightsNotFound

HIDDEN = 64


class SceneTeacher(Teacher):
    """Patch embedding + learned position map, then two 3x3 convolutions (each patch sees its neighbours)."""

    def __init__(self, spec: TeacherSpec, resolution: Optional[int] = None, grid: Tuple[int, int] = (8, 8)):
        super().__init__(spec, resolution, grid)
        patch = spec.patch_size
        self.embed = nn.Conv2d(3, HIDDEN, patch, patch)
        side = self.resolution // patch
        self.pos = nn.Parameter(torch.randn(1, HIDDEN, side, side) * 0.5)
        self.mix = nn.Sequential(
            nn.GELU(), nn.Conv2d(HIDDEN, HIDDEN, 3, padding=1), nn.GELU(), nn.Conv2d(HIDDEN, spec.width, 3, padding=1)
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pixels -> (B, width, h, w) feature map (with gradients: the demo trains through this)."""
        return self.mix(self.embed(x) + self.pos)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x).flatten(2).transpose(1, 2)


def teacher_factory(spec: TeacherSpec, **_params):
    """The registry's factory for ``demo-scenes``: weights from ``path`` (written by `openvla-align demo`)."""

    def build(
        path=None, resolution=None, grid=(8, 8), allow_random: bool = False, trust_remote_code: bool = False, arch=None
    ) -> SceneTeacher:
        if arch:
            raise ValueError(f"Teacher {spec.name!r} has one architecture; arch={arch!r} is not supported.")
        teacher = SceneTeacher(spec, resolution, grid)
        if wants_random(spec.name, path, allow_random):
            return teacher.freeze()
        if path is None or not Path(path).is_file():
            raise TeacherWeightsNotFound(
                f"Teacher {spec.name!r} needs teacher_path=<file>: the safetensors file `openvla-align demo` writes "
                f"to OUT/teacher/model.safetensors (got {path!r})."
            )
        from safetensors.torch import load_file

        try:
            teacher.load_state_dict(load_file(str(path)))
        except Exception as exc:  # a truncated file, another model's weights, ...
            raise ValueError(
                f"Teacher {spec.name!r}: {path} does not hold its weights ({type(exc).__name__}: {exc}). "
                "Run `openvla-align demo` again to write them."
            ) from None
        return teacher.freeze()

    return build
