"""What a teacher is, as data: ``TeacherSpec``, the normalisation constants, and ``TeacherRequest`` (what a caller asks
of a teacher factory). Torch-free, so the registry and `openvla-align teachers` can list teachers without importing
a model."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Tuple

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
    input_size: Optional[int] = None  # a fixed native input size (VGGT: 518 px); None: the student grid x patch

    @property
    def where(self) -> str:
        """Where the loader looks for weights, as `openvla-align teachers` shows it."""
        if not self.sources:
            return self.weights_hint
        return " or ".join(s.describe() for s in self.sources) + ", or teacher_path=<file or snapshot dir>"

    def default_resolution(self, grid: Tuple[int, int] = STUDENT_GRID) -> int:
        """Square input size: the spec's fixed ``input_size``, else the one whose patch grid equals ``grid`` (the
        paper's 256 px for patch-16 teachers)."""
        return self.input_size or grid[0] * self.patch_size


@dataclass(frozen=True)
class TeacherRequest:
    """The keyword arguments of every teacher factory, defined once (in this order, for positional callers).

    The registry turns a factory call's keywords into one request and hands it to the family module's
    ``build(spec, request, **params)``; ``build_teacher`` passes the full request to third-party factories.
    """

    path: Optional[str] = None  # a weights file or snapshot directory; None: look in the spec's sources
    resolution: Optional[int] = None  # square input size; None: the one whose patch grid is ``grid``
    grid: Tuple[int, int] = STUDENT_GRID  # the student's token grid the features are resampled to
    allow_random: bool = False  # random weights, for smoke tests only (warns loudly; never with ``path``)
    trust_remote_code: bool = False  # permit running a checkpoint's own code (RADIO checkout, Theia remote code)
    arch: Optional[Mapping[str, Any]] = None  # architecture overrides (tiny random test models)

    @classmethod
    def from_kwargs(cls, teacher: str, kwargs: Mapping[str, Any]) -> "TeacherRequest":
        """The request of a factory call's keywords; unknown keywords are an error that names them."""
        unknown = sorted(set(kwargs) - set(REQUEST_FIELDS))
        if unknown:
            raise TypeError(
                f"Teacher {teacher!r} got unknown keyword arguments {unknown}; a teacher factory takes "
                f"{', '.join(REQUEST_FIELDS)}."
            )
        return cls(**kwargs)

    def kwargs(self) -> Dict[str, Any]:
        """The request as a factory call's keywords."""
        return {name: getattr(self, name) for name in REQUEST_FIELDS}


REQUEST_FIELDS: Tuple[str, ...] = tuple(f.name for f in fields(TeacherRequest))


@dataclass(frozen=True)
class CatalogEntry:
    """A teacher registered as data: its spec, and the family module (imported on first use) whose
    ``build(spec, request, **params)`` builds it. A plugin module lists these in ``TEACHERS``."""

    spec: TeacherSpec
    module: str
    params: Mapping[str, Any] = field(default_factory=dict)


def checked_arch(teacher: str, arch: Optional[Mapping[str, Any]], allowed: Tuple[str, ...]) -> Dict[str, Any]:
    """``arch`` overrides as a dict, or a clear error naming keys a teacher family does not take."""
    arch = dict(arch or {})
    bad = sorted(set(arch) - set(allowed))
    if bad:
        raise ValueError(f"Teacher {teacher!r}: unknown arch keys {bad}; allowed: {list(allowed)}.")
    return arch
