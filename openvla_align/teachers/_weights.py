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

from .spec import TeacherWeightsNotFound

WEIGHT_SUFFIXES = (".safetensors", ".pth.tar", ".pth", ".pt", ".bin")


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


def find_weights(
    teacher: str,
    path: Optional[str],
    *,
    filenames: Sequence[str],
    hf_repo: Optional[str] = None,
    hub_filenames: Sequence[str] = (),
) -> Path:
    """Locate a weights file for ``teacher``.

    ``path`` may be a file or a directory (an HF snapshot or any folder holding one of ``filenames``). Without a
    path, the HF cache snapshot of ``hf_repo`` and ``<torch.hub dir>/checkpoints/<hub_filenames>`` are searched.
    """
    if path is not None:
        p = Path(path).expanduser()
        if p.is_file():
            return p
        if p.is_dir():
            hit = _first_existing([p], list(filenames) + list(hub_filenames))
            if hit is not None:
                return hit
            raise TeacherWeightsNotFound(
                f"Teacher {teacher!r}: directory {p} holds none of {list(filenames) + list(hub_filenames)}. "
                "Point teacher_path at the weights file itself or at the snapshot directory that contains it."
            )
        raise TeacherWeightsNotFound(f"Teacher {teacher!r}: teacher_path {p} does not exist.")

    searched = []
    if hf_repo:
        hit = _first_existing(hf_snapshot_dirs(hf_repo), filenames)
        if hit is not None:
            return hit
        searched.append(
            f"the HF cache: {hf_cache_dir()}/models--{hf_repo.replace('/', '--')}/snapshots/<revision>/"
            f"{filenames[0]}  (on a machine with network: `huggingface-cli download {hf_repo}`, then copy the cache)"
        )
    if hub_filenames:
        ckpt_dir = torch_hub_dir() / "checkpoints"
        hit = _first_existing([ckpt_dir], hub_filenames)
        if hit is not None:
            return hit
        searched.append(f"the torch.hub checkpoint dir: {ckpt_dir}/{hub_filenames[0]}")
    where = "\n  - ".join(searched)
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
