"""openvla-align's finetune plugins, one job each, all in the entry-point group the patched finetune.py discovers:

- ``align``      Visual Representation Alignment (``--align.*``);
- ``align2``     a second alignment term with its own teacher, layers, projector and loss (``--align2.*``);
- ``datasets``   the paper's RLDS datasets registered; the dataset checked before the model loads (``--datasets.*``);
- ``freeze``     the paper's Freeze baseline (``--freeze.vision``);
- ``norm_stats`` the run's dataset statistics folded into every merged model's ``config.json`` (``--norm_stats.*``).

The protocol is in ``base``. A plugin's config dataclass module has no ``from __future__ import annotations``:
draccus 0.8, OpenVLA's pin, cannot parse string annotations.
"""

from .align import SIDECAR_DIR, AlignPlugin, SecondAlignPlugin, load_reference_projector
from .base import ENTRY_POINT_GROUP, FinetunePlugin
from .datasets import DatasetsConfig, DatasetsPlugin
from .freeze import FreezeConfig, FreezePlugin, freeze_vision
from .norm_stats import NormStatsConfig, NormStatsPlugin

# as the script orders them: by name
PLUGINS = (AlignPlugin, SecondAlignPlugin, DatasetsPlugin, FreezePlugin, NormStatsPlugin)

__all__ = [
    "ENTRY_POINT_GROUP",
    "PLUGINS",
    "SIDECAR_DIR",
    "AlignPlugin",
    "DatasetsConfig",
    "DatasetsPlugin",
    "FinetunePlugin",
    "FreezeConfig",
    "FreezePlugin",
    "NormStatsConfig",
    "NormStatsPlugin",
    "SecondAlignPlugin",
    "freeze_vision",
    "load_reference_projector",
]
