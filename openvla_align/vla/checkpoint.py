"""Load any OpenVLA checkpoint for the tools, and turn (prompt, image) into a batch.

A checkpoint is a directory: a merged/base OpenVLA model loaded with the stock AutoClasses and
``trust_remote_code=True`` (its processor comes along), optionally with a PEFT LoRA adapter on top. Checkpoints of
other model classes with OpenVLA's layout load through a loader registered for their ``config.json`` ``model_type``
(``LOADERS``: data naming ``module:function``, imported only when such a checkpoint is loaded; the tiny test models
of ``openvla_align.testing`` register theirs there).
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
# ``function(path, attn_implementation)``; OpenVLA's own class needs no entry.
LOADERS: Dict[str, str] = {"tiny_openvla": "openvla_align.testing.tiny:load_tiny_checkpoint"}


def register_loader(model_type: str, target: str) -> None:
    """Load checkpoints whose config.json says ``model_type`` with ``target`` ("module:function")."""
    prior = LOADERS.get(model_type)
    if prior is not None and prior != target:
        raise ValueError(f"model_type {model_type!r} already loads with {prior}.")
    LOADERS[model_type] = target


def _registered_loader(model_type: str):
    import importlib

    module, _, name = LOADERS[model_type].partition(":")
    return getattr(importlib.import_module(module), name)


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


@dataclass
class LoadedVLA:
    """A VLA ready for diagnostics plus what it needs to build batches."""

    model: nn.Module
    tokenizer: Any
    image_size: int
    path: str
    adapter: Optional[str] = None
    _processor: Any = None  # the checkpoint's own PrismaticProcessor, when it has one

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
        """Fused 6-channel pixel values, exactly as the checkpoint's processor would make them."""
        if self._processor is not None:
            return torch.as_tensor(self._processor.image_processor(list(images), return_tensors="pt")["pixel_values"])
        from .pixels import normalize_fused

        rgb = [
            torch.from_numpy(np.asarray(im.convert("RGB").resize((self.image_size,) * 2, Image.BILINEAR)).copy())
            for im in images
        ]
        return normalize_fused(torch.stack(rgb).permute(0, 3, 1, 2).float() / 255.0)

    def batch(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> Dict[str, torch.Tensor]:
        """Right-padded ``input_ids``/``attention_mask`` plus ``pixel_values``, on the model's device and dtype."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images.")
        ids, mask = self.pad([self.tokenizer(p).input_ids for p in prompts])
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": self.pixel_values(images).to(self.device, self.dtype),
        }

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


def parse_model(model: Union[str, Path], adapter: Optional[Union[str, Path]] = None) -> Tuple[str, Optional[str]]:
    """The one spelling of a model on every command: ``DIR`` or ``DIR::ADAPTER``, or ``DIR`` with ``--adapter``
    -> (DIR, ADAPTER or None)."""
    path, sep, inline = str(model).partition("::")
    if not path or (sep and not inline):
        raise ValueError(f"--model {str(model)!r}: write DIR or DIR::ADAPTER (or DIR with --adapter ADAPTER).")
    if inline and adapter:
        raise ValueError(f"--model {str(model)!r} already names an adapter; drop --adapter {adapter} or '::{inline}'.")
    return path, inline or (str(adapter) if adapter else None)


def apply_adapter(models: Sequence[str], adapter: Optional[str]) -> List[str]:
    """``--adapter`` on a command that takes several ``--model``: it belongs to the single model given."""
    if adapter is None:
        return list(models)
    if len(models) != 1:
        raise ValueError(f"--adapter {adapter} with {len(models)} --model: write each model as DIR::ADAPTER instead.")
    path, adapter = parse_model(models[0], adapter)
    return [f"{path}::{adapter}"]


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
) -> LoadedVLA:
    """Load a base/merged OpenVLA checkpoint (``trust_remote_code=True``) or one of a registered model class
    (``LOADERS``), plus an optional LoRA adapter. ``attn_implementation="eager"`` keeps attention weights available
    (needed for attention maps)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Model {path} is not a checkpoint directory.")
    torch_dtype = dtypes.torch_dtype(dtype) if isinstance(dtype, str) else dtype
    try:
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"Model {path}: config.json is not valid JSON ({exc}); the checkpoint is damaged.") from None
    if config.get("model_type") in LOADERS:
        model, tokenizer, image_size = _registered_loader(config["model_type"])(path, attn_implementation)
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
    return LoadedVLA(model, tokenizer, image_size, str(path), str(adapter) if adapter else None, processor)


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
