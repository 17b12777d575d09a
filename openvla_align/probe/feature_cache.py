"""The linear probe's feature cache: one ``.npy`` of features per (model, layer or teacher, dtype, split) and a
``.json`` key of everything they depend on (model and adapter files, every image's size and mtime, the class list,
the features' sha256). A stale key or a damaged file is reported and re-extracted, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .. import dtypes
from .._io import atomic_write, sha256_file
from ..argtypes import need_model_dir

if TYPE_CHECKING:
    from .features import ModelSpec
    from .imagefolder import ImageFolderSplit

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the meaning of cached features changes, so old caches are re-extracted


def _file_stats(paths: Sequence[Path], base: Path) -> List[list]:
    stats = []
    for p in paths:
        st = p.stat()
        stats.append([p.relative_to(base).as_posix() if p.is_relative_to(base) else str(p), st.st_size, st.st_mtime_ns])
    return stats


def _dir_stats(path: Optional[str]) -> Optional[List[list]]:
    """Sizes and mtimes of a checkpoint's top-level files (a file itself for single-file weights)."""
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        return _file_stats([p], p.parent)
    return _file_stats(sorted(f for f in p.iterdir() if f.is_file()), p)


def check_model(spec: ModelSpec) -> None:
    """Fail before any work on inputs the cache key cannot describe (and that loading would reject anyway)."""
    if spec.is_teacher:
        from ..teachers import get_teacher_factory

        get_teacher_factory(spec.teacher)  # unknown names raise, listing the known ones
        if spec.teacher_path and not Path(spec.teacher_path).expanduser().exists():
            raise FileNotFoundError(f"Teacher weights {spec.teacher_path} for {spec.label} do not exist.")
        return
    need_model_dir(spec.path, spec.adapter)


def model_key(spec: ModelSpec, layer: int, prompt: str, dtype: str, teacher_kwargs, view=None) -> Dict[str, Any]:
    """What the features depend on, model side. Paths are absolute so a changed working directory still hits. A
    non-default camera view (OpenVLA-OFT) joins the key; the default adds nothing, so existing entries still hit."""
    absolute = lambda p: str(Path(p).expanduser().absolute()) if p else None  # noqa: E731
    if spec.is_teacher:
        key = {
            "teacher": spec.teacher,
            "teacher_path": absolute(spec.teacher_path),
            "teacher_kwargs": json.loads(json.dumps(dict(teacher_kwargs or {}), sort_keys=True, default=str)),
            "feature": "mean of the final patch features (16x16 grid)",
        }
    else:
        key = {
            "model": absolute(spec.path),
            "adapter": absolute(spec.adapter),
            "layer": layer,
            "prompt": prompt,
            "feature": f"mean of the visual-token hidden states at layer {layer}",
        }
        if view is not None and not view.is_default:
            key["cameras"] = {"num_images": view.num_images, "images": view.images}
            key["feature"] += f" ({view.images} camera images' tokens)"
    return {"format": CACHE_FORMAT, "dtype": dtypes.canonical(dtype), **key}


def data_key(split: ImageFolderSplit, classes: Sequence[str]) -> Dict[str, Any]:
    """What the features depend on, data side: every image (size, mtime) and the class list (it fixes the labels)."""
    return {
        "root": str(split.root),
        "split": split.name,
        "classes": list(classes),
        "files": _file_stats(split.paths, split.root),
    }


def full_key(model_key: Mapping[str, Any], spec: ModelSpec, data_key: Mapping[str, Any]) -> Dict[str, Any]:
    key = {
        **model_key,
        "model_files": _dir_stats(spec.teacher_path if spec.is_teacher else spec.path),
        "adapter_files": _dir_stats(spec.adapter),
        "data": data_key,
    }
    return json.loads(json.dumps(key))  # lists, not tuples, so it compares equal to the JSON read back


def cache_stem(spec: ModelSpec, model_key: Mapping[str, Any], split: ImageFolderSplit) -> str:
    identity = json.dumps({**model_key, "data": str(split.root)}, sort_keys=True)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    if spec.is_teacher:
        name = f"teacher-{spec.teacher}"
    else:
        name = Path(spec.path).name + (f"+{Path(spec.adapter).name}" if spec.adapter else "")
        name += f"-layer{model_key['layer']}"
    return f"{re.sub(r'[^A-Za-z0-9._+-]+', '_', name)[-80:]}-{digest}-{split.name}"


def _what_changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    changes = []
    for field in sorted(set(old) | set(new)):
        if field == "data" and isinstance(old.get("data"), dict):
            before = {f[0]: f[1:] for f in old["data"].get("files", [])}
            after = {f[0]: f[1:] for f in new["data"]["files"]}
            added, removed = len(after.keys() - before.keys()), len(before.keys() - after.keys())
            modified = sum(1 for f in after.keys() & before.keys() if after[f] != before[f])
            if added or removed or modified:
                changes.append(f"images: {added} added, {removed} removed, {modified} modified")
            if old["data"].get("classes") != new["data"]["classes"]:
                changes.append("class list changed")
        elif old.get(field) != new.get(field):
            changes.append(f"{field.replace('_', ' ')} changed")
    return "; ".join(changes) or "key differs"


def load_cached(stem: Path, key: Mapping[str, Any], split: ImageFolderSplit) -> Tuple[Optional[np.ndarray], str]:
    """(features, status) with status hit | miss | stale | corrupt; anything doubtful returns no features.

    Labels are not stored: the key pins the ordered file list and the class list, and so the labels.
    """
    meta_path, data_path = stem.with_suffix(".json"), stem.with_suffix(".npy")
    if not meta_path.is_file():
        return None, "miss"
    try:
        meta = json.loads(meta_path.read_text())
        stored_key = meta["key"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("Cache key %s is corrupt (%s); re-extracting.", meta_path, exc)
        return None, "corrupt"
    if stored_key != key:
        why = _what_changed(stored_key, key) if isinstance(stored_key, dict) else "unreadable key"
        logger.info("Cached features %s are stale (%s); re-extracting.", data_path.name, why)
        return None, "stale"
    try:
        if sha256_file(data_path) != meta.get("sha256"):
            raise ValueError("its sha256 does not match the one recorded in the key")
        feats = np.load(data_path, allow_pickle=False)
        if feats.dtype != np.float32 or feats.ndim != 2 or len(feats) != len(split.paths):
            raise ValueError(f"{feats.dtype} array of shape {feats.shape} for {len(split.paths)} images")
        if not np.isfinite(feats).all():
            raise ValueError("non-finite values")
    except Exception as exc:  # whatever is wrong with the file, the answer is the same: do not use it
        logger.warning("Cached features %s are corrupt (%s); re-extracting.", data_path, exc)
        return None, "corrupt"
    logger.info("Features for the %s split: cache hit (%s).", split.name, data_path)
    return feats, "hit"


def store(stem: Path, key: Mapping[str, Any], feats: np.ndarray) -> None:
    data_path, meta_path = stem.with_suffix(".npy"), stem.with_suffix(".json")

    def write_npy(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append its own ".npy" to the temporary name
            np.save(f, np.ascontiguousarray(feats, dtype=np.float32), allow_pickle=False)

    atomic_write(data_path, write_npy)
    meta = {
        "key": key,
        "sha256": sha256_file(data_path),
        "shape": list(feats.shape),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # The key goes last: it is what marks the entry valid.
    atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(meta)))
