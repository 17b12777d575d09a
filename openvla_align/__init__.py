"""openvla-align: Visual Representation Alignment (arXiv 2510.25616) for OpenVLA fine-tuning.

The public names below are imported on first use (PEP 562), so the CLI starts without torch.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "AlignConfig": ".config",
    "AlignOutput": ".aligner",
    "Aligner": ".aligner",
    "VisualTokenHook": ".hooks",
    "create_teacher": ".teachers",
    "list_teachers": ".teachers",
    "register_teacher": ".teachers",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name], __name__), name)


def __dir__():
    return sorted(__all__)
