"""What a teacher is, as data: ``TeacherSpec`` and the normalisation constants. Torch-free, so the registry and
`openvla-align teachers` can list teachers without importing a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

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
