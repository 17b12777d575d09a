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
from .spec import TeacherRequest, TeacherSpec, TeacherWeightsNotFound

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


def save_scene_teacher(teacher: SceneTeacher, path) -> None:
    """Write ``teacher``'s weights to a safetensors file that also records its input resolution and native grid
    (header metadata), so every command loads it with only the path (atomic: a crash leaves no half-written file)."""
    from safetensors.torch import save

    from .._io import atomic_write_bytes

    side = teacher.native_grid
    metadata = {"teacher": teacher.spec.name, "resolution": str(teacher.resolution), "grid": f"{side[0]}x{side[1]}"}
    tensors = {k: v.detach().contiguous() for k, v in teacher.state_dict().items()}
    atomic_write_bytes(Path(path), save(tensors, metadata=metadata))


def saved_resolution(path) -> Optional[int]:
    """The input resolution a file written by :func:`save_scene_teacher` records (None: an older file, or none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            value = (f.metadata() or {}).get("resolution")
    except Exception:  # not a safetensors file: load_state_dict below says so
        return None
    return int(value) if value and value.isdigit() else None


def build(spec: TeacherSpec, request: TeacherRequest) -> SceneTeacher:
    """The registry's hook for ``demo-scenes``: weights from ``request.path`` (written by `openvla-align demo`), at
    the resolution the file records unless ``request.resolution`` is given."""
    path, resolution, grid = request.path, request.resolution, request.grid
    if request.arch:
        raise ValueError(f"Teacher {spec.name!r} has one architecture; arch={request.arch!r} is not supported.")
    if wants_random(spec.name, path, request.allow_random):
        return SceneTeacher(spec, resolution, grid).freeze()
    if path is None or not Path(path).is_file():
        raise TeacherWeightsNotFound(
            f"Teacher {spec.name!r} needs teacher_path=<file>: the safetensors file `openvla-align demo` writes "
            f"to OUT/teacher/model.safetensors (got {path!r})."
        )
    from safetensors.torch import load_file

    saved = saved_resolution(path)
    teacher = SceneTeacher(spec, resolution or saved, grid)
    try:
        teacher.load_state_dict(load_file(str(path)))
    except Exception as exc:  # a truncated file, another model's weights, another resolution ...
        if saved and resolution and resolution != saved:
            raise ValueError(
                f"Teacher {spec.name!r}: {path} was trained at resolution {saved}, not {resolution}; "
                "leave the teacher resolution unset (it is read from the file)."
            ) from None
        hint = (
            "" if saved else " If it was written by an older openvla-align, pass its resolution (112 for the demo's)."
        )
        raise ValueError(
            f"Teacher {spec.name!r}: {path} does not hold its weights ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}). Run `openvla-align demo` again to write them.{hint}"
        ) from None
    return teacher.freeze()
