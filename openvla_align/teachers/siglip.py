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

# A SigLIP tower is built like the DINOv2 timm teachers: the registry's hook (see ``catalog``) is the same.
from .dinov2 import build

__all__ = ["build"]
