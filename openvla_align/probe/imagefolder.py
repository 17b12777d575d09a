"""ImageFolder datasets for the linear probe: ``DATA/train/<class>/*`` and ``DATA/val/<class>/*``.

Images are found recursively (symlinks followed, dot-files skipped); the classes are the sorted train class folders
and every val class must be one of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Tuple, Union

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImageFolderSplit:
    name: str  # "train" or "val"
    root: Path  # DATA/<name>
    paths: Tuple[Path, ...]
    labels: np.ndarray  # (N,) int64 indices into the dataset's classes


@dataclass(frozen=True)
class ImageFolderData:
    root: Path
    classes: Tuple[str, ...]
    train: ImageFolderSplit
    val: ImageFolderSplit


def _layout_hint(root: Path) -> str:
    return f"expected an ImageFolder layout: {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg"


def _images_under(folder: Path) -> List[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            # Dot-files include macOS "._x.jpg" resource forks, which carry an image suffix but are not images.
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath) / name)
    return found


def _scan_split(root: Path, split: str) -> Dict[str, List[Path]]:
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist; {_layout_hint(root)}.")
    per_class = {
        d.name: _images_under(d) for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")
    }
    if not any(per_class.values()):
        raise ValueError(
            f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders; {_layout_hint(root)}."
        )
    return per_class


def scan_imagefolder(root: Union[str, Path]) -> ImageFolderData:
    """Index ``root/train`` and ``root/val``; classes are the sorted train class folders."""
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"Dataset {root} does not exist; {_layout_hint(root)}.")
    train, val = _scan_split(root, "train"), _scan_split(root, "val")
    empty = [c for c, paths in train.items() if not paths]
    if empty:
        raise ValueError(
            f"Train class folder(s) {empty[:5]} in {root / 'train'} hold no images; every train folder is a class, "
            "so add images or remove the folder."
        )
    classes = tuple(sorted(train))
    if len(classes) < 2:
        raise ValueError(
            f"{root / 'train'} has only one class ({classes[0]!r}); a linear probe needs at least two class folders."
        )
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(c for c, paths in val.items() if paths and c not in index)
    if unknown:
        raise ValueError(
            f"Val class(es) {unknown[:5]}{' ...' if len(unknown) > 5 else ''} in {root / 'val'} are not train "
            f"classes; the class list comes from {root / 'train'}, so each val class needs a train folder of the "
            "same name."
        )

    def split(name: str, per_class: Mapping[str, List[Path]]) -> ImageFolderSplit:
        pairs = [(p, index[c]) for c in sorted(per_class) for p in per_class[c]]
        labels = np.array([y for _, y in pairs], dtype=np.int64)
        return ImageFolderSplit(name, root / name, tuple(p for p, _ in pairs), labels)

    return ImageFolderData(root, classes, split("train", train), split("val", val))
