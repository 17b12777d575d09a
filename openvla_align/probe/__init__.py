"""Diagnostics the paper used: linear probing, attention maps, t-SNE, VL-Think question probe."""

from ..vla.checkpoint import LoadedVLA, load_image, load_vla, token_spans, vqa_prompt

__all__ = ["LoadedVLA", "load_image", "load_vla", "token_spans", "vqa_prompt"]
