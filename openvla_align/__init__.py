"""openvla-align: Visual Representation Alignment (arXiv 2510.25616) for OpenVLA fine-tuning."""

from .aligner import Aligner, AlignOutput
from .config import AlignConfig
from .hooks import VisualTokenHook
from .teachers import create_teacher, list_teachers, register_teacher

__version__ = "0.1.0"

__all__ = [
    "AlignConfig",
    "AlignOutput",
    "Aligner",
    "VisualTokenHook",
    "create_teacher",
    "list_teachers",
    "register_teacher",
    "__version__",
]
