"""Aligner: the glue between a VLA, a frozen teacher, the projector(s) and the loss.

    aligner = Aligner.from_config(cfg).attach(vla)      # hooks layer(s), builds seeded projector(s)
    out = vla(input_ids=..., pixel_values=pv, labels=...)
    align = aligner(pixel_values=pv)                     # or aligner(targets=cached_teacher_features)
    (out.loss + align.loss).backward()                   # align.loss already carries cfg.coeff
    aligner.remove()

The coefficient is applied here and nowhere else. A trainable projector (``freeze_projector=False``) must be
handed to the optimizer by the caller: ``optimizer.add_param_group({"params": aligner.trainable_parameters()})``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from ._io import atomic_write
from .config import AlignConfig
from .hooks import VisualTokenHook
from .losses import get_loss
from .projector import build_projector, fingerprint
from .targets import as_source
from .teachers import Teacher
from .teachers.build import teacher_from_config
from .vla import layout
from .vla.layout import llm_hidden_size, student_grid, unwrap
from .vla.pixels import images_per_sample, split_images

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
PROJECTOR_NAME = "projector.safetensors"


@dataclass
class AlignOutput:
    loss: torch.Tensor  # coeff * sum of per-layer losses: add it to the action loss
    layer_losses: Dict[int, torch.Tensor] = field(default_factory=dict)  # unweighted, with grad
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)  # detached; `.item()` only when logging


class Aligner(nn.Module):
    def __init__(
        self,
        config: AlignConfig,
        teacher=None,
        *,
        target_width: Optional[int] = None,
        target_grid: Optional[Tuple[int, int]] = None,
    ):
        """``teacher`` gives each batch's targets (a target source, ``targets.py``): a ``Teacher`` (run live), a
        feature cache, or any other source; ``target_width`` (and ``target_grid``) instead say the caller passes
        ``targets`` itself."""
        super().__init__()
        self.config = config
        self.source = as_source(teacher, target_width=target_width, target_grid=target_grid)
        if hasattr(self.source, "configure"):
            self.source.configure(config)  # the run's teacher input and pooling
        self.device: Optional[torch.device] = None  # the VLA's, set by attach()
        self.num_images = 1  # images per sample the VLA is set up for (OpenVLA-OFT: num_images_in_input), by attach()
        self.saved_num_images: Optional[int] = None  # what a loaded sidecar's run used (load())
        self.projectors = nn.ModuleDict()
        self._hook: Optional[VisualTokenHook] = None
        self._loss_fn = get_loss(config.loss)

    @classmethod
    def from_config(cls, config: AlignConfig, *, grid: Tuple[int, int] = (16, 16), **teacher_kwargs) -> "Aligner":
        """Build the configured teacher from the registry (extra kwargs, e.g. ``arch``, go to its factory)."""
        # no device yet: an `auto` dtype is resolved in attach(), where the VLA's device is known
        return cls(config, teacher_from_config(config, grid=grid, **teacher_kwargs))

    # --- keys: projector per aligned layer (0 = the encoder output for target="encoder") ---
    @property
    def keys(self) -> Tuple[int, ...]:
        return (0,) if self.config.target == "encoder" else self.config.layers

    @property
    def teacher(self) -> Optional[Teacher]:
        """The live teacher, when targets come from one."""
        return getattr(self.source, "teacher", None)

    @property
    def teacher_width(self) -> int:
        if self.source is None:
            raise RuntimeError("This Aligner has no target source; build it with a teacher, a cache or target_width.")
        return self.source.width

    def attach(self, vla: nn.Module, only_with_grad: bool = False) -> "Aligner":
        """Hook ``vla`` and build (or check) the projector(s). Call after LoRA wrapping, before DDP or after.
        ``only_with_grad``: capture training forwards only (see ``VisualTokenHook``), as a finetune loop wants."""
        if self._hook is not None:
            raise RuntimeError("Aligner is already attached; call remove() first.")
        hook = VisualTokenHook(vla, self.config.layers, self.config.target, only_with_grad=only_with_grad)
        base = unwrap(vla)
        in_dim = layout.vision_backbone(base).embed_dim if self.config.target == "encoder" else llm_hidden_size(vla)
        grid = student_grid(vla)
        expected = self.source.grid if self.source is not None else None
        if expected is not None and grid is not None and tuple(expected) != grid:
            fix = f"build the teacher with grid={grid}" if self.teacher is not None else "rebuild them for this model"
            name = self.source.name
            raise ValueError(
                f"{name[:1].upper() + name[1:]} gives targets on a {tuple(expected)} grid but the VLA has a {grid} "
                f"visual token grid; {fix}."
            )
        if len(self.projectors) == 0:
            for key in self.keys:
                self.projectors[str(key)] = build_projector(
                    self.config.projector,
                    in_dim,
                    self.teacher_width,
                    hidden_dim=self.config.projector_dim,
                    seed=self.config.projector_seed,
                    frozen=self.config.freeze_projector,
                )
        else:
            self._check_projectors(in_dim)
        self.device = next(base.parameters()).device
        self.num_images = layout.num_images(base)
        self.projectors.to(self.device)
        if hasattr(self.source, "place"):
            dtype = None
            if self.config.teacher_dtype == "auto":
                dtype = self.config.resolved_teacher_dtype(self.device.type)
                logger.info("teacher_dtype auto: the teacher runs in %s on %s", dtype, self.device.type)
            self.source.place(self.device, dtype)
        self._hook = hook.attach()
        return self

    def _check_projectors(self, in_dim: int) -> None:
        if sorted(self.projectors.keys()) != sorted(str(k) for k in self.keys):
            raise ValueError(
                f"Projectors were saved for layers {sorted(self.projectors.keys())} but the config aligns "
                f"{list(self.keys)}; use the config saved with them."
            )
        for key, proj in self.projectors.items():
            first = next(m for m in proj.modules() if isinstance(m, (nn.Linear, nn.LayerNorm)))
            got_in = first.normalized_shape[0] if isinstance(first, nn.LayerNorm) else first.in_features
            last = [m for m in proj.modules() if isinstance(m, nn.Linear)][-1]
            if got_in != in_dim:
                raise ValueError(f"Projector for layer {key} takes width {got_in}, but the VLA gives {in_dim}.")
            if self.source is not None and last.out_features != self.source.width:
                raise ValueError(
                    f"Projector for layer {key} outputs width {last.out_features}, but {self.source.name} has width "
                    f"{self.source.width}; use the teacher it was trained with."
                )

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def train(self, mode: bool = True) -> "Aligner":
        super().train(mode)
        if self.config.freeze_projector:
            self.projectors.eval()
        return self

    def trainable_parameters(self) -> List[nn.Parameter]:
        """Projector parameters that need an optimizer (empty when the projector is frozen)."""
        return [p for p in self.projectors.parameters() if p.requires_grad]

    def fingerprint(self) -> str:
        return fingerprint([self.projectors])

    # --- the step ---
    def teacher_targets(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The target source's (B, n * T, D) targets for ``pixel_values`` (3, 6 or 6 x images channels): each image
        on its own, their T-token targets concatenated in the VLA's token order (n = 1 with ``images="primary"``)."""
        if self.source is None:
            raise RuntimeError("This Aligner has no target source; pass precomputed `targets`.")
        b = pixel_values.shape[0]
        images = split_images(pixel_values)
        n = images.shape[0] // b
        if self.config.images == "primary" and n > 1:
            images, n = images.view(b, n, *images.shape[1:])[:, 0], 1
        if getattr(self.source, "multi_view", False):  # the sample's n images together: (b, n * T, D)
            targets = self.source.targets(images, views=n)
        else:  # each image on its own: (b * n, T, D)
            targets = self.source.targets(images)
        return targets.reshape(b, -1, targets.shape[-1])

    def _aligned_tokens(self, hidden: torch.Tensor, num_images: int) -> torch.Tensor:
        """The captured visual tokens this config aligns: all of them, or the first image's with ``primary``."""
        from .vla.pixels import image_tokens

        return image_tokens(hidden, num_images, self.config.images)

    def forward(
        self, pixel_values: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None
    ) -> AlignOutput:
        if self._hook is None:
            raise RuntimeError("Aligner is not attached to a VLA; call aligner.attach(vla) first.")
        captured = self._hook.pop()
        missing = [k for k in self.keys if k not in captured]
        if missing:
            raise RuntimeError(
                f"No visual-token states captured for layer(s) {missing}: run the VLA forward with pixel_values "
                "(a multimodal forward) after attach() and before calling the aligner."
            )
        if targets is None:
            if pixel_values is None:
                raise ValueError("Pass the batch's pixel_values (live teacher) or precomputed teacher targets.")
            targets = self.teacher_targets(pixel_values)  # the source moves what it needs (a cache hashes on CPU)
        targets = targets.to(self.device, non_blocking=True)  # once, not per layer
        num_images = images_per_sample(pixel_values) if pixel_values is not None else self.num_images
        total = None
        layer_losses: Dict[int, torch.Tensor] = {}
        metrics: Dict[str, torch.Tensor] = {}
        for key in self.keys:
            hidden = self._aligned_tokens(captured[key], num_images)
            if hidden.shape[1] != targets.shape[1]:
                n = 1 if self.config.images == "primary" else num_images
                per_image = hidden.shape[1] // max(n, 1)
                side = math.isqrt(per_image)
                raise ValueError(
                    f"The VLA has {hidden.shape[1]} visual tokens ({n} image(s) of {per_image}, a {side}x{side} grid "
                    f"each) but the teacher targets have {targets.shape[1]}; build the teacher for the student's grid "
                    "and feed it the same images (OpenVLA-OFT: --num_images_in_input matches the data)."
                )
            proj = self.projectors[str(key)]
            student = proj(hidden.to(next(proj.parameters()).dtype))
            loss, m = self._loss_fn(student, targets, temperature=self.config.ntxent_temperature)
            layer_losses[key] = loss
            name = "encoder" if self.config.target == "encoder" else f"layer{key}"
            metrics[f"align/cos_{name}"] = m["cos"]
            metrics[f"align/loss_{name}"] = loss.detach()
            total = loss if total is None else total + loss
        weighted = self.config.coeff * total
        metrics["align/loss"] = weighted.detach()
        return AlignOutput(loss=weighted, layer_losses=layer_losses, metrics=metrics)

    # --- persistence: config.json + projector.safetensors ---
    def save(self, directory: Union[str, Path]) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.projectors.state_dict().items()}
        # One metadata entry: safetensors stores metadata in a hash map, so several keys would come out in a random
        # order and identical projectors would not give identical files.
        width = self.source.width if self.source is not None else None
        info = {"format": 1, "teacher_width": width, "num_images": self.num_images}
        meta = {"openvla-align": json.dumps(info, sort_keys=True)}
        atomic_write(directory / PROJECTOR_NAME, lambda tmp: save_file(state, str(tmp), metadata=meta))
        atomic_write(directory / CONFIG_NAME, lambda tmp: tmp.write_text(self.config.to_json()))
        return directory

    @classmethod
    def load(
        cls,
        directory: Union[str, Path],
        teacher=None,
        *,
        target_width: Optional[int] = None,
        **teacher_kwargs,
    ) -> "Aligner":
        """Restore config and projector(s) saved by ``save``; the teacher is rebuilt from the config unless a target
        source (``teacher``: a teacher or a cache) is given, or ``target_width`` says targets come precomputed."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path, proj_path = directory / CONFIG_NAME, directory / PROJECTOR_NAME
        for p in (cfg_path, proj_path):
            if not p.is_file():
                raise FileNotFoundError(
                    f"Alignment state incomplete: {p} is missing (expected {CONFIG_NAME} + {PROJECTOR_NAME})."
                )
        try:
            config = AlignConfig.from_dict(json.loads(cfg_path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"{cfg_path} is not a valid openvla-align config: {exc}") from exc
        try:
            state = load_file(str(proj_path))
            with safe_open(str(proj_path), framework="pt") as f:
                info = json.loads((f.metadata() or {}).get("openvla-align", "{}"))
        except Exception as exc:
            raise ValueError(
                f"{proj_path} is corrupt or truncated ({exc}); restore it from a good checkpoint."
            ) from exc
        if teacher is not None or target_width is not None:
            aligner = cls(config, teacher, target_width=target_width)
        else:
            aligner = cls.from_config(config, **teacher_kwargs)
        aligner.load_projectors(state)
        aligner.saved_num_images = info.get("num_images")  # None for sidecars written before multi-image support
        return aligner

    def load_projectors(self, state: Dict[str, torch.Tensor]) -> None:
        """Build projectors shaped like ``state`` and load it (keys ``<layer>.net.<i>.<param>``)."""
        self.projectors = nn.ModuleDict()
        for key in self.keys:
            sub = {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == str(key)}
            if not sub:
                raise ValueError(
                    f"Saved projector state has no weights for layer {key}; saved keys: {sorted(state)[:4]}..."
                )
            # weight matrices (plain, or the `original` of a parametrized one), in module order
            weights = [(k, v) for k, v in sub.items() if v.ndim == 2 and k.rsplit(".", 1)[-1] in ("weight", "original")]
            linears = sorted(((int(k.split(".")[1]), v) for k, v in weights), key=lambda t: t[0])
            in_dim, out_dim = linears[0][1].shape[1], linears[-1][1].shape[0]
            proj = build_projector(
                self.config.projector,
                in_dim,
                out_dim,
                hidden_dim=self.config.projector_dim,
                seed=self.config.projector_seed,
                frozen=self.config.freeze_projector,
            )
            try:
                proj.load_state_dict(sub)
            except RuntimeError as exc:
                raise ValueError(
                    f"Saved projector for layer {key} does not match config {self.config.projector!r}: {exc}"
                ) from exc
            self.projectors[str(key)] = proj
        if self.source is not None:
            out_dim = [m for m in self.projectors.modules() if isinstance(m, nn.Linear)][-1].out_features
            if out_dim != self.source.width:
                raise ValueError(
                    f"Saved projector outputs width {out_dim} but {self.source.name} has width {self.source.width}; "
                    "load it with the teacher it was trained with."
                )
