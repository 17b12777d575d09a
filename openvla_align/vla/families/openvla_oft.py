"""OpenVLA-OFT (moojink/openvla-oft): 256 visual tokens per image for ``num_images_in_input`` images (third-person
camera first, then wrist cameras), followed by optional proprio and diffusion-timestep tokens; the vision backbone may
sit inside FiLM's wrapper, whose per-block ``scale``/``shift`` layers condition the towers on the language.

Recognised by structure, not by class (the classes live under ``transformers_modules.*``): OFT's backbone, FiLM-wrapped
or not, answers ``get_num_images_in_input()``.
"""

from __future__ import annotations

from typing import List

import torch.nn as nn

from .base import ModelFamily, register_family


class OpenVLAOFT(ModelFamily):
    name = "openvla-oft"

    def matches(self, base: nn.Module) -> bool:
        backbone = getattr(base, "vision_backbone", None)
        return super().matches(base) and callable(getattr(backbone, "get_num_images_in_input", None))

    def vision_backbone(self, base: nn.Module) -> nn.Module:
        backbone = base.vision_backbone
        inner = getattr(backbone, "vision_backbone", None)  # FiLM's wrapper keeps the original backbone here
        return inner if isinstance(inner, nn.Module) and hasattr(inner, "featurizer") else backbone

    def num_images(self, base: nn.Module) -> int:
        return int(base.vision_backbone.get_num_images_in_input())

    def conditioning_parameters(self, base: nn.Module) -> List[nn.Parameter]:
        """FiLM's ``scale``/``shift`` layers (one pair per ViT block; absent without FiLM)."""
        params = []
        for module in self.vision_backbone(base).modules():
            if isinstance(getattr(module, "block", None), nn.Module):
                for name in ("scale", "shift"):
                    layer = getattr(module, name, None)
                    if isinstance(layer, nn.Module):
                        params.extend(layer.parameters())
        return params


register_family(OpenVLAOFT())
