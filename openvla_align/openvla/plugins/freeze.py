"""The ``freeze`` plugin: the paper's Freeze baseline (no gradient for the vision backbone), with or without
alignment."""

import logging
import warnings
from dataclasses import dataclass
from typing import Any, List

import torch.nn as nn

from ...config import option
from ...vla import layout
from ...vla.layout import unwrap
from .base import FinetunePlugin

logger = logging.getLogger(__name__)


@dataclass
class FreezeConfig:
    vision: bool = option(
        False,
        "The paper's Freeze baseline: no gradient for any vision-backbone parameter (LoRA ones included); "
        "with or without --align.enabled.",
    )


def freeze_vision(vla: nn.Module) -> int:
    """Every parameter of the pretrained vision towers, LoRA adapters included, loses its gradient (before the script
    builds its optimizer from the parameters that require one). Conditioning layers added on top of the towers
    (OFT's FiLM ``scale``/``shift``) are new and stay trainable: freezing them would switch FiLM off. Returns how many
    tensors were frozen."""
    base = unwrap(vla)
    family = layout.family(base)
    keep = {id(p) for p in family.conditioning_parameters(base)}
    frozen = [p for p in base.vision_backbone.parameters() if p.requires_grad and id(p) not in keep]
    for param in frozen:
        param.requires_grad_(False)
    kept = f"; {len(keep)} FiLM tensors stay trainable" if keep else ""
    logger.info("freeze: %d vision-backbone tensors frozen%s", len(frozen), kept)
    return len(frozen)


class FreezePlugin(FinetunePlugin):
    name = "freeze"
    config_cls = FreezeConfig

    def setup(self, cfg: Any, is_main_process: bool = True) -> None:
        if getattr(getattr(cfg, "align", None), "freeze_vision", False):  # the old spelling
            warnings.warn(
                "--align.freeze_vision is now --freeze.vision (in a recipe: `freeze:` / `vision: true`); the old "
                "spelling still works and will be removed in a later release.",
                FutureWarning,
                stacklevel=2,
            )
            self.config.vision = True

    def on_model_ready(self, vla: nn.Module, cfg: Any = None) -> List[nn.Parameter]:
        if self.config.vision:
            freeze_vision(vla)
        return []
