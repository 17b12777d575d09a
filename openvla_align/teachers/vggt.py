"""The VGGT teacher ``vggt-1b``: features of VGGT-1B's aggregator (Meta, facebook/VGGT-1B), as Spatial Forcing aligns.

VGGT is multi-view: its global attention mixes a sample's frames, so the teacher takes all camera images of a sample
together, (B, V, 3, H, W), and returns (B, V * T, D) (``Teacher.multi_view``). A layer's feature is the channel
concatenation of that layer's frame- and global-attention outputs, 2 x 1024 = 2048 wide; the 5 prefix tokens (camera
and 4 registers) are dropped. The layer is selectable (``layer``, default -1 = the last, as Spatial Forcing); blocks
past it are not run. Input: 518 px by default (37 x 37 patches, VGGT's own size), not the student's grid times the
patch; the model normalises [0, 1] images with the ImageNet mean/std itself (``normalized_inside``).

Weights: VGGT's release file ``model.pt`` (a flat state dict of the whole VGGT, read with
``torch.load(weights_only=True)``), from ``teacher_path`` (the file, or a directory holding it) or else from the HF
cache snapshot of ``facebook/VGGT-1B``; nothing is downloaded. Only the ``aggregator.*`` entries are used; the heads'
(``HEAD_PREFIXES``) are ignored, and any other missing or unexpected key is an error. The network is
``vggt_model.VGGTAggregator``, written here in plain PyTorch.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ._weights import read_state_dict, resolve_weights
from .base import STUDENT_GRID, Teacher, TeacherSpec, TeacherWeightsNotFound, wants_random
from .spec import TeacherRequest, checked_arch
from .vggt_model import VGGT_IMG_SIZE, VGGTAggregator

logger = logging.getLogger(__name__)

__all__ = [
    "AGGREGATOR_PREFIX",
    "ARCH_KEYS",
    "DEFAULT_RESOLUTION",
    "HEAD_PREFIXES",
    "HUB_REPO",
    "WEIGHTS_FILE",
    "VGGTAggregator",
    "VGGTTeacher",
    "aggregator_state_dict",
    "build",
    "load_vggt_checkpoint",
]

WEIGHTS_FILE = "model.pt"
HUB_REPO = "facebook/VGGT-1B"
DEFAULT_RESOLUTION = VGGT_IMG_SIZE  # 518 px: 37 x 37 patches of 14
AGGREGATOR_PREFIX = "aggregator."
# The heads of the whole VGGT in model.pt; feature alignment does not use them.
HEAD_PREFIXES = ("camera_head.", "depth_head.", "point_head.", "track_head.")
# ``arch`` keys: VGGTAggregator's constructor arguments (tiny random test models; with weights they must match the
# file) and ``layer``, the feature layer (overrides the catalog's).
ARCH_KEYS = (
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "num_register_tokens",
    "patch_size",
    "img_size",
    "patch_embed_depth",
    "patch_embed_num_heads",
    "patch_embed_mlp_ratio",
    "rope_freq",
    "layer",
)
_SHOWN = 5  # keys named in an error


class VGGTTeacher(Teacher):
    """A multi-view teacher on ``VGGTAggregator``: ``_features`` maps (B, V, 3, R, R) to (B * V, (R/14)^2, 2 * D)."""

    multi_view = True

    def __init__(
        self,
        spec: TeacherSpec,
        model: VGGTAggregator,
        resolution: Optional[int] = None,
        grid: Tuple[int, int] = STUDENT_GRID,
        layer: int = -1,
    ):
        super().__init__(spec, resolution=resolution or DEFAULT_RESOLUTION, grid=grid)
        self.model = model
        model.layer_index(layer)  # refuse a layer the model does not have, now rather than at the first batch
        self.layer = int(layer)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x, self.layer)  # (B, V, P, 2D), prefix tokens first
        return out[:, :, self.model.patch_start_idx :].flatten(0, 1)


def load_vggt_checkpoint(path) -> Dict[str, torch.Tensor]:
    """Tensors of VGGT's ``model.pt`` (``torch.load(weights_only=True)``, memory-mapped when the file allows it, so
    the heads' tensors are never read), or of a ``.safetensors`` copy."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_state_dict(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format file (mmap needs one), or not a checkpoint at all: read it the plain way
        return read_state_dict(path)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (VGGT's model.pt is a flat state dict).")
    return obj


def _few(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:_SHOWN]) + (f" ... ({len(keys)} in all)" if len(keys) > _SHOWN else "")


def aggregator_state_dict(
    sd: Mapping[str, torch.Tensor], expected: Mapping[str, Any], what: str = "VGGT"
) -> Dict[str, torch.Tensor]:
    """The ``aggregator.*`` entries of a whole-VGGT state dict, prefix removed, in float32. ``expected``: the
    aggregator's own state dict (its keys). The heads' entries are ignored; every other difference is an error."""
    agg = {k[len(AGGREGATOR_PREFIX) :]: v for k, v in sd.items() if k.startswith(AGGREGATOR_PREFIX)}
    if not agg:
        raise ValueError(
            f"{what}: not a VGGT checkpoint: no '{AGGREGATOR_PREFIX}*' keys (found {_few(sd)}). Expected VGGT's "
            f"model.pt from {HUB_REPO}."
        )
    unexpected = [k for k in sd if not k.startswith(AGGREGATOR_PREFIX) and not k.startswith(HEAD_PREFIXES)]
    unexpected += [AGGREGATOR_PREFIX + k for k in agg if k not in expected]
    missing = [AGGREGATOR_PREFIX + k for k in expected if k not in agg]
    if missing or unexpected:
        raise ValueError(
            f"{what}: the checkpoint does not fit VGGT's aggregator: "
            + "; ".join(
                f"{kind} keys {_few(keys)}" for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys
            )
            + "."
        )
    return {k: (v.float() if v.is_floating_point() else v) for k, v in agg.items()}


def _find_weights(spec: TeacherSpec, path: Optional[str]) -> Path:
    try:
        return resolve_weights(spec.name, path, spec.sources)
    except TeacherWeightsNotFound as exc:
        raise TeacherWeightsNotFound(
            f"Teacher {spec.name!r} reads VGGT's release file {WEIGHTS_FILE} (the whole VGGT; only its aggregator is "
            f"used): {HUB_REPO} on the HF hub, https://huggingface.co/{HUB_REPO}/blob/main/{WEIGHTS_FILE}. Download "
            f"it where there is network and give its path: --align.teacher_path /path/to/{WEIGHTS_FILE} "
            f"(finetune.py), --teacher-path (openvla-align) or path= (Python).\n{exc}"
        ) from None


def build(spec: TeacherSpec, request: TeacherRequest, layer: int = -1) -> Teacher:
    """The registry's hook (see ``catalog``): the frozen VGGT teacher ``spec.name`` on feature layer ``layer``
    (``request.arch['layer']`` overrides it); see the module docstring."""
    # trust_remote_code only permits remote code; nothing of VGGT's runs here, so there is nothing to permit.
    arch = checked_arch(spec.name, request.arch, ARCH_KEYS)
    layer = int(arch.pop("layer", layer))
    random = wants_random(spec.name, request.path, request.allow_random)
    weights = None if random else _find_weights(spec, request.path)  # fail fast, before building a large model

    with torch.device("meta"):  # shapes only: checks arch, layer and resolution before anything is allocated
        shell = VGGTAggregator(**arch)
    spec = replace(
        spec,
        width=2 * shell.embed_dim,
        patch_size=shell.patch_size,
        num_prefix_tokens=shell.patch_start_idx,
    )
    teacher = VGGTTeacher(spec, shell, resolution=request.resolution, grid=request.grid, layer=layer)
    if weights is None:
        teacher.model = VGGTAggregator(**arch)
        return teacher.freeze()

    logger.info("Teacher %s: loading %s", spec.name, weights)
    what = f"Teacher {spec.name!r} ({weights})"
    state = aggregator_state_dict(load_vggt_checkpoint(weights), shell.state_dict(), what)
    try:
        shell.load_state_dict(state, strict=True, assign=True)  # the loaded tensors become the parameters
    except RuntimeError as exc:  # shapes: another architecture than arch (VGGT-1B by default)
        raise ValueError(f"{what}: the aggregator's shapes do not fit arch={arch or 'VGGT-1B'}: {exc}") from None
    return teacher.freeze()
