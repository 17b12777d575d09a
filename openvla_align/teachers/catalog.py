"""The built-in teachers as data: each one's ``TeacherSpec`` and what its family module needs to build it.

Torch-free: importing this registers every built-in teacher (``register_builtin``) without importing a model, so
`openvla-align teachers` lists them in a fraction of a second. The family module (``radio``, ``dinov2``, ``siglip``,
``theia``) is imported when a teacher of its family is first created; its ``teacher_factory(spec, **params)``
returns the factory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from ._registry import register_builtin
from .spec import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD, TeacherSpec, WeightSource

# ---------------------------------------------------------------------------------------------------- C-RADIOv3
RADIO_PATCH_SIZE = 16
RADIO_PREFIX_TOKENS = 8  # summary + register tokens of C-RADIOv3
RADIO_HF_FILES = ("model.safetensors", "model.safetensors.index.json")  # an HF snapshot (single file or sharded)


@dataclass(frozen=True)
class RadioVariant:
    name: str
    width: int
    depth: int
    num_heads: int
    layer_scale: bool
    hf_repos: Tuple[str, ...]  # spellings of its HF repo id (the cache keeps the one used to download)
    hub_files: Tuple[str, ...]  # release file names as torch.hub stores them (first is the real one)
    mlp_ratio: float = 4.0

    @property
    def hf_files(self) -> Tuple[str, ...]:
        """What an HF snapshot of the variant may hold: safetensors (single or sharded), the release file, a .bin."""
        return RADIO_HF_FILES + self.hub_files + ("pytorch_model.bin",)

    @property
    def spec(self) -> TeacherSpec:
        return TeacherSpec(
            name=self.name,
            family="radio",
            width=self.width,
            patch_size=RADIO_PATCH_SIZE,
            mean=CLIP_MEAN,
            std=CLIP_STD,
            num_prefix_tokens=RADIO_PREFIX_TOKENS,
            normalized_inside=True,
            # HF repo ids are case-insensitive online, but the cache keeps the spelling used: every one is searched.
            sources=tuple(WeightSource(self.hf_files, r) for r in self.hf_repos) + (WeightSource(self.hub_files),),
        )


# Heads and layer scale follow RADIO's timm model definitions (vit_{base,large}_patch16_v2_224 with
# init_values=1e-5, vit_huge_patch16_224 / vit_giant_patch16_224 without). Depth, width, MLP width and layer scale
# are read from the checkpoint when one is loaded. The v3-L release file really is named "c-radio-v3_l_half".
RADIO_VARIANTS: Dict[str, RadioVariant] = {
    v.name: v
    for v in (
        RadioVariant("c-radio-v3-b", 768, 12, 12, True, ("nvidia/C-RADIOv3-B",), ("c-radio_v3-b_half.pth.tar",)),
        RadioVariant(
            "c-radio-v3-l",
            1024,
            24,
            16,
            True,
            ("nvidia/C-RADIOv3-L",),
            ("c-radio-v3_l_half.pth.tar", "c-radio_v3-l_half.pth.tar"),
        ),
        RadioVariant("c-radio-v3-h", 1280, 32, 16, False, ("nvidia/C-RADIOv3-H",), ("c-radio_v3-h_half.pth.tar",)),
        RadioVariant(
            "c-radio-v3-g",
            1536,
            40,
            24,
            False,
            ("nvidia/C-RADIOv3-g", "nvidia/C-RADIOv3-G"),
            ("c-radio_v3-g_half.pth.tar",),
        ),
    )
}

for _variant in RADIO_VARIANTS.values():
    register_builtin(_variant.spec, "openvla_align.teachers.radio")


# ---------------------------------------------------------------------------------------------------- DINOv2
# size letter: (timm architecture prefix, torch.hub code, width)
DINOV2_SIZES = {
    "s": ("vit_small_patch14", "vits14", 384),
    "b": ("vit_base_patch14", "vitb14", 768),
    "l": ("vit_large_patch14", "vitl14", 1024),
    "g": ("vit_giant_patch14", "vitg14", 1536),
}


def _register_dinov2(size: str, registers: bool) -> None:
    arch_prefix, hub_code, width = DINOV2_SIZES[size]
    name = f"dinov2-vit-{size}" + ("-reg" if registers else "")
    model_name = f"{arch_prefix}_reg4_dinov2" if registers else f"{arch_prefix}_dinov2"
    hf_repo = f"timm/{model_name}.lvd142m"
    hub_file = f"dinov2_{hub_code}_reg4_pretrain.pth" if registers else f"dinov2_{hub_code}_pretrain.pth"
    spec = TeacherSpec(
        name=name,
        family="dinov2",
        width=width,
        patch_size=14,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_prefix_tokens=5 if registers else 1,
        sources=(WeightSource(("model.safetensors", "pytorch_model.bin"), hf_repo), WeightSource((hub_file,))),
    )
    register_builtin(spec, "openvla_align.teachers.dinov2", model_name=model_name)


for _size in DINOV2_SIZES:
    for _registers in (False, True):
        _register_dinov2(_size, _registers)


# ---------------------------------------------------------------------------------------------------- SigLIP
# name: (timm model, OpenCLIP HF repo used by timm 0.9.x, width, patch size)
SIGLIP_VARIANTS = {
    "siglip-so400m-p14-224": ("vit_so400m_patch14_siglip_224", "ViT-SO400M-14-SigLIP", 1152, 14),
    "siglip-b-p16-224": ("vit_base_patch16_siglip_224", "ViT-B-16-SigLIP", 768, 16),
    "siglip-b-p16-256": ("vit_base_patch16_siglip_256", "ViT-B-16-SigLIP-256", 768, 16),
    "siglip-l-p16-256": ("vit_large_patch16_siglip_256", "ViT-L-16-SigLIP-256", 1024, 16),
}


def _register_siglip(name: str) -> None:
    model_name, open_clip_repo, width, patch = SIGLIP_VARIANTS[name]
    spec = TeacherSpec(
        name=name,
        family="siglip",
        width=width,
        patch_size=patch,
        mean=SIGLIP_MEAN,
        std=SIGLIP_STD,
        num_prefix_tokens=0,
        sources=(
            WeightSource(("model.safetensors", "pytorch_model.bin"), f"timm/{model_name}.webli"),
            WeightSource(("open_clip_model.safetensors", "open_clip_pytorch_model.bin"), f"timm/{open_clip_repo}"),
        ),
    )
    register_builtin(spec, "openvla_align.teachers.siglip", model_name=model_name)


for _name in SIGLIP_VARIANTS:
    _register_siglip(_name)


# ---------------------------------------------------------------------------------------------------- Theia
# facebook/deit-{size}-patch16-224 (model_type "vit"): width, heads; all have 12 layers, MLP 4x, LayerNorm eps 1e-12.
THEIA_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
THEIA_MIXES = ("cdiv", "cddsv")


def _register_theia(size: str, mix: str) -> None:
    width, heads = THEIA_SIZES[size]
    name = f"theia-{size}-patch16-224-{mix}"
    hf_repo = f"theaiinstitute/{name}"
    spec = TeacherSpec(
        name=name,
        family="theia",
        width=width,
        patch_size=16,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_prefix_tokens=1,
        sources=(WeightSource(("model.safetensors",), hf_repo),),  # config.json beside it, in the same snapshot
    )
    register_builtin(spec, "openvla_align.teachers.theia", hf_repo=hf_repo, heads=heads)


for _size in THEIA_SIZES:
    for _mix in THEIA_MIXES:
        _register_theia(_size, _mix)


# ---------------------------------------------------------------------------------------------------- demo
# The CPU demo's own teacher: a small conv patch encoder that `openvla-align demo` trains on its generated scenes.
register_builtin(
    TeacherSpec(
        name="demo-scenes",
        family="demo",
        width=32,
        patch_size=14,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_prefix_tokens=0,
        weights_hint="teacher_path=OUT/teacher/model.safetensors, written by `openvla-align demo --out OUT`",
    ),
    "openvla_align.teachers.scenes",
)
