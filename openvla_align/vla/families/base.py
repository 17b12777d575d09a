"""The model-family interface and registry (``vla.families``); OpenVLA's layout is the base family."""

from __future__ import annotations

from typing import List

import torch.nn as nn


class ModelFamily:
    """The OpenVLA layout: one image, the vision backbone at ``vision_backbone``, no conditioning layers."""

    name = "openvla"

    def matches(self, base: nn.Module) -> bool:
        return all(isinstance(getattr(base, n, None), nn.Module) for n in ("vision_backbone", "projector"))

    def vision_backbone(self, base: nn.Module) -> nn.Module:
        """The backbone that holds the timm towers (``featurizer``, ``fused_featurizer``)."""
        return base.vision_backbone

    def num_images(self, base: nn.Module) -> int:
        return 1

    def set_num_images(self, base: nn.Module, n: int) -> None:
        """Set the images per sample the model takes (only families with several cameras support n > 1)."""
        if n != 1:
            raise ValueError(f"{self.name} models take one image per sample, not {n}.")

    def forward_needs_labels(self) -> bool:
        """Does the multimodal forward need ``labels`` even without a loss (OFT finds its action tokens in them)?"""
        return False

    def match_attention(self, base: nn.Module) -> bool:
        """Make every attention implementation of ``base`` compute what its training attention computes (True when
        something was changed). OpenVLA: causal everywhere already."""
        return False

    def conditioning_parameters(self, base: nn.Module) -> List[nn.Parameter]:
        """Vision parameters that are not the pretrained towers (none for OpenVLA)."""
        return []


_FAMILIES: List[ModelFamily] = []


def register_family(family: ModelFamily) -> ModelFamily:
    """Register ``family`` ahead of the ones already known (later registrations are more specific)."""
    _FAMILIES.insert(0, family)
    return family


def families() -> List[ModelFamily]:
    return list(_FAMILIES)


def family_of(base: nn.Module) -> ModelFamily:
    """The family of an unwrapped model (``layout.unwrap``); OpenVLA's when no other claims it."""
    return next((f for f in _FAMILIES if f.matches(base)), _FAMILIES[-1])


register_family(ModelFamily())
