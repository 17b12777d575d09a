"""Finding and reading teacher weights on local disk only: an explicit path, the HF cache, the torch.hub dir.

Nothing here downloads. A miss raises ``TeacherWeightsNotFound`` naming every place that was searched and the
file to put there.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from .spec import TeacherWeightsNotFound, WeightSource


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def torch_hub_dir() -> Path:
    return Path(torch.hub.get_dir())


def hf_snapshot_dirs(repo_id: str) -> List[Path]:
    """Snapshot directories of ``repo_id`` in the local HF cache, newest first."""
    root = hf_cache_dir() / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)


def _first_existing(dirs: Iterable[Path], names: Sequence[str]) -> Optional[Path]:
    for d in dirs:
        for n in names:
            if (d / n).is_file():
                return d / n
    return None


def _dirs(source: WeightSource) -> List[Path]:
    if source.repo:
        return hf_snapshot_dirs(source.repo)
    if source.directory:
        return [Path(source.directory).expanduser()]
    return [torch_hub_dir() / "checkpoints"]


def _searched(source: WeightSource) -> str:
    files = source.files[0] + (f" (or {', '.join(source.files[1:])})" if len(source.files) > 1 else "")
    if source.repo:
        return (
            f"the HF cache: {hf_cache_dir()}/models--{source.repo.replace('/', '--')}/snapshots/<revision>/{files}  "
            f"(on a machine with network: `huggingface-cli download {source.repo}`, then copy the cache)"
        )
    if source.directory:
        return f"{Path(source.directory).expanduser()}/{files}"
    return f"the torch.hub checkpoint dir: {torch_hub_dir() / 'checkpoints'}/{files}"


def resolve_weights(teacher: str, path: Optional[str], sources: Sequence[WeightSource]) -> Path:
    """The one weight lookup of every teacher: ``path`` when given (a file, or a directory holding a file any
    source accepts: an HF snapshot, a copy of one), else the first hit over ``sources`` in order. A miss raises
    ``TeacherWeightsNotFound`` naming every place searched, and how to give a path instead."""
    names = list(dict.fromkeys(n for source in sources for n in source.files))
    if path is not None:
        p = Path(path).expanduser()
        if p.is_file():
            return p
        if p.is_dir():
            hit = _first_existing([p], names)
            if hit is not None:
                return hit
            raise TeacherWeightsNotFound(
                f"Teacher {teacher!r}: directory {p} holds none of {names}. "
                "Point teacher_path at the weights file itself or at the snapshot directory that contains it."
            )
        raise TeacherWeightsNotFound(f"Teacher {teacher!r}: teacher_path {p} does not exist.")
    for source in sources:
        hit = _first_existing(_dirs(source), source.files)
        if hit is not None:
            return hit
    where = "\n  - ".join(_searched(source) for source in sources)
    raise TeacherWeightsNotFound(
        f"Teacher {teacher!r} needs weights and nothing is downloaded at run time. Put the file in one of:\n"
        f"  - {where}\n"
        "or give the weights' path: --teacher-path (openvla-align commands), --align.teacher_path (finetune.py) or "
        "teacher_path= (Python). For a smoke test without weights: --allow-random-teacher, "
        "--align.allow_random_teacher true or allow_random=True."
    )


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """Tensors of a .safetensors or torch checkpoint, loaded without unpickling arbitrary objects.

    RADIO's ``.pth.tar`` files also carry an ``argparse.Namespace`` of training args; it is admitted as the only
    non-tensor global (on torch >= 2.4). On older torch such a file cannot be read safely: use the same weights
    as the HF snapshot's ``model.safetensors`` instead.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise ValueError(f"Cannot read {path} as safetensors ({exc}); the file is corrupt or truncated.") from exc
    add_safe = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe is not None:
        add_safe([argparse.Namespace])
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"Cannot read {path} with torch.load(weights_only=True): {exc}. The file is corrupt, or holds objects "
            "other than tensors; openvla-align never unpickles arbitrary objects. Use a .safetensors copy."
        ) from exc
    for key in ("state_dict_ema", "state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors.")
    return dict(obj)


def strip_prefix(sd: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
