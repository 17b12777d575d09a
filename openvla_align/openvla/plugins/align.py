"""The ``align`` plugin: Visual Representation Alignment inside the stock finetune loop, and nothing else (the
paper's datasets, the Freeze baseline and the merged models' statistics are their own plugins)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..._io import atomic_write
from ...aligner import CONFIG_NAME, PROJECTOR_NAME, Aligner
from ...config import AlignConfig
from ...losses import get_loss
from ...pooling import get_pooling
from ...projector import check_kind
from ...targets.inputs import get_teacher_input
from ...vla.layout import check_layers
from ..env import warn_oft_attention
from ..hosts import host_of
from .base import FinetunePlugin, distributed

logger = logging.getLogger(__name__)

SIDECAR_DIR = "align"  # the `align` plugin's; a plugin's sidecar is the folder of its name (`align2/`)
# Settings a resumed run must share with the run that wrote the sidecar.
RESUME_FIELDS = (
    "teacher",
    "layers",
    "target",
    "projector",
    "projector_dim",
    "freeze_projector",
    "loss",
    "images",
    "teacher_input",
    "pooling",
    "pooling_pos_embed",
)
OPTIMIZER_NAME = "projector_optimizer.safetensors"  # a trainable projector's optimizer state, beside the projector


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
    """Visual Representation Alignment: the hook, the frozen projector and the loss term; a sidecar per save."""

    name = "align"
    config_cls = AlignConfig

    def __init__(self, config: AlignConfig, teacher: Optional[nn.Module] = None):
        super().__init__(config)
        self.num_images: Optional[int] = None  # images per sample the host script feeds the VLA (setup)
        self.teacher = teacher  # given: use it; None: build the configured one from the registry
        self.aligner: Optional[Aligner] = None
        self.cache = None  # TeacherCache when `teacher_cache` is set: targets are read, no teacher runs
        self.optimizer = None  # the host's, when it hands it over (on_optimizer): a trainable projector's state

    def setup(self, cfg: Any, is_main_process: bool = True) -> None:
        """Everything that can be checked without the VLA fails here, before the 7B model loads."""
        host = host_of(cfg)
        if host.name == "openvla-oft" and is_main_process:
            warn_oft_attention()
        if not self.config.enabled:
            return
        get_loss(self.config.loss)  # the registries' own clear errors, before the model loads
        check_kind(self.config.projector)
        get_pooling(self.config.pooling)
        get_teacher_input(self.config.teacher_input)
        depth = _text_depth(getattr(cfg, "vla_path", None))
        if depth is not None:
            check_layers(depth, self.config.layers)  # attach() checks it again on the loaded model
        self.num_images = host.images(cfg)
        resume_dir = host.resume_dir(cfg)
        if resume_dir is not None:
            self.check_sidecar(resume_dir / self.name, self.num_images)
        if self.config.teacher_cache:
            self.cache = self._open_cache(cfg)
        elif self.teacher is None:
            self.teacher = self._build_teacher()
        if getattr(self.teacher, "multi_view", False) and self.num_images > 1 and self.config.images == "primary":
            logger.warning(
                "--align.images primary with the multi-view teacher %s: it sees the third-person camera alone, not "
                "the sample's %d cameras together (Spatial Forcing feeds them all: --align.images all).",
                self.config.teacher,
                self.num_images,
            )

    def _open_cache(self, cfg: Any):
        from ...targets.cache import open_for_training

        if getattr(cfg, "image_aug", False):
            raise ValueError(
                "--align.teacher_cache holds the teacher's features of the unaugmented frames, but --image_aug is on: "
                "the colour jitter (brightness, contrast, saturation, hue) changes what the teacher would see, which "
                "no transform of cached features reproduces. Train with --image_aug false, or drop "
                "--align.teacher_cache to run the teacher live on the augmented frames."
            )
        views = 1 if self.config.images == "primary" else self.num_images  # images per sample the run aligns
        return open_for_training(
            self.config, getattr(cfg, "dataset_name", None), getattr(cfg, "data_root_dir", None), views=views
        )

    def _build_teacher(self) -> nn.Module:
        """Rank 0 resolves (and would convert/cache) the teacher weights first, then the other ranks read them."""
        dist = distributed()
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
        if not self.config.enabled:
            return []
        if self.cache is not None:
            aligner = Aligner(self.config, self.cache)
        else:
            if self.teacher is None:  # `setup` builds it; callers driving the plugin by hand may skip that
                self.teacher = self._build_teacher()
            aligner = Aligner(self.config, self.teacher)
        # Training forwards only: validation and OFT's diffusion sampling run the VLA without autograd
        self.aligner = aligner.attach(vla, only_with_grad=True)
        self.check_identical_projectors()
        return self.aligner.trainable_parameters()

    def check_identical_projectors(self) -> str:
        """Every rank must hold byte-identical projectors; a mismatch stops the job before step 0."""
        fp = self.aligner.fingerprint()
        dist = distributed()
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
        if self.name == SIDECAR_DIR:
            return out.loss, out.metrics
        return out.loss, {f"{self.name}/{k.split('/', 1)[1]}": v for k, v in out.metrics.items()}

    def on_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The host's optimizer, once the plugins' parameters joined it (OpenVLA-OFT's script, which saves no optimizer
        state of its own): a trainable projector's optimizer state is then saved in the sidecar and restored on
        resume. OpenVLA's script keeps the whole optimizer in its ``trainer_state.pt`` and does not call this."""
        self.optimizer = optimizer

    def _trainable(self) -> Dict[str, nn.Parameter]:
        return {n: p for n, p in self.aligner.projectors.named_parameters() if p.requires_grad}

    def on_save(self, save_dir: Path, is_main_process: bool = True) -> None:
        if not (is_main_process and self.aligner is not None):
            return
        sidecar = self.aligner.save(Path(save_dir) / self.name)
        trainable = self._trainable()
        if self.optimizer is not None and trainable:
            from safetensors.torch import save_file

            state = {
                f"{name}/{key}": torch.as_tensor(value).detach().cpu().contiguous()
                for name, param in sorted(trainable.items())
                for key, value in sorted(self.optimizer.state.get(param, {}).items())
            }
            atomic_write(sidecar / OPTIMIZER_NAME, lambda tmp: save_file(state, str(tmp)))

    def check_sidecar(self, sidecar: Path, num_images: Optional[int]) -> None:
        """A resumed run must use the sidecar's settings and image count; read from its two small files only, so it
        fails before the model loads. A missing sidecar is reported too (an SFT checkpoint cannot resume alignment)."""
        config_path, projector_path = sidecar / CONFIG_NAME, sidecar / PROJECTOR_NAME
        if not (config_path.is_file() and projector_path.is_file()):
            raise FileNotFoundError(
                f"Cannot resume alignment: {sidecar} lacks {CONFIG_NAME} and {PROJECTOR_NAME} (the checkpoint was "
                "written without --align.enabled true, or by another tool). Resume it without --align.enabled, or "
                "start a new aligned run."
            )
        try:
            saved = AlignConfig.from_dict(json.loads(config_path.read_text()))
            from safetensors import safe_open

            with safe_open(str(projector_path), framework="pt") as f:
                info = json.loads((f.metadata() or {}).get("openvla-align", "{}"))
        except Exception as exc:
            raise ValueError(f"{sidecar} is corrupt or truncated ({exc}); resume from an earlier checkpoint.") from exc
        mismatched = [
            f"{name}: saved {getattr(saved, name)!r}, now {getattr(self.config, name)!r}"
            for name in RESUME_FIELDS
            if getattr(saved, name) != getattr(self.config, name)
        ]
        saved_images = info.get("num_images")
        if saved_images is not None and num_images is not None and saved_images != num_images:
            mismatched.append(f"images per sample: saved {saved_images}, now {num_images} (--num_images_in_input)")
        if mismatched:
            raise ValueError(
                f"Cannot resume alignment from {config_path}: " + "; ".join(mismatched) + ". Resume with the "
                "settings the run was started with, or start a new run."
            )

    def on_resume(self, save_dir: Path) -> None:
        """Restore the projector(s) saved beside an adapter; a sidecar for another setup is refused unchanged."""
        if self.aligner is None:
            return
        sidecar = Path(save_dir) / self.name
        self.check_sidecar(sidecar, self.aligner.num_images)
        saved = Aligner.load(sidecar, self.aligner.source)
        with torch.no_grad():  # in place: a trainable projector's parameters are already in the optimizer
            self.aligner.projectors.load_state_dict(saved.projectors.state_dict())
        self._restore_optimizer_state(sidecar)
        self.check_identical_projectors()

    def _restore_optimizer_state(self, sidecar: Path) -> None:
        trainable = self._trainable()
        if self.optimizer is None or not trainable:
            return
        path = sidecar / OPTIMIZER_NAME
        if not path.is_file():
            logger.warning(
                "%s has no optimizer state for the trainable projector (written by an older openvla-align?): its "
                "AdamW moments start from zero.",
                sidecar,
            )
            return
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:
            raise ValueError(f"{path} is corrupt or truncated ({exc}); resume from an earlier checkpoint.") from exc
        restored: Dict[nn.Parameter, Dict[str, Tensor]] = {}
        for key, value in state.items():
            name, _, field = key.rpartition("/")
            if name not in trainable:
                raise ValueError(f"{path} holds optimizer state for {name!r}, which this projector does not have.")
            param = trainable[name]
            restored.setdefault(param, {})[field] = value if field == "step" else value.to(param.device)
        for param, entries in restored.items():
            self.optimizer.state[param] = entries
        logger.info("restored the projector's optimizer state (%d tensors) from %s", len(state), path)

    def on_end(self) -> None:
        if self.aligner is not None:
            self.aligner.remove()


class SecondAlignPlugin(AlignPlugin):
    """A second alignment term beside ``align``, with its own teacher, layers, projector, loss and coefficient
    (``--align2.*``), e.g. C-RADIOv3 at layer 16 (BlindVLA) and VGGT at layer 24 (Spatial Forcing) at once. Its hook,
    projector and sidecar (``align2/``) are its own; its metrics are logged as ``align2/*``."""

    name = "align2"


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
