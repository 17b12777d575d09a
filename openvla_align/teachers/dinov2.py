"""DINOv2 teachers (ViT-S/B/L/g, plain and with 4 registers), run through timm.

Features are DINOv2's ``x_norm_patchtokens``: timm's ``forward_features`` (final LayerNorm applied) with the class
token, and for the ``-reg`` variants the 4 registers, dropped. The timm model is built at the teacher resolution
(224 px -> 16x16 at patch 14), so the 37x37 position embedding of the 518 px checkpoints is resampled once, at load,
by timm's checkpoint filter (bicubic, antialiased): the same resampling the reference applies to the torch.hub model.

This module also holds the timm ViT machinery that ``siglip.py`` reuses (``TimmViTTeacher``, ``timm_teacher_factory``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

from ._weights import read_state_dict, resolve_weights
from .base import (
    STUDENT_GRID,
    Teacher,
    TeacherSpec,
    wants_random,
)


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


def timm_teacher_factory(
    spec: TeacherSpec, model_name: str, locate: Callable[[str, Optional[str]], Path], module: str = __name__
) -> Callable[..., Teacher]:
    """The registry factory of a timm ViT teacher; ``locate(name, path)`` finds its weights file.

    ``module`` is the module that registers it (shown as the teacher's source).
    """

    def factory(
        path: Optional[str] = None,
        resolution: Optional[int] = None,
        grid: Tuple[int, int] = STUDENT_GRID,
        allow_random: bool = False,
        trust_remote_code: bool = False,
        arch: Optional[Dict] = None,
    ) -> Teacher:
        # trust_remote_code only permits remote code; timm's model code is local, so there is nothing to permit.
        random = wants_random(spec.name, path, allow_random)
        weights = None if random else locate(spec.name, path)  # fail fast, before building a large model
        teacher = TimmViTTeacher(spec, model_name, resolution=resolution, grid=grid, arch=arch)
        if weights is not None:
            teacher.load_weights(weights)
        return teacher.freeze()

    factory.__name__ = factory.__qualname__ = "create_" + spec.name.replace("-", "_")
    factory.__module__ = module
    factory.__doc__ = f"Build the frozen {spec.name} teacher (timm {model_name})."
    return factory


def teacher_factory(spec: TeacherSpec, model_name: str, module: str = __name__) -> Callable[..., Teacher]:
    """The registry's hook (see ``catalog``): the factory of a built-in timm ViT teacher whose weights are found
    through ``spec.sources``."""

    def locate(teacher: str, path: Optional[str]) -> Path:
        return resolve_weights(teacher, path, spec.sources)

    return timm_teacher_factory(spec, model_name, locate, module=module)
