"""DINOv2 teachers (ViT-S/B/L/g, plain and with 4 registers), run through timm.

Features are DINOv2's ``x_norm_patchtokens``: timm's ``forward_features`` (final LayerNorm applied) with the class
token, and for the ``-reg`` variants the 4 registers, dropped. The timm model is built at the teacher resolution
(224 px -> 16x16 at patch 14), so the 37x37 position embedding of the 518 px checkpoints is resampled once, at load,
by timm's checkpoint filter (bicubic, antialiased): the same resampling the reference applies to the torch.hub model.

This module also holds the timm ViT machinery that ``siglip.py`` reuses (``TimmViTTeacher``, ``build``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ._weights import read_state_dict, resolve_weights
from .base import (
    STUDENT_GRID,
    Teacher,
    TeacherSpec,
    wants_random,
)
from .spec import TeacherRequest


class TimmViTTeacher(Teacher):
    """A timm VisionTransformer built at the teacher resolution; features = forward_features minus prefix tokens."""

    def __init__(
        self,
        spec: TeacherSpec,
        model_name: str,
        resolution: Optional[int] = None,
        grid: Tuple[int, int] = STUDENT_GRID,
        arch: Optional[Dict] = None,
    ):
        arch = dict(arch or {})
        if arch:
            # Resolution defaults and the width check in Teacher.forward follow the model actually built.
            spec = dataclasses.replace(
                spec,
                width=int(arch.get("embed_dim", spec.width)),
                patch_size=int(arch.get("patch_size", spec.patch_size)),
            )
        super().__init__(spec, resolution, grid)
        import timm

        self.model_name = model_name
        self.model = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=self.resolution, **arch)
        built = (
            self.model.patch_embed.proj.out_channels,
            self.model.patch_embed.patch_size[0],
            self.model.num_prefix_tokens,
        )
        if built != (spec.width, spec.patch_size, spec.num_prefix_tokens):
            raise ValueError(
                f"Teacher {spec.name!r}: arch={arch} builds a model with (width, patch, prefix tokens) = {built}, "
                f"which contradicts its spec {(spec.width, spec.patch_size, spec.num_prefix_tokens)}."
            )

    def load_weights(self, file: Path) -> None:
        """Load a timm, original-DINOv2 or OpenCLIP checkpoint; timm's filter converts keys and resamples pos_embed."""
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(read_state_dict(file), self.model)
        try:
            missing, unexpected = self.model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches: another variant's weights
            raise ValueError(
                f"Teacher {self.spec.name!r}: {file} does not fit timm's {self.model_name} "
                f"(width {self.spec.width}): {exc}"
            ) from exc
        if missing or unexpected:
            raise ValueError(
                f"Teacher {self.spec.name!r}: {file} is not a {self.model_name} checkpoint; "
                f"missing keys {sorted(missing)[:5]}, unexpected keys {sorted(unexpected)[:5]}."
            )

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)[:, self.model.num_prefix_tokens :]


def build(spec: TeacherSpec, request: TeacherRequest, model_name: str) -> Teacher:
    """The registry's hook (see ``catalog``): the frozen timm ViT teacher ``spec`` (timm ``model_name``), its
    weights found through ``spec.sources`` unless ``request.path`` names them."""
    # trust_remote_code only permits remote code; timm's model code is local, so there is nothing to permit.
    random = wants_random(spec.name, request.path, request.allow_random)
    # fail fast, before building a large model
    weights = None if random else resolve_weights(spec.name, request.path, spec.sources)
    teacher = TimmViTTeacher(spec, model_name, resolution=request.resolution, grid=request.grid, arch=request.arch)
    if weights is not None:
        teacher.load_weights(weights)
    return teacher.freeze()
