"""The finetune-plugin protocol the patched ``vla-scripts/finetune.py`` drives.

The patch (``patches/``) adds a generic mechanism to the stock script, not an openvla-align import:

1. Discover entry points of group ``openvla.finetune_plugins``; each loads a plugin *class* with a class attribute
   ``name`` (the config field, e.g. ``align``) and ``config_cls`` (a draccus-compatible dataclass). Each becomes a
   field of ``FinetuneConfig``, so ``--align.<field>`` flags and ``--config_path`` YAML work and ``--help`` lists them.
2. ``plugin = cls(cfg.<name>)`` for every plugin (sorted by name); then, in order, for each:
   - ``setup(cfg, is_main_process)`` before the model loads (check datasets, prepare weights on rank 0);
   - ``on_model_ready(vla, cfg) -> list of extra trainable parameters`` after the LoRA wrap, before DDP;
   - ``on_optimizer(optimizer)`` (optional; OpenVLA-OFT's script, which saves no optimizer state) once the extra
     parameters joined the optimizer, so a plugin can save and restore their state;
   - ``loss(vla, batch, output, step) -> (term or None, metrics)`` inside the autocast block, after the forward;
     the script adds the term to its loss and logs the metrics with its own logger;
   - ``on_save(save_dir, is_main_process)`` beside every adapter the script saves (``save_dir`` is the staging
     directory of an atomic save; only the main process writes); ``on_resume(save_dir)``;
   - ``on_merged(merged_dir)`` (optional) on the main process after a merged model is written, before it is
     renamed into place;
   - ``on_end()`` when training stops.
A plugin does one job; a disabled one changes nothing the script computes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..env import warn_if_broken

# Every plugin module imports this one, and the patched finetune.py imports the plugins: warn there, where a broken
# stack costs a training run.
warn_if_broken()

ENTRY_POINT_GROUP = "openvla.finetune_plugins"


class FinetunePlugin:
    """Base class with no-op lifecycle points; subclasses set ``name`` and ``config_cls``."""

    name: str = ""
    config_cls: type = object

    def __init__(self, config: Any):
        self.config = config

    def setup(self, cfg: Any, is_main_process: bool = True) -> None:
        return None

    def on_model_ready(self, vla: nn.Module, cfg: Any = None) -> List[nn.Parameter]:
        return []

    def on_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        return None

    def loss(self, vla: nn.Module, batch: Dict[str, Any], output: Any, step: int) -> Tuple[Optional[Tensor], dict]:
        return None, {}

    def on_save(self, save_dir: Path, is_main_process: bool = True) -> None:
        return None

    def on_merged(self, merged_dir: Path) -> None:
        return None

    def on_resume(self, save_dir: Path) -> None:
        return None

    def on_end(self) -> None:
        return None


def distributed():
    """``torch.distributed`` when a process group is up, else None."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed
    return None
