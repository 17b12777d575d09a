"""What a teacher is, as data: ``TeacherSpec`` and the normalisation constants. Torch-free, so the registry and
`openvla-align teachers` can list teachers without importing a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from ..norms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD  # noqa: F401

STUDENT_GRID = (16, 16)  # OpenVLA-7B: 224 px at patch 14


class TeacherWeightsNotFound(FileNotFoundError):
    """Teacher weights are not on disk and nothing may be downloaded."""


@dataclass(frozen=True)
class TeacherSpec:
    """What a teacher is and how it wants its pixels."""

    name: str
    family: str
    width: int
    patch_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    num_prefix_tokens: int
    weights_hint: str  # where the loader looks for weights, shown by `openvla-align teachers`
    normalized_inside: bool = False  # True when the model applies mean/std itself (RADIO's input conditioner)

    def default_resolution(self, grid: Tuple[int, int] = STUDENT_GRID) -> int:
        """Square input size whose patch grid equals ``grid`` (the paper's 256 px for patch-16 teachers)."""
        return grid[0] * self.patch_size
