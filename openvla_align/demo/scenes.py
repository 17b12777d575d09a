"""The demo's world: coloured shapes on a table, drawn with numpy, and its splits.

A scene is ``size`` x ``size`` RGB, stored as uint8 (50 KB a scene with its class map, 175 MB for the demo's
~3,500): a table colour, one or more objects (a colour x shape each, no two
alike) in distinct cells of a 3x3 grid, sometimes a white plate. ``objects[0]`` is the *target*.

The robot task sorts the target into a bin: x by its shape, y by its colour (``sort_action``), so the action
depends on what the object is, read from the pixels (the instruction does not name it). Splits, in miniature of the
paper's in-distribution and OOD evaluations:

- ``vl``: the "web" data the teacher and the VLA learn concepts from: every colour x shape, every table, 1-3
  objects, a plate half the time.
- ``train`` / ``id``: robot data, narrow like a real robot dataset: one object of the 9 ``TRAIN_COMBOS`` on the
  ``TRAIN_TABLES``.
- ``ood_objects``: an object of the 3 ``HELD_OUT`` combinations (each colour and each shape was seen in robot data,
  never together) on a seen table.
- ``ood_scenes``: a seen object on an unseen table (``OOD_TABLES``) next to a plate.
- ``probe``: one object on any table; label = its colour x shape (12 classes, chance 1/12).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import numpy as np
import torch

from ..shapes import shape_mask

SHAPES = ("square", "circle", "triangle")
COLORS = {"red": (0.9, 0.12, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1)}
COMBOS: Tuple[Tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)  # the 12 probe classes
PLATE = ("white", "plate")  # scenery: never a target; the OOD split's distractor
N_CLASSES = len(COMBOS) + 2  # per-pixel classes: table, the 12 objects, the plate
HELD_OUT = (("red", "circle"), ("green", "triangle"), ("blue", "square"))  # never a robot-data target
TRAIN_COMBOS = tuple(c for c in COMBOS if c not in HELD_OUT)
TRAIN_TABLES = ((0.62, 0.5, 0.38), (0.55, 0.55, 0.55), (0.7, 0.62, 0.5))
OOD_TABLES = ((0.35, 0.2, 0.45), (0.2, 0.4, 0.42))
ALL_TABLES = TRAIN_TABLES + OOD_TABLES
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
SPLITS = ("vl", "train", "id", "ood_objects", "ood_scenes", "probe")
SHAPE_BINS = np.array([-0.5, 0.0, 0.5])  # action x of each shape
COLOR_BINS = np.array([-0.75, -0.25, 0.25, 0.75])  # action y of each colour


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    objects: List[Tuple[str, str]]  # (colour, shape); objects[0] is the target
    cells: np.ndarray  # (n,) which of the 3x3 places (row-major) each object sits in
    cover: np.ndarray = field(repr=False)  # (H, W) uint8 pixel class: 0 table, 1 + COMBOS index, N_CLASSES - 1 plate

    @property
    def target(self) -> Tuple[str, str]:
        return self.objects[0]

    @property
    def label(self) -> int:
        return COMBOS.index(self.objects[0])


def _mask(shape: str, xx, yy, cx: float, cy: float, half: float) -> np.ndarray:
    return shape_mask(shape, xx - cx, yy - cy, half, square=0.85, slope=0.6)  # the demo's proportions


def draw(rng: np.random.Generator, objects: Sequence[Tuple[str, str]], table, size: int = 112) -> Scene:
    """Objects in distinct cells of a 3x3 grid (jittered) on a slightly noisy table."""
    img = np.empty((size, size, 3), np.float32)
    img[:] = np.asarray(table, np.float32) + rng.normal(0, 0.03, 3).astype(np.float32)
    cover = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    cells = rng.choice(9, len(objects), replace=False)
    for (colour, shape), cell in zip(objects, cells):
        c = (np.array([cell % 3, cell // 3]) * 2 + 1) / 6 * size + rng.uniform(-0.04, 0.04, 2) * size
        if (colour, shape) == PLATE:
            m = _mask("circle", xx, yy, c[0], c[1], size * 0.14)
            img[m], cover[m] = 0.96, N_CLASSES - 1
        else:
            m = _mask(shape, xx, yy, c[0], c[1], size * rng.uniform(0.095, 0.115))
            img[m], cover[m] = COLORS[colour], 1 + COMBOS.index((colour, shape))
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    pixels = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    return Scene(pixels, list(objects), cells.astype(np.int64), cover)


def _distractors(rng, target, n: int, combos: Sequence[Tuple[str, str]] = COMBOS) -> List[Tuple[str, str]]:
    """``n`` objects from ``combos`` unlike the target: one shares its colour, one its shape (so a question about
    the target must name both)."""
    same_colour = [c for c in combos if c[0] == target[0] and c != target]
    same_shape = [c for c in combos if c[1] == target[1] and c != target]
    pool = [group[rng.integers(len(group))] for group in (same_colour, same_shape) if group]
    rng.shuffle(pool)
    out = pool[:n]
    while len(out) < n:
        c = combos[rng.integers(len(combos))]
        if c != target and c not in out:
            out.append(c)
    return out


def make_split(split: str, n: int, seed: int, size: int = 112) -> List[Scene]:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; one of {SPLITS}.")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    scenes = []
    for _ in range(n):
        if split == "probe":
            objects, tables = [COMBOS[rng.integers(len(COMBOS))]], ALL_TABLES
        elif split == "vl":
            target = COMBOS[rng.integers(len(COMBOS))]
            objects = [target] + _distractors(rng, target, int(rng.integers(0, 3)))
            if rng.random() < 0.5:
                objects.append(PLATE)
            tables = ALL_TABLES
        elif split in ("train", "id"):
            objects, tables = [TRAIN_COMBOS[rng.integers(len(TRAIN_COMBOS))]], TRAIN_TABLES
        elif split == "ood_objects":  # unseen colour x shape, seen tables
            objects, tables = [HELD_OUT[rng.integers(len(HELD_OUT))]], TRAIN_TABLES
        else:  # ood_scenes: seen objects on unseen tables, next to a plate
            objects, tables = [TRAIN_COMBOS[rng.integers(len(TRAIN_COMBOS))], PLATE], OOD_TABLES
        scenes.append(draw(rng, objects, tables[rng.integers(len(tables))], size))
    return scenes


def images(scenes: Sequence[Scene]) -> torch.Tensor:
    """(B, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float().div_(255)


def where(cell: int) -> str:
    """The place words of a 3x3 cell for the VL stage's "where is" answers: "top left" ... "bottom right"."""
    return f"{ROWS[cell // 3]} {COLS[cell % 3]}"


def sort_action(obj: Tuple[str, str]) -> np.ndarray:
    """(x, y) of the bin for ``obj``: x by shape, y by colour."""
    return np.array([SHAPE_BINS[SHAPES.index(obj[1])], COLOR_BINS[list(COLORS).index(obj[0])]], np.float32)


def sorted_right(xy: np.ndarray, obj: Tuple[str, str]) -> bool:
    """Does the predicted (x, y) fall nearest to ``obj``'s bin on both axes?"""
    shape = int(np.argmin(np.abs(SHAPE_BINS - xy[0])))
    colour = int(np.argmin(np.abs(COLOR_BINS - xy[1])))
    return shape == SHAPES.index(obj[1]) and colour == list(COLORS).index(obj[0])


def name(obj: Tuple[str, str]) -> str:
    return f"{obj[0]} {obj[1]}"
