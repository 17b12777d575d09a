"""Theia teachers (theaiinstitute/theia-{tiny,small,base}-patch16-224-{cdiv,cddsv}).

Theia is a DeiT (a plain transformers ``ViTModel``, final LayerNorm, no pooler) distilled from several vision
foundation models. Its remote code wraps it as ``TheiaModel.backbone.model``, so the snapshot's ``model.safetensors``
holds the backbone under ``backbone.model.*`` beside the translator heads (``translator.*``), which are not used here.
``forward_feature`` is ``backbone.model(pixels).last_hidden_state`` with the CLS token (and any register tokens,
none in the released checkpoints) dropped.

Native path (default, no remote code): a ``ViTModel`` with the DeiT config is built here and loaded from
``backbone.model.*``; it runs at 256 px with interpolated position encodings (16x16 patch tokens), on
ImageNet-normalised pixels, as the reference does. The position encodings are interpolated by the installed
transformers' ``ViTEmbeddings``, exactly as in the remote code; note that transformers 4.40.1 (OpenVLA's pin) uses
DINO's ``scale_factor=(16 + 0.1) / 14`` formula and transformers 5 ``size=(16, 16)``, which moves the interpolated
position embedding by a few percent.

Remote path (``trust_remote_code=True``): the snapshot's own ``TheiaModel`` is built by
``AutoModel.from_pretrained(snapshot, trust_remote_code=True, local_files_only=True)`` and its backbone is run the
same way. Its ``forward_feature`` is not called: that routes the pixels through the DeiT image processor, which
round-trips them through numpy on the CPU and centre-crops a 256 px input to 224 px (14x14 tokens).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn

from ._weights import hf_cache_dir, hf_snapshot_dirs, read_state_dict, resolve_weights, strip_prefix
from .base import (
    STUDENT_GRID,
    Teacher,
    TeacherSpec,
    TeacherWeightsNotFound,
    wants_random,
)
from .spec import TeacherRequest

BACKBONE_PREFIX = "backbone.model."
_ARCH_KEYS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "img_size")


# transformers < 5 names of a ViT encoder layer's modules, and their transformers >= 5 names.
_LAYER_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
)
_LAYER_KEY = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")


def deit_config(
    width: int, heads: int, depth: int = 12, mlp_ratio: float = 4.0, patch_size: int = 16, img_size: int = 224
):
    """The ``ViTConfig`` of facebook/deit-*-patch16-224, the config Theia's backbone is built from."""
    from transformers import ViTConfig

    return ViTConfig(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=int(width * mlp_ratio),
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-12,
        image_size=img_size,
        patch_size=patch_size,
        num_channels=3,
        qkv_bias=True,
    )


def _vit_key(key: str, new_layout: bool) -> str:
    """Rename one ViT state-dict key to the installed transformers' layout (either layout accepted as input)."""
    match = _LAYER_KEY.match(key)
    if match is None:
        return key
    index, rest = match.groups()
    for old, new in _LAYER_RENAMES:  # to the transformers < 5 layout first
        if rest.startswith(new):
            rest = old + rest[len(new) :]
            break
    if not new_layout:
        return f"encoder.layer.{index}.{rest}"
    for old, new in _LAYER_RENAMES:
        if rest.startswith(old):
            rest = new + rest[len(old) :]
            break
    return f"layers.{index}.{rest}"


def to_installed_layout(state: Dict[str, torch.Tensor], model_keys: Iterable[str]) -> Dict[str, torch.Tensor]:
    """ViT weights saved by any transformers version, renamed for the installed ``ViTModel``."""
    new_layout = any(k.startswith("layers.") for k in model_keys)
    return {_vit_key(k, new_layout): v for k, v in state.items()}


class TheiaTeacher(Teacher):
    """A Theia backbone (transformers ``ViTModel``); features = last_hidden_state minus CLS and register tokens."""

    def __init__(
        self,
        spec: TeacherSpec,
        vit: nn.Module,
        resolution: Optional[int] = None,
        grid: Tuple[int, int] = STUDENT_GRID,
        has_cls: bool = True,
        num_reg_tokens: int = 0,
    ):
        super().__init__(spec, resolution, grid)
        self.vit = vit
        self.has_cls = has_cls
        self.num_reg_tokens = num_reg_tokens

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        start = 1 if self.has_cls else 0
        return tokens[:, start : tokens.shape[1] - self.num_reg_tokens]


def _read_config(snapshot: Path) -> Dict:
    config = snapshot / "config.json"
    return json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}


def _native_unsupported(config: Dict) -> Optional[str]:
    """Why the native path cannot run this checkpoint (None when it can); Theia's own test is by backbone name."""
    backbone = str(config.get("backbone", "facebook/deit"))
    if int(config.get("num_reg_tokens") or 0) or "reg" in backbone:
        return f"its backbone {backbone!r} has register tokens (num_reg_tokens={config.get('num_reg_tokens')})"
    if "nocls" in backbone:
        return f"its backbone {backbone!r} has no CLS token"
    if "deit" not in backbone:
        return f"its backbone {backbone!r} is not a DeiT"
    return None


def _build_native(name: str, spec: TeacherSpec, heads: int, arch: Dict) -> Tuple[TeacherSpec, nn.Module]:
    from transformers import ViTModel

    unknown = sorted(set(arch) - set(_ARCH_KEYS))
    if unknown:
        raise ValueError(f"Teacher {name!r}: unknown arch keys {unknown}; known: {list(_ARCH_KEYS)}.")
    width = int(arch.get("embed_dim", spec.width))
    config = deit_config(
        width,
        int(arch.get("num_heads", heads)),
        depth=int(arch.get("depth", 12)),
        mlp_ratio=float(arch.get("mlp_ratio", 4.0)),
        patch_size=int(arch.get("patch_size", spec.patch_size)),
        img_size=int(arch.get("img_size", 224)),
    )
    spec = dataclasses.replace(spec, width=width, patch_size=config.patch_size)
    return spec, ViTModel(config, add_pooling_layer=False)


def _load_native(name: str, vit: nn.Module, file: Path) -> None:
    state = read_state_dict(file)
    backbone = strip_prefix(state, BACKBONE_PREFIX)
    if not backbone and "embeddings.patch_embeddings.projection.weight" in state:
        backbone = state  # a bare ViTModel state dict
    if not backbone:
        raise ValueError(
            f"Teacher {name!r}: {file} holds no '{BACKBONE_PREFIX}*' tensors, so it is not a Theia checkpoint."
        )
    backbone = {k: v for k, v in backbone.items() if not k.startswith("pooler.")}
    backbone = to_installed_layout(backbone, vit.state_dict().keys())
    try:
        missing, unexpected = vit.load_state_dict(backbone, strict=False)
    except RuntimeError as exc:  # shape mismatches: another Theia size
        raise ValueError(f"Teacher {name!r}: the backbone in {file} does not fit this variant: {exc}") from exc
    if missing or unexpected:
        raise ValueError(
            f"Teacher {name!r}: the backbone in {file} does not match a DeiT ViTModel; "
            f"missing keys {sorted(missing)[:5]}, unexpected keys {sorted(unexpected)[:5]}."
        )


def _load_remote(name: str, spec: TeacherSpec, snapshot: Path, arch: Dict) -> Tuple[TeacherSpec, nn.Module, bool, int]:
    config = _read_config(snapshot)
    auto_model = (config.get("auto_map") or {}).get("AutoModel")
    if not auto_model:
        raise ValueError(
            f"Teacher {name!r}: {snapshot}/config.json has no auto_map.AutoModel, so there is no remote code to run; "
            "use trust_remote_code=False for the native path."
        )
    code = snapshot / (auto_model.split(".")[0] + ".py")
    if not code.is_file():
        raise TeacherWeightsNotFound(f"Teacher {name!r}: the remote code {code.name} is missing from {snapshot}.")
    # TheiaModel.__init__ builds its backbone with AutoModel/AutoProcessor.from_pretrained(<backbone id>), so that
    # repo must be cached as well; without this check it would be downloaded.
    backbone_id = re.sub(r"^(reg-|nocls-)", "", str(config.get("backbone", "")))
    if "/" in backbone_id and not Path(backbone_id).exists() and not hf_snapshot_dirs(backbone_id):
        raise TeacherWeightsNotFound(
            f"Teacher {name!r}: Theia's remote code builds its backbone from {backbone_id!r}, which is not in the HF "
            f"cache {hf_cache_dir()}/models--{backbone_id.replace('/', '--')}/snapshots/<revision>/ (config.json, "
            f"model weights, preprocessor_config.json). Download it on a machine with network "
            f"(`huggingface-cli download {backbone_id}`), run with HF_HUB_OFFLINE=1, or use the native path "
            "(trust_remote_code=False)."
        )
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(
        str(snapshot), trust_remote_code=True, local_files_only=True, output_loading_info=True
    )
    missing = [k for k in info.get("missing_keys", []) if k.startswith(BACKBONE_PREFIX)]
    if missing:
        raise ValueError(
            f"Teacher {name!r}: the remote TheiaModel left backbone weights uninitialised ({missing[:5]}); "
            "this transformers version does not load the checkpoint into the remote code. Use the native path."
        )
    vit = model.backbone.model
    # The remote code builds what the snapshot describes; arch can only state what that must be.
    built = {
        "embed_dim": int(vit.config.hidden_size),
        "depth": int(vit.config.num_hidden_layers),
        "num_heads": int(vit.config.num_attention_heads),
    }
    expected = {"embed_dim": spec.width, **arch}
    for key, value in expected.items():
        if key not in built:
            raise ValueError(f"Teacher {name!r}: arch key {key!r} cannot be applied to the remote code.")
        if int(value) != built[key]:
            raise ValueError(f"Teacher {name!r}: expected {key}={value}, but {snapshot} holds {key}={built[key]}.")
    spec = dataclasses.replace(spec, width=built["embed_dim"])
    return spec, vit, not getattr(model, "no_cls", False), int(getattr(model, "num_reg_tokens", 0) or 0)


def build(spec: TeacherSpec, request: TeacherRequest, heads: int) -> Teacher:
    """The registry's hook (see ``catalog``): the frozen Theia teacher ``spec`` (a DeiT with ``heads`` heads)."""
    name, resolution, grid, arch = spec.name, request.resolution, request.grid, dict(request.arch or {})
    if wants_random(name, request.path, request.allow_random):
        random_spec, vit = _build_native(name, spec, heads, arch)
        return TheiaTeacher(random_spec, vit, resolution, grid).freeze()
    weights = resolve_weights(name, request.path, spec.sources)
    snapshot = weights.parent
    if request.trust_remote_code:
        remote_spec, vit, has_cls, num_reg = _load_remote(name, spec, snapshot, arch)
        return TheiaTeacher(remote_spec, vit, resolution, grid, has_cls=has_cls, num_reg_tokens=num_reg).freeze()

    reason = _native_unsupported(_read_config(snapshot))
    if reason is not None:
        raise ValueError(
            f"Teacher {name!r}: the native loader cannot run {snapshot}: {reason}. Pass trust_remote_code=True "
            "(--align.trust_remote_code true) to run the checkpoint's own code."
        )
    native_spec, vit = _build_native(name, spec, heads, arch)
    _load_native(name, vit, weights)
    return TheiaTeacher(native_spec, vit, resolution, grid).freeze()
