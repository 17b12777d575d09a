"""The dtype names the package accepts, defined once: config fields, CLI flags, cache manifests and model loading
all spell a dtype as one of ``NAMES`` (``ALIASES`` are accepted on the command line), and ``auto`` resolves here.

torch is imported only by ``torch_dtype``, so ``config`` stays importable without it.
"""

from typing import Tuple

NAMES: Tuple[str, ...] = ("bfloat16", "float16", "float32")
ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
CHOICES: Tuple[str, ...] = NAMES + tuple(ALIASES)  # what a --dtype flag accepts


def canonical(name: str, what: str = "--dtype", allowed: Tuple[str, ...] = NAMES) -> str:
    """``name`` (or its alias) as one of ``allowed``; anything else raises, naming ``what`` and the choices."""
    full = ALIASES.get(name, name)
    if full not in allowed:
        raise ValueError(f"{what} {name!r} is not one of {', '.join(allowed)}.")
    return full


def resolve(name: str, device_type: str) -> str:
    """``auto`` -> bfloat16 on CUDA (the reference's choice), float32 elsewhere; explicit dtypes are kept."""
    if name != "auto":
        return canonical(name)
    return "bfloat16" if device_type == "cuda" else "float32"


def torch_dtype(name: str):
    """The ``torch.dtype`` of a dtype name or alias."""
    import torch

    return getattr(torch, canonical(name))
