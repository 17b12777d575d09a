"""The built-in teachers as data: ``TEACHERS``, each one's ``TeacherSpec`` and what its family module needs to
build it.

Torch-free, and it imports nothing above ``spec``: the registry registers ``TEACHERS`` without importing a model, so
`openvla-align teachers` lists them in a fraction of a second. The family module (``radio``, ``dinov2``, ``siglip``,
``theia``, ``vggt``, ``scenes``) is imported when a teacher of its family is first created; its
``build(spec, request, **params)`` builds it from a ``TeacherRequest``. Data flows one way: this module passes each
family what it needs (``params``) and reads nothing back from the family modules; RADIO's variant table is RADIO's
own data (``radio_variants``), which this module only lists.
"""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple

from .radio_variants import RADIO_VARIANTS
from .spec import IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD, CatalogEntry, TeacherSpec, WeightSource

IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)
SIGLIP = (SIGLIP_MEAN, SIGLIP_STD)

TEACHERS: List[CatalogEntry] = []


def _add(
    module: str, name: str, width: int, patch: int, stats: Tuple, prefix: int, sources: Sequence, **params: Any
) -> None:
    """List the built-in ``name``, built by ``module`` (its family is the module's name)."""
    mean, std = stats
    family = module.rpartition(".")[2]
    spec = TeacherSpec(name, family, width, patch, mean, std, num_prefix_tokens=prefix, sources=tuple(sources))
    TEACHERS.append(CatalogEntry(spec, module, params))


# ---------------------------------------------------------------------------------------------------- C-RADIOv3
TEACHERS.extend(CatalogEntry(v.spec, "openvla_align.teachers.radio") for v in RADIO_VARIANTS.values())


# ---------------------------------------------------------------------------------------------------- DINOv2
# size letter: (timm architecture prefix, torch.hub code, width)
DINOV2_SIZES = {
    "s": ("vit_small_patch14", "vits14", 384),
    "b": ("vit_base_patch14", "vitb14", 768),
    "l": ("vit_large_patch14", "vitl14", 1024),
    "g": ("vit_giant_patch14", "vitg14", 1536),
}


def _add_dinov2(size: str, registers: bool) -> None:
    arch_prefix, hub_code, width = DINOV2_SIZES[size]
    name = f"dinov2-vit-{size}" + ("-reg" if registers else "")
    model_name = f"{arch_prefix}_reg4_dinov2" if registers else f"{arch_prefix}_dinov2"
    hub_file = f"dinov2_{hub_code}_reg4_pretrain.pth" if registers else f"dinov2_{hub_code}_pretrain.pth"
    sources = (
        WeightSource(("model.safetensors", "pytorch_model.bin"), f"timm/{model_name}.lvd142m"),
        WeightSource((hub_file,)),
    )
    prefix = 5 if registers else 1  # class token, and 4 registers
    _add("openvla_align.teachers.dinov2", name, width, 14, IMAGENET, prefix, sources, model_name=model_name)


for _size in DINOV2_SIZES:
    for _registers in (False, True):
        _add_dinov2(_size, _registers)


# ---------------------------------------------------------------------------------------------------- SigLIP
# name: (timm model, OpenCLIP HF repo used by timm 0.9.x, width, patch size)
SIGLIP_VARIANTS = {
    "siglip-so400m-p14-224": ("vit_so400m_patch14_siglip_224", "ViT-SO400M-14-SigLIP", 1152, 14),
    "siglip-b-p16-224": ("vit_base_patch16_siglip_224", "ViT-B-16-SigLIP", 768, 16),
    "siglip-b-p16-256": ("vit_base_patch16_siglip_256", "ViT-B-16-SigLIP-256", 768, 16),
    "siglip-l-p16-256": ("vit_large_patch16_siglip_256", "ViT-L-16-SigLIP-256", 1024, 16),
}


def _add_siglip(name: str) -> None:
    model_name, open_clip_repo, width, patch = SIGLIP_VARIANTS[name]
    sources = (
        WeightSource(("model.safetensors", "pytorch_model.bin"), f"timm/{model_name}.webli"),
        WeightSource(("open_clip_model.safetensors", "open_clip_pytorch_model.bin"), f"timm/{open_clip_repo}"),
    )
    _add("openvla_align.teachers.siglip", name, width, patch, SIGLIP, 0, sources, model_name=model_name)


for _name in SIGLIP_VARIANTS:
    _add_siglip(_name)


# ---------------------------------------------------------------------------------------------------- Theia
# facebook/deit-{size}-patch16-224 (model_type "vit"): width, heads; all have 12 layers, MLP 4x, LayerNorm eps 1e-12.
THEIA_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
THEIA_MIXES = ("cdiv", "cddsv")

for _size, (_width, _heads) in THEIA_SIZES.items():
    for _mix in THEIA_MIXES:
        _name = f"theia-{_size}-patch16-224-{_mix}"
        # config.json sits beside the weights, in the same snapshot
        _sources = (WeightSource(("model.safetensors",), f"theaiinstitute/{_name}"),)
        _add("openvla_align.teachers.theia", _name, _width, 16, IMAGENET, 1, _sources, heads=_heads)


# ---------------------------------------------------------------------------------------------------- VGGT
# facebook/VGGT-1B's aggregator: a multi-view teacher (its global attention mixes a sample's cameras). A feature is a
# layer's frame- and global-attention outputs concatenated (2 x 1024); prefix = camera token + 4 registers. It
# normalises its [0,1] input itself and reads 518 px (37x37) unless teacher_resolution says otherwise. The family's
# ``build`` takes ``layer`` (default -1, the last, as Spatial Forcing): a plugin may list other layers as params.
TEACHERS.append(
    CatalogEntry(
        TeacherSpec(
            name="vggt-1b",
            family="vggt",
            width=2048,
            patch_size=14,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            num_prefix_tokens=5,
            normalized_inside=True,
            sources=(WeightSource(("model.pt",), "facebook/VGGT-1B"),),
            input_size=518,  # 37 x 37 patches
        ),
        "openvla_align.teachers.vggt",
    )
)


# ---------------------------------------------------------------------------------------------------- demo
# The CPU demo's own teacher: a small conv patch encoder that `openvla-align demo` trains on its generated scenes.
TEACHERS.append(
    CatalogEntry(
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
)
