"""The finetune-plugin protocol the patched ``vla-scripts/finetune.py`` drives, and openvla-align's plugin.

The patch (``patches/``) adds a generic mechanism to the stock script, not an openvla-align import:

1. Discover entry points of group ``openvla.finetune_plugins``; each loads a plugin *class* with a class attribute
   ``name`` (the config field, e.g. ``align``) and ``config_cls`` (a draccus-compatible dataclass). Each becomes a
   field of ``FinetuneConfig``, so ``--align.<field>`` flags and ``--config_path`` YAML work and ``--help`` lists them.
2. ``plugin = cls(cfg.<name>)`` after parsing; then, in order:
   - ``setup(cfg, is_main_process)`` before the model loads (check datasets, prepare weights on rank 0);
   - ``on_model_ready(vla, cfg) -> list of extra trainable parameters`` after the LoRA wrap, before DDP;
   - ``loss(vla, batch, output, step) -> (term or None, metrics)`` inside the autocast block, after the forward;
     the script adds the term to its loss and logs the metrics with its own logger;
   - ``on_save(save_dir, is_main_process)`` beside every adapter the script saves (``save_dir`` is the staging
     directory of an atomic save; only the main process writes); ``on_resume(save_dir)``;
   - ``on_merged(merged_dir)`` (optional) on the main process after a merged model is written, before it is
     renamed into place;
   - ``on_end()`` when training stops.
A disabled plugin changes nothing the script computes. The align plugin, enabled or not, still registers the
paper's datasets and folds the run's dataset statistics into every merged model's ``config.json``, so plain-SFT and
Freeze baselines answer ``predict_action(..., unnorm_key=...)`` like aligned runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..aligner import CONFIG_NAME, Aligner
from ..config import AlignConfig
from ..vla.layout import check_layers
from .env import warn_if_broken
from .merge import STATS_NAME, fold_norm_stats

logger = logging.getLogger(__name__)

# This module is what the patched finetune.py imports: warn there, where a broken stack costs a training run.
warn_if_broken()

ENTRY_POINT_GROUP = "openvla.finetune_plugins"
SIDECAR_DIR = "align"


class FinetunePlugin:
    """Base class with no-op lifecycle points; subclasses set ``name`` and ``config_cls``."""

    name: str = ""
    config_cls: type = object

    def __init__(self, config: Any):
        self.config = config

    @property
    def enabled(self) -> bool:
        return bool(getattr(self.config, "enabled", False))

    def setup(self, cfg: Any, is_main_process: bool = True) -> None:
        return None

    def on_model_ready(self, vla: nn.Module, cfg: Any) -> List[nn.Parameter]:
        return []

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


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed
    return None


def _text_depth(vla_path) -> Optional[int]:
    """The LLM depth from a local checkpoint's ``config.json`` (None when the path is a hub id or has no config)."""
    config = Path(str(vla_path)) / "config.json" if vla_path else None
    if config is None or not config.is_file():
        return None
    try:
        text = json.loads(config.read_text()).get("text_config") or {}
        return int(text["num_hidden_layers"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # not an OpenVLA config: attach() reports what is wrong once the model is loaded


class AlignPlugin(FinetunePlugin):
    """Visual Representation Alignment inside the stock finetune loop."""

    name = "align"
    config_cls = AlignConfig

    def __init__(self, config: AlignConfig, teacher: Optional[nn.Module] = None):
        super().__init__(config)
        self.teacher = teacher  # given: use it; None: build the configured one from the registry
        self.aligner: Optional[Aligner] = None
        self.unnorm_keys: List[str] = []  # dataset statistics folded into merged models' config.json
        self.is_main_process = True
        self.dataset_name: Optional[str] = None
        self.saved = False
        self.cache = None  # TeacherCache when `teacher_cache` is set: targets are read, no teacher runs

    def setup(self, cfg: Any, is_main_process: bool = True) -> None:
        """Register the paper's datasets (also for plain-SFT runs on them; names upstream lacks, nothing else
        changes), and, when alignment is on, check the requested dataset exists before the 7B model loads."""
        from .datasets import check_dataset, register_paper_datasets

        self.is_main_process = is_main_process
        self.dataset_name = getattr(cfg, "dataset_name", None)
        added = register_paper_datasets()
        if added and is_main_process:
            logger.info("registered the paper's RLDS datasets %s", added)
        if not self.enabled:
            return
        # Everything that can be checked without the VLA fails here, before the 7B model loads.
        check_dataset(cfg.data_root_dir, cfg.dataset_name)
        depth = _text_depth(getattr(cfg, "vla_path", None))
        if depth is not None:
            check_layers(depth, self.config.layers)  # attach() checks it again on the loaded model
        if self.config.teacher_cache:
            self.cache = self._open_cache(cfg)
        elif self.teacher is None:
            self.teacher = self._build_teacher()

    def _open_cache(self, cfg: Any):
        from ..cache.store import open_for_training

        if getattr(cfg, "image_aug", False):
            raise ValueError(
                "--align.teacher_cache holds the teacher's features of the unaugmented frames, but --image_aug is on: "
                "the colour jitter (brightness, contrast, saturation, hue) changes what the teacher would see, which "
                "no transform of cached features reproduces. Train with --image_aug false, or drop "
                "--align.teacher_cache to run the teacher live on the augmented frames."
            )
        return open_for_training(self.config, getattr(cfg, "dataset_name", None), getattr(cfg, "data_root_dir", None))

    def _build_teacher(self) -> nn.Module:
        """Rank 0 resolves (and would convert/cache) the teacher weights first, then the other ranks read them."""
        dist = _dist()
        rank = dist.get_rank() if dist else 0
        if dist and rank != 0:
            dist.barrier()
        try:
            teacher = Aligner.from_config(self.config).teacher
        finally:
            if dist and rank == 0:
                dist.barrier()  # reached on failure too, so the other ranks fail on their own instead of hanging
        return teacher

    def on_model_ready(self, vla: nn.Module, cfg: Any = None) -> List[nn.Parameter]:
        if self.config.freeze_vision:
            self.freeze_vision(vla)
        if not self.enabled:
            return []
        if self.cache is not None:
            aligner = Aligner(self.config, self.cache)
        else:
            if self.teacher is None:  # `setup` builds it; callers driving the plugin by hand may skip that
                self.teacher = self._build_teacher()
            aligner = Aligner(self.config, self.teacher)
        self.aligner = aligner.attach(vla)
        self.check_identical_projectors()
        return self.aligner.trainable_parameters()

    @staticmethod
    def freeze_vision(vla: nn.Module) -> int:
        """The paper's Freeze baseline: every vision-backbone parameter, LoRA adapters included, loses its gradient
        (before the script builds its optimizer from the parameters that require one). Returns how many."""
        from ..vla.layout import unwrap

        frozen = [p for p in unwrap(vla).vision_backbone.parameters() if p.requires_grad]
        for param in frozen:
            param.requires_grad_(False)
        logger.info("freeze_vision: %d vision-backbone tensors frozen", len(frozen))
        return len(frozen)

    def check_identical_projectors(self) -> str:
        """Every rank must hold byte-identical projectors; a mismatch stops the job before step 0."""
        fp = self.aligner.fingerprint()
        dist = _dist()
        if dist:
            all_fps: List[Optional[str]] = [None] * dist.get_world_size()
            dist.all_gather_object(all_fps, fp)
            if len(set(all_fps)) != 1:
                raise RuntimeError(
                    f"Alignment projectors differ across ranks (hashes {all_fps}); every rank must build them from "
                    f"the same projector_seed ({self.config.projector_seed}) and openvla-align version."
                )
        logger.info("alignment projector sha256 %s", fp)
        return fp

    def loss(self, vla: nn.Module, batch: Dict[str, Any], output: Any, step: int) -> Tuple[Optional[Tensor], dict]:
        if self.aligner is None:
            return None, {}
        # One path for a live teacher and a cache: the target source takes the loader's batch as it is (a cache
        # hashes its keys on the CPU, with no device sync, and copies one batch of targets out of its shards).
        out = self.aligner(pixel_values=batch["pixel_values"])
        return out.loss, out.metrics

    def on_save(self, save_dir: Path, is_main_process: bool = True) -> None:
        if not is_main_process:
            return
        if self.aligner is not None:
            self.aligner.save(Path(save_dir) / SIDECAR_DIR)
        self.saved = True

    def on_merged(self, merged_dir: Path) -> None:
        """Fold the run's ``dataset_statistics.json`` into the merged model's ``config.json`` (``norm_stats``), so
        ``predict_action(..., unnorm_key=...)`` works on the merged model as saved -- aligned or not (the SFT and
        Freeze baselines are evaluated the same way)."""
        if not (Path(merged_dir) / STATS_NAME).is_file():
            return
        self.unnorm_keys = fold_norm_stats(merged_dir)

    def on_resume(self, save_dir: Path) -> None:
        """Restore the projector(s) saved beside an adapter; a sidecar for another setup is refused unchanged."""
        if self.aligner is None:
            return
        sidecar = Path(save_dir) / SIDECAR_DIR
        saved = Aligner.load(sidecar, self.aligner.source)
        mismatched = [
            f"{name}: saved {getattr(saved.config, name)!r}, now {getattr(self.config, name)!r}"
            for name in ("teacher", "layers", "target", "projector", "projector_dim", "loss")
            if getattr(saved.config, name) != getattr(self.config, name)
        ]
        if mismatched:
            raise ValueError(
                f"Cannot resume alignment from {sidecar / CONFIG_NAME}: " + "; ".join(mismatched) + ". Resume with the "
                "settings the run was started with, or start a new run."
            )
        with torch.no_grad():  # in place: a trainable projector's parameters are already in the optimizer
            self.aligner.projectors.load_state_dict(saved.projectors.state_dict())
        self.check_identical_projectors()

    def on_end(self) -> None:
        if self.aligner is not None:
            self.aligner.remove()
        if not self.is_main_process:
            return
        if self.unnorm_keys:
            keys = ", ".join(self.unnorm_keys)
            print(
                f"[align] norm_stats are in the merged model's config.json: use unnorm_key={self.unnorm_keys[0]!r} "
                f"(available: {keys})"
            )
        elif self.saved:
            print(
                "[align] adapters only (no merged model): merge one with `openvla-align merge <checkpoint dir>`; "
                f"it folds the dataset statistics into config.json (unnorm_key={self.dataset_name!r})"
            )


def load_reference_projector(path: Path, layer: int = 16) -> Dict[str, torch.Tensor]:
    """The reference implementation's ``alignment_projector/pytorch_model.bin`` as our projector state (keys
    ``<layer>.net.<i>.*``). Read with ``weights_only=True``; nothing but tensors is ever unpickled."""
    path = Path(path)
    if path.is_dir():
        path = path / "pytorch_model.bin"
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"Cannot read {path} as a tensor-only state dict ({exc}).") from exc
    if not isinstance(state, dict) or not state or not all(k.startswith("net.") for k in state):
        raise ValueError(f"{path} is not a reference alignment projector (expected keys net.0.*, net.1.*, ...).")
    return {f"{layer}.{k}": v for k, v in state.items()}
