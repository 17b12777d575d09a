"""Where things are inside an OpenVLA-layout model: the wrappers to strip, the LLM, its decoder blocks and final norm,
the vision backbone, its token grid and the images per sample (the last two through the model's family,
``vla.families``: OpenVLA, OpenVLA-OFT). The only module that knows OpenVLA's module paths.

Layer L means ``output_hidden_states[L]``: the output of decoder block L-1 (index 0 is the embedding output). For L
equal to the number of blocks, HF models return the *final-normed* state, so that layer's module is the final norm.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch.nn as nn


class NotAnOpenVLAModel(TypeError):
    """The model does not have OpenVLA's module layout (vision_backbone -> projector -> language_model)."""


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP/FSDP (``.module``), torch.compile (``._orig_mod``) and PEFT (``.base_model.model``) wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):  # PeftModel
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module) and not hasattr(model, "language_model"):
            model = model.module
    return model


def describe(model: nn.Module) -> str:
    """A model's class and child names, for errors about a layout that is not OpenVLA's."""
    children = ", ".join(name for name, _ in model.named_children()) or "none"
    return f"{type(model).__name__} (children: {children})"


def language_model(vla: nn.Module) -> nn.Module:
    base = unwrap(vla)
    lm = getattr(base, "language_model", None)
    if lm is None:
        raise NotAnOpenVLAModel(
            f"Expected an OpenVLA-style model with a `language_model` attribute, got {describe(base)}. "
            "openvla-align hooks OpenVLAForActionPrediction (or a model with its module layout)."
        )
    return lm


def decoder_layers(vla: nn.Module) -> nn.ModuleList:
    """The LLM's stack of decoder blocks (``language_model.model.layers`` for Llama-2)."""
    lm = language_model(vla)
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else getattr(lm, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise NotAnOpenVLAModel(
            f"The language model {describe(lm)} has no decoder stack (`.model.layers`); cannot hook an LLM layer."
        )
    return layers


def final_norm(vla: nn.Module) -> nn.Module:
    lm = language_model(vla)
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    norm = getattr(decoder, "norm", None)
    if norm is None:
        raise NotAnOpenVLAModel(f"The language model {describe(lm)} has no final `norm` to hook for the last layer.")
    return norm


def llm_hidden_size(vla: nn.Module) -> int:
    return language_model(vla).get_input_embeddings().embedding_dim


def check_layers(vla: "nn.Module | int", layers: Sequence[int]) -> int:
    """Validate 1 <= L <= number of decoder blocks (of ``vla``, or given as an int) per layer; returns that number."""
    n = vla if isinstance(vla, int) else len(decoder_layers(vla))
    bad = [layer for layer in layers if not 1 <= layer <= n]
    if bad:
        raise ValueError(
            f"Layer(s) {bad} out of range: this LLM has {n} decoder blocks, so layers run from 1 to {n} "
            f"(layer L = output_hidden_states[L], the output of the L-th decoder block; the paper aligns 16 of 32)."
        )
    return n


def layer_output_module(vla: nn.Module, layer: int) -> nn.Module:
    """The module whose output is ``output_hidden_states[layer]``: decoder block ``layer - 1``, or the final norm for
    the last layer (HF returns the normed state there)."""
    blocks = decoder_layers(vla)
    return final_norm(vla) if layer == len(blocks) else blocks[layer - 1]


def family(vla: nn.Module):
    """The model family of ``vla`` (any wrappers stripped): ``vla.families.ModelFamily``."""
    from .families import family_of

    return family_of(unwrap(vla))


def vision_backbone(vla: nn.Module) -> nn.Module:
    """The vision backbone holding the timm towers (inside FiLM's wrapper for an OFT model trained with FiLM)."""
    base = unwrap(vla)
    if not isinstance(getattr(base, "vision_backbone", None), nn.Module):
        raise NotAnOpenVLAModel(f"Expected an OpenVLA-style model with `vision_backbone`, got {describe(base)}.")
    return family(base).vision_backbone(base)


def num_images(vla: nn.Module) -> int:
    """Images per sample the model is set up for (OFT: ``num_images_in_input``; OpenVLA: 1)."""
    base = unwrap(vla)
    return family(base).num_images(base)


def student_grid(vla: nn.Module) -> Optional[Tuple[int, int]]:
    """The VLA's visual token grid per image, read from its (first) timm featurizer."""
    base = unwrap(vla)
    backbone = (
        family(base).vision_backbone(base) if isinstance(getattr(base, "vision_backbone", None), nn.Module) else None
    )
    featurizer = getattr(backbone, "featurizer", None)
    grid = getattr(getattr(featurizer, "patch_embed", None), "grid_size", None)
    return tuple(int(g) for g in grid) if grid is not None else None
