"""Motion-planner episodes as the paper's collector saves them, read without trusting pickle.

The collector (ManiSkill ``VLADataCollector.save_data``) calls ``np.savez_compressed(path, data_dict)``: one object
array ``arr_0`` holding a pickled dict ``{"image": [PIL images], "instruction": str, "action": [7-D arrays],
"info": [dicts with "success", ...], "is_image_encode": bool}``. ``np.load(..., allow_pickle=True)`` would run any
code such a file carries; :func:`load_episode` unpickles it with an allow-list of the numpy and PIL classes that
data needs and refuses everything else, naming the file.
"""

from __future__ import annotations

import io
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import List

import numpy as np

ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("PIL.Image", "Image"),
    ("collections", "OrderedDict"),
    ("builtins", "bytearray"),
}


class EpisodeError(ValueError):
    """An episode file that cannot be used (truncated, corrupt, unexpected content)."""


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (not episode data)")


@dataclass
class Episode:
    path: Path
    instruction: str
    images: np.ndarray  # (T, H, W, 3) uint8
    actions: np.ndarray  # (T, 7) float32
    success: np.ndarray  # (T,) bool, info[t]["success"]


def _object_array(raw: bytes, path: Path):
    f = io.BytesIO(raw)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if not dtype.hasobject:
        return np.frombuffer(f.read(), dtype=dtype).reshape(shape)
    return _Unpickler(f).load()


def load_episode(path) -> Episode:
    """Read one collector ``.npz`` (a pickled dict under ``arr_0``, loaded through an allow-list) or a plain
    ``.npz`` with arrays ``image``, ``instruction``, ``action``, ``success``."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if "arr_0.npy" in names:
                data = _object_array(z.read("arr_0.npy"), path)
                data = data.item() if isinstance(data, np.ndarray) and data.dtype == object and data.ndim == 0 else data
            else:
                data = {n[:-4]: _object_array(z.read(n), path) for n in names if n.endswith(".npy")}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, pickle.UnpicklingError, zlib.error) as exc:
        raise EpisodeError(f"{path}: unreadable episode file ({exc})") from exc
    if not isinstance(data, dict):
        raise EpisodeError(f"{path}: expected a dict of episode data, found {type(data).__name__}")
    missing = [k for k in ("image", "instruction", "action") if k not in data]
    if missing or not ("info" in data or "success" in data):
        raise EpisodeError(f"{path}: missing {missing or ['info']}")
    try:
        instruction = data["instruction"]
        instruction = str(np.asarray(instruction).reshape(-1)[0]) if not isinstance(instruction, str) else instruction
        images = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in data["image"]])
        actions = np.asarray(data["action"], dtype=np.float32).reshape(len(data["action"]), -1)
        if "success" in data:
            success = np.asarray(data["success"], dtype=bool).reshape(-1)
        else:
            success = np.asarray([bool(np.asarray(info.get("success", False)).any()) for info in data["info"]])
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise EpisodeError(f"{path}: malformed episode data ({exc})") from exc
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise EpisodeError(f"{path}: images must be uint8 (T, H, W, 3), got {images.dtype} {images.shape}")
    if actions.shape[1:] != (7,):
        raise EpisodeError(f"{path}: actions must be 7-D, got shape {actions.shape}")
    if not len(images) >= len(actions) <= len(success):
        raise EpisodeError(
            f"{path}: {len(images)} images, {len(actions)} actions and {len(success)} infos do not line up"
        )
    return Episode(path, instruction, images[: len(actions)], actions, success)


def check_file(path) -> None:
    """Cheap integrity check (zip directory and every member's CRC) without decoding the episode."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise EpisodeError(f"{path}: not a readable .npz ({exc})") from exc
    if bad is not None:
        raise EpisodeError(f"{path}: member {bad} is corrupt (CRC mismatch)")


# --------------------------------------------------------------------------------------------------- the paper's rules
def keep_mask(actions: np.ndarray, pos_thresh: float = 0.01, rot_thresh: float = 0.06) -> np.ndarray:
    """Steps to keep: translation norm > 0.01 or rotation norm > 0.06, or the gripper changed since the previous
    step (the paper's filter of near-zero motion-planner steps)."""
    actions = np.asarray(actions)
    moving = (np.linalg.norm(actions[:, :3], axis=1) > pos_thresh) | (
        np.linalg.norm(actions[:, 3:6], axis=1) > rot_thresh
    )
    toggled = np.zeros(len(actions), dtype=bool)
    toggled[1:] = actions[1:, 6] != actions[:-1, 6]
    return moving | toggled


def episode_steps(episode: Episode, stop_after: int = 6) -> List[int]:
    """Indices of the steps written for ``episode``: the filtered steps, stopping after ``stop_after`` consecutive
    successful steps. As in the reference builder, the success of the k-th *kept* step is read from the k-th entry of
    the unfiltered info list (the collector's per-step info is not filtered along with the steps)."""
    kept = np.flatnonzero(keep_mask(episode.actions))
    steps, run = [], 0
    for k, index in enumerate(kept):
        steps.append(int(index))
        run = run + 1 if bool(episode.success[k]) else 0
        if run >= stop_after:
            break
    return steps
