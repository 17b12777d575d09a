"""SigLIP image towers as teachers, run through timm (mean = std = 0.5).

SigLIP has no class token (timm ``class_token=False``; its pooling is a separate attention-pool head), so the
features are all of ``forward_features``: the patch tokens after the final LayerNorm. The model is built at the
teacher resolution: 224 px for patch 14 (OpenVLA's own so400m tower, 16x16) and 256 px for patch 16 (16x16); a
checkpoint trained at another size has its position embedding resampled at load by timm's checkpoint filter.

Weights: timm >= 1.0 keeps them in ``timm/<model>.webli`` (``model.safetensors``); timm 0.9.x, and so an OpenVLA
environment, in the OpenCLIP repos ``timm/ViT-*-SigLIP*`` (``open_clip_pytorch_model.bin``), whose ``visual.trunk.*``
keys timm's filter maps to its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ._registry import register_teacher
from .base import SIGLIP_MEAN, SIGLIP_STD, TeacherSpec
from .dinov2 import locate_weights, timm_teacher_factory

TINY_ARCH = dict(embed_dim=32, depth=2, num_heads=2)

# name: (timm model, OpenCLIP HF repo used by timm 0.9.x, width, patch size)
_VARIANTS = {
    "siglip-so400m-p14-224": ("vit_so400m_patch14_siglip_224", "ViT-SO400M-14-SigLIP", 1152, 14),
    "siglip-b-p16-224": ("vit_base_patch16_siglip_224", "ViT-B-16-SigLIP", 768, 16),
    "siglip-b-p16-256": ("vit_base_patch16_siglip_256", "ViT-B-16-SigLIP-256", 768, 16),
    "siglip-l-p16-256": ("vit_large_patch16_siglip_256", "ViT-L-16-SigLIP-256", 1024, 16),
}


def _register_siglip(name: str) -> None:
    model_name, open_clip_repo, width, patch = _VARIANTS[name]
    repos = [
        (f"timm/{model_name}.webli", ("model.safetensors", "pytorch_model.bin")),
        (f"timm/{open_clip_repo}", ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")),
    ]
    spec = TeacherSpec(
        name=name,
        family="siglip",
        width=width,
        patch_size=patch,
        mean=SIGLIP_MEAN,
        std=SIGLIP_STD,
        num_prefix_tokens=0,
        weights_hint=f"HF cache {repos[0][0]}/model.safetensors or {repos[1][0]}/open_clip_pytorch_model.bin",
    )

    def locate(teacher: str, path: Optional[str]) -> Path:
        return locate_weights(teacher, path, repos)

    register_teacher(name, spec=spec)(timm_teacher_factory(spec, model_name, locate, module=__name__))


for _name in _VARIANTS:
    _register_siglip(_name)
