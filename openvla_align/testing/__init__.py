"""Tiny random-weight models and generated data with OpenVLA's layout, for tests and the demo."""

from .tiny import (
    IGNORE_INDEX,
    ActionTokenizer,
    TinyOpenVLA,
    TinyVLAConfig,
    build_tiny_vla,
    build_tokenizer,
    save_tiny_checkpoint,
    tiny_teacher,
)

__all__ = [
    "IGNORE_INDEX",
    "ActionTokenizer",
    "TinyOpenVLA",
    "TinyVLAConfig",
    "build_tiny_vla",
    "build_tokenizer",
    "save_tiny_checkpoint",
    "tiny_teacher",
]
