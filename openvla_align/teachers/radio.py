"""C-RADIOv3 teachers (NVIDIA RADIO, ViT-B/L/H/g at patch 16) in plain PyTorch.

The backbone is re-implemented here so that it runs without RADIO's code and on any timm (OpenVLA pins timm
0.9.10, which has no RADIO models): nothing below imports timm. What the network computes, in order:

1. input conditioner: ``(x - mean) / std`` on [0, 1] RGB, with the checkpoint's buffers (CLIP mean/std);
2. patchify: every 16x16 patch is flattened as (channel, row, column), patches in row-major order, and projected
   by a bias-free linear layer;
3. position embedding: RADIO's "CPE" grid of 128x128 entries (2048 px / 16) is resized bilinearly
   (``align_corners=False``, no antialias) to a square whose side is the larger side of the input grid, cropped
   to the input grid from the top-left corner, and added to the patch tokens only;
4. the checkpoint's prefix tokens (8 for C-RADIOv3: one summary token per distilled teacher plus registers) are
   prepended;
5. pre-norm transformer blocks (timm layout; layer scale for B and L), an optional final norm (absent in v3);
6. the prefix tokens are dropped and the optional feature normalizer ``(x - mean) @ tx.T`` is applied.

Weights come from RADIO's own release file (``c-radio_v3-b_half.pth.tar`` ...; keys ``base_model.*``,
``input_conditioner.*``, ``_feature_normalizer.*`` inside ``state_dict``), from an HF snapshot of
``nvidia/C-RADIOv3-*`` (``model.safetensors``; keys ``radio_model.model.*``, ``radio_model.input_conditioner.*``,
``radio_model.feature_normalizer.*``), or, with ``trust_remote_code=True``, from a local checkout of the RADIO
repository loaded through ``torch.hub`` (its own code then runs; the result is wrapped in the same Teacher API).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from ._weights import read_state_dict, resolve_weights
from .base import (
    STUDENT_GRID,
    Teacher,
    TeacherSpec,
    TeacherWeightsNotFound,
    wants_random,
)
from .radio_variants import RADIO_VARIANTS, RadioVariant
from .radio_vit import DEFAULT_ALIGN_CORNERS, NUM_PREFIX_TOKENS, PATCH_SIZE, POS_GRID, RadioViT  # noqa: F401
from .spec import TeacherRequest, WeightSource, checked_arch

logger = logging.getLogger(__name__)

__all__ = [
    "RADIO_VARIANTS",
    "RadioVariant",
    "RadioViT",
    "RadioTeacher",
    "RadioHubTeacher",
    "ARCH_KEYS",
    "load_radio_state_dict",
    "convert_radio_state_dict",
    "radio_vit_from_state_dict",
    "build_radio_teacher",
    "c_radio_v3_b",
    "c_radio_v3_l",
    "c_radio_v3_h",
    "c_radio_v3_g",
    "build",
]


# Keys `arch` may override. Everything but embed_dim/num_heads/align_corners must match a loaded checkpoint.
ARCH_KEYS = (
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_hidden_dim",
    "mlp_ratio",
    "layer_scale",
    "num_prefix_tokens",
    "pos_grid",
    "qkv_bias",
    "align_corners",
)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint reading and key conversion
# ----------------------------------------------------------------------------------------------------------------


def load_radio_state_dict(path) -> Dict[str, torch.Tensor]:
    """Raw tensors of a RADIO checkpoint: ``.pth.tar``/``.pth``, ``.safetensors`` or a sharded HF index."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except Exception as exc:
            raise ValueError(f"Cannot read the sharded-weights index {path} ({exc}).") from exc
        sd: Dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = path.parent / shard
            if not shard_path.is_file():
                raise TeacherWeightsNotFound(f"{path} lists the shard {shard}, which is missing from {path.parent}.")
            sd.update(read_state_dict(shard_path))
        return sd
    return read_state_dict(path)


def _source_prefixes(sd: Mapping[str, Any]) -> Tuple[str, str, str]:
    """(backbone, input conditioner, feature normalizer) key prefixes of a RADIO state dict."""
    keys = list(sd)
    if any(k.startswith("radio_model.model.") for k in keys):  # HF (trust_remote_code RADIOModel) layout
        return "radio_model.model.", "radio_model.input_conditioner.", "radio_model.feature_normalizer."
    if any(k.startswith("base_model.model.") for k in keys):
        return "base_model.model.", "input_conditioner.", "_feature_normalizer."
    if any(k.startswith("base_model.") for k in keys):  # torch.hub release file (hubconf.py)
        return "base_model.", "input_conditioner.", "_feature_normalizer."
    if "patch_generator.embedder.weight" in sd:  # bare backbone
        return "", "input_conditioner.", "_feature_normalizer."
    sample = ", ".join(keys[:5])
    raise ValueError(
        "This is not a RADIO checkpoint: expected keys like 'radio_model.model.patch_generator.embedder.weight' "
        f"(HF model.safetensors) or 'base_model.patch_generator.embedder.weight' (.pth.tar); found {sample} ..."
    )


_BLOCK_KEY = re.compile(
    r"blocks\.(\d+)\.(norm1\.(weight|bias)|norm2\.(weight|bias)|attn\.qkv\.(weight|bias)|attn\.proj\.(weight|bias)"
    r"|mlp\.fc1\.(weight|bias)|mlp\.fc2\.(weight|bias)|ls1\.(grandma|gamma)|ls2\.(grandma|gamma))$"
)
_PATCH_GEN = {
    "patch_generator.embedder.weight": "patch_embed.weight",
    "patch_generator.embedder.bias": "patch_embed.bias",
    "patch_generator.pos_embed": "pos_embed",
    "patch_generator.cls_token.token": "prefix_tokens",
    "patch_generator.patch_normalizer.weight": "patch_norm.weight",
    "patch_generator.patch_normalizer.bias": "patch_norm.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}
# Backbone entries RADIO keeps but never uses in its CPE forward (timm leftovers).
_UNUSED = re.compile(r"(reg_token|cls_token|fc_norm\..*|head\..*|attn_pool\..*)$")


def convert_radio_state_dict(sd: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """RADIO checkpoint tensors -> (``RadioViT`` state dict in float32, architecture read from the shapes).

    Raises ``ValueError`` for anything that is not a plain C-RADIO ViT (e.g. a training checkpoint whose weights
    are still spectrally reparametrised, or an unknown block layout).
    """
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    bb_prefix, cond_prefix, fn_prefix = _source_prefixes(sd)
    out: Dict[str, torch.Tensor] = {}
    unknown, unused = [], []
    for key, value in sd.items():
        if not key.startswith(bb_prefix) or (bb_prefix == "" and key.startswith((cond_prefix, fn_prefix))):
            continue
        k = key[len(bb_prefix) :]
        if k in _PATCH_GEN:
            out[_PATCH_GEN[k]] = value
        elif _BLOCK_KEY.match(k):
            out[re.sub(r"\.grandma$", ".gamma", k)] = value
        elif _UNUSED.match(k):
            unused.append(k)
        else:
            unknown.append(k)
    if any("parametrizations" in k for k in unknown):
        raise ValueError(
            "This RADIO checkpoint still has spectrally reparametrised weights (keys '...parametrizations...'): "
            "it is a training checkpoint, not a release. Use the released .pth.tar or the HF model.safetensors."
        )
    if unknown:
        raise ValueError(
            f"Unsupported RADIO backbone: unexpected keys {unknown[:6]}{' ...' if len(unknown) > 6 else ''}. "
            "Only plain C-RADIO ViTs (v2.5/v3 layout) are implemented natively; pass trust_remote_code=True with a "
            "RADIO checkout as teacher_path to run NVIDIA's own code instead."
        )
    if unused:
        logger.info("RADIO checkpoint: ignoring entries unused at inference: %s", unused)
    for name in ("norm_mean", "norm_std"):
        if cond_prefix + name in sd:
            out["input_" + name[len("norm_") :]] = sd[cond_prefix + name].reshape(1, 3, 1, 1)
    if fn_prefix + "mean" in sd and fn_prefix + "tx" in sd:
        out["feature_mean"] = sd[fn_prefix + "mean"]
        out["feature_tx"] = sd[fn_prefix + "tx"]
    if "patch_embed.weight" not in out or "pos_embed" not in out:
        raise ValueError("RADIO checkpoint lacks the patch embedding or the position embedding.")
    out = {k: (v.float() if v.is_floating_point() else v) for k, v in out.items()}

    w = out["patch_embed.weight"]
    dim = w.shape[0]
    patch = math.isqrt(w.shape[1] // 3)
    n_pos = out["pos_embed"].reshape(-1, dim).shape[0]
    grid = math.isqrt(n_pos)
    if patch * patch * 3 != w.shape[1] or grid * grid != n_pos:
        raise ValueError(f"RADIO checkpoint has odd shapes: patch embed {tuple(w.shape)}, {n_pos} positions.")
    out["pos_embed"] = out["pos_embed"].reshape(1, n_pos, dim)
    block_ids = {int(k.split(".")[1]) for k in out if k.startswith("blocks.")}
    depth = len(block_ids)
    if block_ids != set(range(depth)):
        raise ValueError(f"RADIO checkpoint has a gap in its block indices: {sorted(block_ids)}.")
    arch: Dict[str, Any] = dict(
        embed_dim=dim,
        depth=depth,
        patch_size=patch,
        pos_grid=grid,
        num_prefix_tokens=out["prefix_tokens"].shape[0] if "prefix_tokens" in out else 0,
        mlp_hidden_dim=out["blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * dim,
        layer_scale="blocks.0.ls1.gamma" in out,
        qkv_bias="blocks.0.attn.qkv.bias" in out,
        patch_bias="patch_embed.bias" in out,
        patch_norm="patch_norm.weight" in out,
        final_norm="norm.weight" in out,
        feature_normalizer="feature_tx" in out,
    )
    return out, arch


def _variant_for_width(width: int) -> Optional[str]:
    return next((v.name for v in RADIO_VARIANTS.values() if v.width == width), None)


def radio_vit_from_state_dict(
    sd: Mapping[str, torch.Tensor],
    num_heads: int,
    *,
    expected_width: Optional[int] = None,
    align_corners: bool = DEFAULT_ALIGN_CORNERS,
    expect: Optional[Mapping[str, Any]] = None,
    what: str = "RADIO",
) -> RadioViT:
    """Build a ``RadioViT`` from RADIO checkpoint tensors (any supported layout) and load them strictly."""
    native, arch = convert_radio_state_dict(sd)
    width = arch["embed_dim"]
    if expected_width is not None and width != expected_width:
        other = _variant_for_width(width)
        raise ValueError(
            f"{what}: the weights are {width} wide but this teacher is {expected_width} wide"
            + (f"; they look like {other!r}" if other else "")
            + ". Pick the teacher that matches the file."
        )
    for key, want in (expect or {}).items():
        got = arch.get(key)
        if key == "mlp_ratio":
            key, got, want = "mlp_hidden_dim", arch["mlp_hidden_dim"], int(want * width)
        if got != want:
            raise ValueError(f"{what}: arch override {key}={want!r}, but the checkpoint has {key}={got!r}.")
    if width % num_heads:
        raise ValueError(f"{what}: width {width} is not divisible by num_heads={num_heads}.")
    model = RadioViT(num_heads=num_heads, align_corners=align_corners, **arch)
    missing, unexpected = model.load_state_dict(native, strict=False)
    missing = [k for k in missing if k not in ("input_mean", "input_std")]  # RADIO's default conditioner: CLIP
    if missing or unexpected:
        raise ValueError(f"{what}: checkpoint does not fit the model (missing {missing}, unexpected {unexpected}).")
    return model


# ----------------------------------------------------------------------------------------------------------------
# Teachers
# ----------------------------------------------------------------------------------------------------------------


class RadioTeacher(Teacher):
    """A C-RADIO teacher on the built-in ``RadioViT``."""

    def __init__(self, spec: TeacherSpec, model: RadioViT, resolution: Optional[int] = None, grid=STUDENT_GRID):
        super().__init__(spec, resolution=resolution, grid=grid)
        self.model = model

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class RadioHubTeacher(Teacher):
    """A C-RADIO teacher running NVIDIA's own code (``torch.hub`` entry ``radio_model`` of a local checkout)."""

    def __init__(self, spec: TeacherSpec, radio: nn.Module, resolution: Optional[int] = None, grid=STUDENT_GRID):
        super().__init__(spec, resolution=resolution, grid=grid)
        self.radio = radio

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.radio(x)  # RadioOutput(summary, features), features (B, N, D) after the feature normalizer
        return out.features if hasattr(out, "features") else out[1]


def _find_hub_checkpoint(v: RadioVariant, spec: TeacherSpec, checkout: Path) -> Path:
    """The release checkpoint a RADIO source checkout loads: beside it, or wherever the variant's sources keep it."""
    here = tuple(WeightSource(v.hub_files, directory=str(d)) for d in (checkout, checkout / "checkpoints"))
    elsewhere = tuple(WeightSource(v.hub_files, s.repo, s.directory) for s in spec.sources)
    try:
        return resolve_weights(v.name, None, here + elsewhere)
    except TeacherWeightsNotFound as exc:
        raise TeacherWeightsNotFound(
            f"Teacher {v.name!r}: the RADIO checkout {checkout} needs the release checkpoint {v.hub_files[0]}.\n{exc}"
        ) from None


def _build_from_checkout(
    v: RadioVariant, checkout: Path, spec: TeacherSpec, arch: Dict[str, Any], resolution, grid, trust_remote_code
) -> RadioHubTeacher:
    if not trust_remote_code:
        raise ValueError(
            f"Teacher {v.name!r}: teacher_path {checkout} is a RADIO source checkout (it has hubconf.py); loading it "
            "runs that code and unpickles its checkpoint. Pass trust_remote_code=True (--align.trust_remote_code "
            f"true) to allow this, or point teacher_path at the weights file itself ({v.hub_files[0]} or an HF "
            "snapshot's model.safetensors) to use the built-in implementation."
        )
    ckpt = _find_hub_checkpoint(v, spec, checkout)
    radio = torch.hub.load(str(checkout), "radio_model", source="local", version=str(ckpt), progress=False)
    width = int(radio.embed_dim)
    if width != spec.width:
        other = _variant_for_width(width)
        raise ValueError(
            f"Teacher {v.name!r}: {ckpt} is {width} wide, expected {spec.width}"
            + (f" (it looks like {other!r})" if other else "")
            + "."
        )
    blocks = list(getattr(radio.model, "blocks", []))
    checks = {"depth": len(blocks)}
    if blocks and hasattr(blocks[0], "attn") and hasattr(blocks[0].attn, "num_heads"):
        checks["num_heads"] = int(blocks[0].attn.num_heads)
    for key, got in checks.items():
        if key in arch and arch[key] != got:
            raise ValueError(f"Teacher {v.name!r}: arch override {key}={arch[key]!r}, but {ckpt} has {got}.")
    ignored = sorted(set(arch) - {"embed_dim", "depth", "num_heads"})
    if ignored:
        raise ValueError(f"Teacher {v.name!r}: arch keys {ignored} cannot be applied to NVIDIA's own RADIO code.")
    return RadioHubTeacher(spec, radio, resolution=resolution, grid=grid).freeze()


def _variant(name: str) -> RadioVariant:
    if name not in RADIO_VARIANTS:
        raise ValueError(f"Unknown RADIO variant {name!r}; known: {sorted(RADIO_VARIANTS)}.")
    return RADIO_VARIANTS[name]


def build(spec: TeacherSpec, request: TeacherRequest) -> Teacher:
    """The registry's hook (see ``catalog``): the frozen C-RADIOv3 teacher ``spec.name`` (one of
    ``RADIO_VARIANTS``); see the module docstring."""
    name, path = spec.name, request.path
    v = _variant(name)
    arch = checked_arch(name, request.arch, ARCH_KEYS)
    width = int(arch.get("embed_dim", v.width))
    spec = spec if width == spec.width else replace(spec, width=width)
    num_heads = int(arch.get("num_heads", v.num_heads))
    align_corners = bool(arch.get("align_corners", DEFAULT_ALIGN_CORNERS))
    resolution, grid = request.resolution, request.grid

    if wants_random(name, path, request.allow_random):
        depth = int(arch.get("depth", v.depth))
        hidden = arch.get("mlp_hidden_dim") or int(float(arch.get("mlp_ratio", v.mlp_ratio)) * width)
        model = RadioViT(
            embed_dim=width,
            depth=depth,
            num_heads=num_heads,
            mlp_hidden_dim=int(hidden),
            pos_grid=int(arch.get("pos_grid", POS_GRID)),
            num_prefix_tokens=int(arch.get("num_prefix_tokens", NUM_PREFIX_TOKENS)),
            layer_scale=bool(arch.get("layer_scale", v.layer_scale)),
            qkv_bias=bool(arch.get("qkv_bias", True)),
            align_corners=align_corners,
        )
        return RadioTeacher(spec, model, resolution=resolution, grid=grid).freeze()

    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir() and (p / "hubconf.py").is_file():
            return _build_from_checkout(v, p, spec, arch, resolution, grid, request.trust_remote_code)

    weights = resolve_weights(name, path, spec.sources)
    logger.info("Teacher %s: loading %s", name, weights)
    sd = load_radio_state_dict(weights)
    expect = {k: arch[k] for k in arch if k not in ("embed_dim", "num_heads", "align_corners")}
    model = radio_vit_from_state_dict(
        sd,
        num_heads,
        expected_width=width,
        align_corners=align_corners,
        expect=expect,
        what=f"Teacher {name!r} ({weights})",
    )
    return RadioTeacher(spec, model, resolution=resolution, grid=grid).freeze()


def build_radio_teacher(name: str, *args: Any, **kwargs: Any) -> Teacher:
    """The frozen C-RADIOv3 teacher ``name``; the other arguments are ``TeacherRequest``'s fields, in its order."""
    return build(_variant(name).spec, TeacherRequest(*args, **kwargs))


# One factory per variant, taking TeacherRequest's fields as keywords.
c_radio_v3_b = partial(build_radio_teacher, "c-radio-v3-b")  # ViT-B/16, width 768
c_radio_v3_l = partial(build_radio_teacher, "c-radio-v3-l")  # ViT-L/16, width 1024: the reference's default teacher
c_radio_v3_h = partial(build_radio_teacher, "c-radio-v3-h")  # ViT-H/16, width 1280
c_radio_v3_g = partial(build_radio_teacher, "c-radio-v3-g")  # ViT-g/16, width 1536
