"""What a teacher is, as data: ``TeacherSpec`` and the normalisation constants. Torch-free, so the registry and
`openvla-align teachers` can list teachers without importing a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from ..norms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD  # noqa: F401

STUDENT_GRID = (16, 16)  # OpenVLA-7B: 224 px at patch 14


class TeacherWeightsNotFound(FileNotFoundError):
    """Teacher weights are not on disk and nothing may be downloaded."""


@dataclass(frozen=True)
class WeightSource:
    """One place on local disk where a teacher's weights may be, with the file names accepted there (in order):
    the HF cache snapshots of ``repo`` (newest first), a fixed ``directory``, or, with neither, the torch.hub
    checkpoint directory. ``teachers._weights.resolve_weights`` searches a spec's sources in order."""

    files: Tuple[str, ...]
    repo: Optional[str] = None
    directory: Optional[str] = None

    def describe(self) -> str:
        if self.repo:
            return f"HF cache {self.repo}/{self.files[0]}"
        if self.directory:
            return f"{self.directory}/{self.files[0]}"
        return f"<torch.hub dir>/checkpoints/{self.files[0]}"


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
    weights_hint: str = ""  # where weights come from, for a teacher without ``sources`` (shown by `teachers`)
    normalized_inside: bool = False  # True when the model applies mean/std itself (RADIO's input conditioner)
    sources: Tuple[WeightSource, ...] = ()  # where its weights may be on local disk, searched in order

    @property
    def where(self) -> str:
        """Where the loader looks for weights, as `openvla-align teachers` shows it."""
        if not self.sources:
            return self.weights_hint
        return " or ".join(s.describe() for s in self.sources) + ", or teacher_path=<file or snapshot dir>"

    def default_resolution(self, grid: Tuple[int, int] = STUDENT_GRID) -> int:
        """Square input size whose patch grid equals ``grid`` (the paper's 256 px for patch-16 teachers)."""
        return grid[0] * self.patch_size
