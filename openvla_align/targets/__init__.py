"""Where the alignment targets come from: one interface, so the Aligner has one mode.

A *target source* has a ``name`` (for messages), a ``width`` (the teacher's feature width), a ``grid`` (the token grid
its targets are on, or None when unknown) and ``targets(pixel_values) -> (N, T, width)`` for OpenVLA ``pixel_values``
holding one image per row. A source with ``multi_view = True`` (a multi-view teacher's) is called as
``targets(pixel_values, views=V)``, V consecutive rows being one sample's cameras, and returns (N / V, V * T, width).
Three implement it:

- ``LiveTeacher``: runs a frozen ``Teacher`` on the batch (the paper's setup);
- ``TeacherCache`` (``targets.cache``): reads the targets a teacher wrote ahead of time (``cache build``; keys hashed
  from the pixels, ``targets.frame_keys``);
- ``FixedTargets``: only a width (and grid), for projectors restored without their teacher; its targets are passed
  to the Aligner directly.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch

from ..dtypes import torch_dtype
from ..teachers import Teacher
from ..vla.pixels import rgb_from_pixel_values

logger = logging.getLogger(__name__)


class LiveTeacher:
    """A frozen teacher run on each batch, on the VLA's device (``place``), in the configured dtype. A multi-view
    teacher gets each sample's images together (``views`` per sample)."""

    def __init__(self, teacher: Teacher):
        self.teacher = teacher
        self.device = next(teacher.parameters(), torch.empty(0)).device  # where it runs; `place` moves it
        self.input = None  # inputs.TeacherInput; None: the reference's (``configure`` sets the run's)

    def configure(self, config) -> None:
        """The run's teacher input, pooling and position embedding (an ``AlignConfig``)."""
        from .inputs import configure_teacher, get_teacher_input

        self.input = get_teacher_input(config.teacher_input)
        configure_teacher(self.teacher, config)

    @property
    def multi_view(self) -> bool:
        return bool(getattr(self.teacher, "multi_view", False))

    @property
    def name(self) -> str:
        return f"teacher {self.teacher.spec.name}"

    @property
    def width(self) -> int:
        return self.teacher.width

    @property
    def grid(self) -> Optional[Tuple[int, int]]:
        return tuple(self.teacher.grid)

    def place(self, device: torch.device, dtype: Optional[str] = None) -> None:
        self.teacher.to(device)
        self.device = torch.device(device)
        if dtype is not None:
            self.teacher.to(torch_dtype(dtype))

    def targets(self, pixel_values: torch.Tensor, views: int = 1) -> torch.Tensor:
        """(B * views, T, D) targets of one image per row (``views`` consecutive rows are one sample's cameras); a
        multi-view teacher returns the same tokens as (B, views * T, D)."""
        pixel_values = pixel_values.to(self.device)
        rgb = self.input.rgb(pixel_values) if self.input is not None else rgb_from_pixel_values(pixel_values)
        if self.multi_view:
            if rgb.shape[0] % views:
                raise ValueError(f"{rgb.shape[0]} images are not whole samples of {views} cameras each.")
            rgb = rgb.view(rgb.shape[0] // views, views, *rgb.shape[1:])
        with torch.inference_mode():  # no autograd bookkeeping at all for the frozen teacher
            targets = self.teacher(rgb)  # cast to its dtype inside
        # Inference tensors cannot be saved for the loss's backward: one (B, N, D) copy, a few MB at 7B scale.
        return targets.clone()


class FixedTargets:
    """A width (and grid) without a teacher: the caller passes each batch's targets."""

    def __init__(self, width: int, grid: Optional[Tuple[int, int]] = None):
        self.width = int(width)
        self.grid = tuple(grid) if grid is not None else None
        self.name = "the given targets"

    def targets(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("This Aligner has no teacher; pass precomputed `targets`.")


def as_source(source=None, *, target_width: Optional[int] = None, target_grid=None):
    """A target source from what callers pass: a Teacher, a source, or a width (and grid) for precomputed targets."""
    if source is not None and target_width is not None:
        raise ValueError("Give a teacher/target source or target_width, not both.")
    if isinstance(source, Teacher):
        return LiveTeacher(source)
    if source is not None:
        missing = [a for a in ("name", "width", "grid", "targets") if not hasattr(source, a)]
        if missing:
            raise TypeError(f"{type(source).__name__} is not a target source: it lacks {missing}.")
        return source
    if target_width is not None:
        return FixedTargets(target_width, target_grid)
    return None
