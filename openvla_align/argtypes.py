"""The CLI's argument types: every value is checked where it enters, with the cause named exactly.

Each function here is an ``argparse`` ``type=``: it returns the parsed value or raises
``argparse.ArgumentTypeError`` with one sentence that names the real cause (missing, a file where a directory is
needed, empty, not a number, out of range) -- argparse then stops with a usage error (exit status 2) before the
command has loaded a model or written a file. The path checks are also callable from code (``need_dir`` and
friends raise ``FileNotFoundError``/``NotADirectoryError``/``IsADirectoryError``), for paths that arrive from a
recipe rather than the command line.

    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--seeds", type=int_list, default=None)
    p.add_argument("--data", type=existing_dir, required=True)
    p.add_argument("out", type=output_dir)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import List, Tuple

__all__ = [
    "existing_dir",
    "existing_file",
    "int_list",
    "need_dir",
    "need_file",
    "need_model_dir",
    "need_output_dir",
    "nonnegative_int",
    "output_dir",
    "positive_float",
    "positive_int",
    "shard_spec",
]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (a count, a size, a step number)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (0 meaning none or off)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a rate, a weight)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def int_list(text: str) -> List[int]:
    """Comma-separated integers, e.g. ``0,1,2`` (no duplicates, at least one)."""
    items = [item.strip() for item in text.split(",")]
    bad = [item for item in items if not item.lstrip("-").isdigit()]
    if bad:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers ({bad[0]!r} is not one)")
    values = [int(item) for item in items]
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r} names a value twice")
    return values


def shard_spec(text: str) -> Tuple[int, int]:
    """``K/N``: the K-th of N shares, ``0 <= K < N`` (a SLURM array's ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``
    with ``--array=0-(N-1)``)."""
    parts = text.split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not K/N (e.g. 0/4: the first of four shares)")
    k, n = (int(p) for p in parts)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: N must be at least 1")
    if k >= n:
        raise argparse.ArgumentTypeError(
            f"{text!r}: K counts from 0 and must be below N ({n}), e.g. 0/{n} to {n - 1}/{n}"
        )
    return k, n


# ------------------------------------------------------------------------------------------------- paths
def need_dir(path, what: str = "directory", *, nonempty: bool = False) -> Path:
    """``path`` as a Path if it is an existing directory (holding something, with ``nonempty``); else the error
    that names why not."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{what} {str(path)!r} is a file, not a directory")
    if nonempty and not any(path.iterdir()):
        raise FileNotFoundError(f"{what} {str(path)!r} is empty")
    return path


def need_model_dir(path, adapter=None, what: str = "model", adapter_what: str = "adapter") -> Path:
    """``path`` as a Path if it is a checkpoint directory (with ``config.json``) and ``adapter``, when given, a PEFT
    adapter directory (with ``adapter_config.json``); else the error that names which and why (nothing is loaded)."""
    model = need_dir(path, what)
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} has no config.json: not a checkpoint directory.")
    if adapter and not (need_dir(adapter, adapter_what) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_what} {str(adapter)!r} has no adapter_config.json: not a PEFT adapter.")
    return model


def need_file(path, what: str = "file") -> Path:
    """``path`` as a Path if it is an existing, non-empty file; else the error that names why not."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{what} {str(path)!r} is a directory, not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {str(path)!r} is empty")
    return path


def need_output_dir(path, what: str = "output directory") -> Path:
    """``path`` as a Path if a directory can be made or used there: it is a directory already, or nothing is there
    and its nearest existing parent is a writable directory (nothing is created here)."""
    path = Path(path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{what} {str(path)!r} is a file, not a directory")
        return path
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{what} {str(path)!r} cannot be made: {str(parent)!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {str(path)!r} cannot be made: {str(parent)!r} is not writable")
    return path


def _as_type(check, text: str) -> Path:
    try:
        return check(text)
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def existing_dir(text: str) -> Path:
    """An existing directory (argparse type)."""
    return _as_type(need_dir, text)


def existing_file(text: str) -> Path:
    """An existing, non-empty file (argparse type)."""
    return _as_type(need_file, text)


def output_dir(text: str) -> Path:
    """A directory that exists or can be made (argparse type)."""
    return _as_type(need_output_dir, text)
