"""OpenVLA-OFT (moojink/openvla-oft): 256 visual tokens per image for ``num_images_in_input`` images (third-person
camera first, then wrist cameras), followed by optional proprio and diffusion-timestep tokens; the vision backbone may
sit inside FiLM's wrapper, whose per-block ``scale``/``shift`` layers condition the towers on the language.

Recognised by structure, not by class (the classes live under ``transformers_modules.*``): OFT's backbone, FiLM-wrapped
or not, answers ``get_num_images_in_input()``.

OFT trains with its transformers fork (moojink/transformers-openvla-oft@bc339d9a): transformers 4.40.1 with one file
changed, ``LlamaSdpaAttention`` made bidirectional (pad keys still masked). Eager attention, which the diagnostics
need for attention weights, stays causal in the fork; ``match_attention`` gives it the fork's mask.
"""

from __future__ import annotations

import hashlib
from importlib.util import find_spec
from pathlib import Path
from typing import List, Optional

import torch.nn as nn

from .base import ModelFamily, register_family

# SHA-256 of transformers' models/llama/modeling_llama.py: stock 4.40.1, and 4.40.1 + transformers-openvla-oft.patch
STOCK_LLAMA_SHA256 = "b5fb3c99e3e118d5ee6fd67874ad298fb83282ec0ca8e8c668c2cd63a0f5b609"
OFT_FORK_LLAMA_SHA256 = "3aac24cec583a6ef5f60b6ec634a8bd3c8377784c5c63c8cc14cb6790554c52e"


def llama_modeling_sha256() -> Optional[str]:
    """SHA-256 of the installed ``transformers/models/llama/modeling_llama.py`` (None when transformers is absent)."""
    spec = find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "llama" / "modeling_llama.py"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def fork_attention_installed() -> bool:
    """Is the installed transformers OFT's fork, byte for byte (bidirectional ``LlamaSdpaAttention``)?"""
    return llama_modeling_sha256() == OFT_FORK_LLAMA_SHA256


class OpenVLAOFT(ModelFamily):
    name = "openvla-oft"

    def matches(self, base: nn.Module) -> bool:
        backbone = getattr(base, "vision_backbone", None)
        return super().matches(base) and callable(getattr(backbone, "get_num_images_in_input", None))

    def vision_backbone(self, base: nn.Module) -> nn.Module:
        backbone = base.vision_backbone
        inner = getattr(backbone, "vision_backbone", None)  # FiLM's wrapper keeps the original backbone here
        return inner if isinstance(inner, nn.Module) and hasattr(inner, "featurizer") else backbone

    def num_images(self, base: nn.Module) -> int:
        return int(base.vision_backbone.get_num_images_in_input())

    def set_num_images(self, base: nn.Module, n: int) -> None:
        """OFT's checkpoints do not record their camera count: its deploy code sets it, as this does."""
        if n < 1:
            raise ValueError(f"num_images_in_input must be >= 1, got {n}.")
        base.vision_backbone.set_num_images_in_input(int(n))

    def forward_needs_labels(self) -> bool:
        return True  # OFT's multimodal forward locates the action tokens in `labels` (all IGNORE_INDEX: none)

    def match_attention(self, base: nn.Module) -> bool:
        """With the fork installed, make eager attention bidirectional as the fork's SDPA attention is: every query
        row gets the mask's last row (zeros, -inf on padded keys), the fork's own construction. Wraps the LLM's
        ``_update_causal_mask`` on this instance only; without the fork nothing changes (the model attends causally
        here under every implementation)."""
        if not fork_attention_installed():
            return False
        llm = getattr(getattr(base, "language_model", None), "model", None)
        original = getattr(llm, "_update_causal_mask", None)
        if original is None or getattr(original, "_oft_bidirectional", False):
            return False

        def bidirectional(*args, **kwargs):
            mask = original(*args, **kwargs)
            if mask is None or mask.dim() != 4:
                return mask
            return mask[:, :, -1:, :].expand_as(mask)

        bidirectional._oft_bidirectional = True
        llm._update_causal_mask = bidirectional
        return True

    def conditioning_parameters(self, base: nn.Module) -> List[nn.Parameter]:
        """FiLM's ``scale``/``shift`` layers (one pair per ViT block; absent without FiLM)."""
        params = []
        for module in self.vision_backbone(base).modules():
            if isinstance(getattr(module, "block", None), nn.Module):
                for name in ("scale", "shift"):
                    layer = getattr(module, name, None)
                    if isinstance(layer, nn.Module):
                        params.extend(layer.parameters())
        return params


register_family(OpenVLAOFT())
