"""Tiny random-weight models and generated data with OpenVLA's layout: the demo's and the bench's models, smoke tests
of every tool, and the test suite's fixtures (``tiny_openvla`` checkpoints load through ``load_vla``)."""

from .model import (
    IGNORE_INDEX,
    TinyOpenVLA,
    TinyVLAConfig,
    build_tiny_vla,
    build_tokenizer,
    save_tiny_checkpoint,
    tiny_teacher,
)

__all__ = [
    "IGNORE_INDEX",
    "TinyOpenVLA",
    "TinyVLAConfig",
    "build_tiny_vla",
    "build_tokenizer",
    "save_tiny_checkpoint",
    "tiny_teacher",
]
