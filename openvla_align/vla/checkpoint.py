"""Load any OpenVLA checkpoint for the tools, and turn (prompt, image) into a batch.

A checkpoint is a directory: a merged/base OpenVLA model loaded with the stock AutoClasses and
``trust_remote_code=True`` (its processor comes along), optionally with a PEFT LoRA adapter on top. Checkpoints of
other model classes with OpenVLA's layout load through a loader registered for their ``config.json`` ``model_type``:
an entry point of the group ``openvla_align.checkpoint_loaders`` naming ``module:function`` (imported only when
such a checkpoint is loaded; the package's tiny models register theirs so), or :func:`register_loader` at run time.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from .. import dtypes

# config.json model_type -> "module:function" returning (model, tokenizer, image_size) for
# ``function(path, attn_implementation)``; OpenVLA's own class needs none. Registered at run time; entry points of
# LOADER_GROUP add to these when looked up.
LOADERS: Dict[str, str] = {}
LOADER_GROUP = "openvla_align.checkpoint_loaders"
IGNORE_INDEX = -100
IMAGE_CHOICES = ("all", "primary")


@dataclass(frozen=True)
class CameraView:
    """How the diagnostics feed a multi-camera model (OpenVLA-OFT) and which visual tokens they read: the model set
    to ``num_images`` cameras (None: as it loads), each diagnostic image shown to every camera, and the tokens of
    ``"all"`` cameras or of the ``"primary"`` (third-person) one. The default is every model's plain behaviour."""

    num_images: Optional[int] = None
    images: str = "all"

    def __post_init__(self):
        if self.images not in IMAGE_CHOICES:
            raise ValueError(f"--images {self.images!r}: choose one of {IMAGE_CHOICES}.")
        if self.num_images is not None and self.num_images < 1:
            raise ValueError(f"--num-images {self.num_images}: a model takes at least 1 image per sample.")

    @property
    def is_default(self) -> bool:
        return self == CameraView()


def register_loader(model_type: str, target: str) -> None:
    """Load checkpoints whose config.json says ``model_type`` with ``target`` ("module:function")."""
    prior = LOADERS.get(model_type)
    if prior is not None and prior != target:
        raise ValueError(f"model_type {model_type!r} already loads with {prior}.")
    LOADERS[model_type] = target


def registered_loaders() -> Dict[str, str]:
    """``{model_type: "module:function"}``: the installed packages' entry points, then run-time registrations."""
    from .._plugins import entry_point_targets

    return {**entry_point_targets(LOADER_GROUP), **LOADERS}


def resolve_device_dtype(device: Optional[str], dtype: Optional[str]) -> tuple:
    """(device, dtype) with the probes' defaults: CUDA when available, bfloat16 on CUDA and float32 on the CPU."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, dtype or dtypes.resolve("auto", torch.device(device).type)


def release_memory() -> None:
    """Free a dropped model's memory before the next model of a comparison loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def vqa_prompt(question: str) -> str:
    """OpenVLA's (PurePromptBuilder) single-turn format."""
    return f"In: {question}\nOut:"


def action_prompt(instruction: str) -> str:
    """The prompt OpenVLA is fine-tuned and queried with for an action (``predict_action``'s, before its "▁")."""
    return vqa_prompt(f"What action should the robot take to {instruction}?")


@dataclass
class LoadedVLA:
    """A VLA ready for diagnostics plus what it needs to build batches."""

    model: nn.Module
    tokenizer: Any
    image_size: int
    path: str
    adapter: Optional[str] = None
    _processor: Any = None  # the checkpoint's own PrismaticProcessor, when it has one
    num_images: int = 1  # camera images per sample the model is set to (OpenVLA-OFT: num_images_in_input)
    needs_labels: bool = False  # OFT's forward finds its action tokens in `labels`: batches carry all-ignore labels

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def name(self) -> str:
        return self.adapter or self.path

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Fused 6-channel pixel values, exactly as the checkpoint's processor would make them. A model set to N
        cameras gets each image in every camera slot (6N channels): the diagnostics have one image per sample."""
        if self._processor is not None:
            pixels = torch.as_tensor(self._processor.image_processor(list(images), return_tensors="pt")["pixel_values"])
        else:
            from .pixels import normalize_fused

            rgb = [
                torch.from_numpy(np.asarray(im.convert("RGB").resize((self.image_size,) * 2, Image.BILINEAR)).copy())
                for im in images
            ]
            pixels = normalize_fused(torch.stack(rgb).permute(0, 3, 1, 2).float() / 255.0)
        return pixels.repeat(1, self.num_images, 1, 1) if self.num_images > 1 else pixels

    def select_images(self, visual: torch.Tensor, images: str = "all") -> torch.Tensor:
        """The visual tokens (B, N * 256, D) of every camera (``"all"``) or of the first, third-person one
        (``"primary"``), in the model's token order."""
        from .pixels import image_tokens

        return image_tokens(visual, self.num_images, images)

    def batch(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> Dict[str, torch.Tensor]:
        """Right-padded ``input_ids``/``attention_mask`` plus ``pixel_values``, on the model's device and dtype."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images.")
        ids, mask = self.pad([self.tokenizer(p).input_ids for p in prompts])
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": self.pixel_values(images).to(self.device, self.dtype),
        }
        if self.needs_labels:
            batch["labels"] = torch.full_like(ids, IGNORE_INDEX)
        return batch

    def pad(self, rows: Sequence[Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Token rows right-padded into ``input_ids`` and ``attention_mask``, on the model's device."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids.to(self.device), mask.to(self.device)

    def attn_implementation(self) -> str:
        from .layout import language_model

        cfg = language_model(self.model).config
        return getattr(cfg, "_attn_implementation", None) or "eager"


def parse_model(
    model: Union[str, Path], adapter: Optional[Union[str, Path]] = None, flag: str = "--model"
) -> Tuple[str, Optional[str]]:
    """The one spelling of a model on every command: ``DIR`` or ``DIR::ADAPTER``, or ``DIR`` with ``--adapter``
    -> (DIR, ADAPTER or None). ``flag``: the option the errors name."""
    path, sep, inline = str(model).partition("::")
    if not path or (sep and not inline):
        raise ValueError(f"{flag} {str(model)!r}: write DIR or DIR::ADAPTER (or DIR with --adapter ADAPTER).")
    if inline and adapter:
        raise ValueError(f"{flag} {str(model)!r} already names an adapter; drop --adapter {adapter} or '::{inline}'.")
    return path, inline or (str(adapter) if adapter else None)


def load_image(path: Union[str, Path]) -> Image.Image:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Image {p} does not exist.")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except Exception as exc:
        raise ValueError(f"Cannot read image {p}: {exc}") from exc


def load_vla(
    path: Union[str, Path],
    adapter: Optional[Union[str, Path]] = None,
    *,
    device: str = "cpu",
    dtype: Union[str, torch.dtype] = "float32",
    attn_implementation: Optional[str] = "eager",
    num_images: Optional[int] = None,
) -> LoadedVLA:
    """Load a base/merged OpenVLA checkpoint (``trust_remote_code=True``) or one of a registered model class
    (:func:`registered_loaders`), plus an optional LoRA adapter. ``attn_implementation="eager"`` keeps attention
    weights available (needed for attention maps).

    OpenVLA-OFT checkpoints load the same way in a process where OFT's ``prismatic`` imports (its modeling file
    imports it); ``num_images`` sets the camera count they were trained with (OFT records it nowhere in the
    checkpoint; default: the class's, 1), and with OFT's transformers fork eager attention is made bidirectional
    as the fork's SDPA attention is, so every diagnostic sees the attention OFT trained with."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Model {path} is not a checkpoint directory.")
    torch_dtype = dtypes.torch_dtype(dtype) if isinstance(dtype, str) else dtype
    try:
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"Model {path}: config.json is not valid JSON ({exc}); the checkpoint is damaged.") from None
    loaders = registered_loaders()
    if config.get("model_type") in loaders:
        from .._plugins import load_target

        model, tokenizer, image_size = load_target(loaders[config["model_type"]])(path, attn_implementation)
        processor = None
    else:
        from transformers import AutoProcessor

        try:
            from transformers import AutoModelForVision2Seq as AutoVLA
        except ImportError:  # transformers >= 5 renamed the auto class
            from transformers import AutoModelForImageTextToText as AutoVLA
        if "OpenVLAForActionPrediction" not in (config.get("auto_map") or {}).get("AutoModelForVision2Seq", ""):
            raise ValueError(
                f"Model {path} is not an OpenVLA checkpoint: its config.json maps no AutoModelForVision2Seq to "
                "OpenVLAForActionPrediction (give the directory of openvla/openvla-7b, a fine-tuned or merged copy)."
            )
        kwargs = dict(torch_dtype=torch_dtype, trust_remote_code=True, low_cpu_mem_usage=True)
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        _check_remote_imports(path)
        model = AutoVLA.from_pretrained(str(path), **kwargs)
        processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=True)
        tokenizer = processor.tokenizer
        image_size = int(getattr(model.config, "image_sizes", [224])[0])
    if adapter is not None:
        from peft import PeftModel

        adapter_path = Path(adapter)
        if not (adapter_path / "adapter_config.json").is_file():
            raise FileNotFoundError(f"Adapter {adapter_path} has no adapter_config.json (not a PEFT adapter).")
        model = PeftModel.from_pretrained(model, str(adapter_path))
    model = model.to(device=device, dtype=torch_dtype).eval()
    from .layout import family, unwrap

    base = unwrap(model)
    fam = family(base)
    if num_images is not None:
        fam.set_num_images(base, num_images)
    fam.match_attention(base)
    return LoadedVLA(
        model,
        tokenizer,
        image_size,
        str(path),
        str(adapter) if adapter else None,
        processor,
        num_images=fam.num_images(base),
        needs_labels=fam.forward_needs_labels(),
    )


def _check_remote_imports(path: Path) -> None:
    """OpenVLA-OFT's modeling file imports OFT's own ``prismatic`` package (``prismatic.vla.constants``, ...), which
    transformers would report as a missing pip package; say what it really needs."""
    modeling = path / "modeling_prismatic.py"
    text = modeling.read_text(errors="replace") if modeling.is_file() else ""
    if "from prismatic." not in text:
        return
    from importlib.util import find_spec

    try:
        found = find_spec("prismatic.vla.constants") is not None
    except ImportError:  # no `prismatic` at all
        found = False
    if not found:
        raise ImportError(
            f"Model {path} is an OpenVLA-OFT checkpoint: its modeling_prismatic.py imports OFT's `prismatic` package, "
            "which this Python cannot import (or it finds OpenVLA's, which has no prismatic.vla.constants). Run in "
            "OFT's environment: pip install -e /path/to/openvla-oft, or PYTHONPATH=/path/to/openvla-oft."
        )


def token_spans(tokenizer, prompt: str, word: str) -> List[int]:
    """Positions (in the tokenised ``prompt``, BOS included) of the tokens that spell ``word``'s last occurrence."""
    enc = tokenizer(prompt, return_offsets_mapping=True)
    start = prompt.rfind(word)
    if start < 0:
        raise ValueError(f"{word!r} does not occur in the prompt {prompt!r}.")
    end = start + len(word)
    hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start]
    if not hits:
        toks = tokenizer.convert_ids_to_tokens(enc["input_ids"])
        raise ValueError(f"Cannot locate {word!r} among the prompt's tokens {toks}.")
    return hits
