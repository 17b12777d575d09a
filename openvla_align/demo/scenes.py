"""The demo's world: coloured blocks on a table, drawn with numpy, and its splits.

A scene is ``size`` x ``size`` RGB, stored as uint8 (50 KB a scene with its class map, 175 MB for the demo's
~3,500): a table colour, one or more blocks (a hue x shade each, e.g. "dark red", no two alike) in distinct cells of
a 3x3 grid, sometimes a white plate. ``objects[0]`` is the *target*.

The robot task sorts the target into a bin: x by its shade, y by its hue (``sort_action``), so the action depends on
what the object is, read from the pixels (the instruction does not name it). Both attributes are properties of every
pixel of the block: the demo's 14 px patches and small towers tell shades apart as readily as hues, where shapes
(squares, circles, triangles of ~22 px, measured for issue 31) stayed near chance for the tiny VLA. Splits, in
miniature of the paper's in-distribution and OOD evaluations:

- ``vl``: the "web" data the teacher and the VLA learn concepts from: every hue x shade, every table, 1-3
  objects, a plate half the time.
- ``train`` / ``id``: robot data, narrow like a real robot dataset: one object of the 9 ``TRAIN_COMBOS`` on the
  ``TRAIN_TABLES``.
- ``ood_objects``: an object of the 3 ``HELD_OUT`` combinations (each hue and each shade was seen in robot data,
  never together) on a seen table.
- ``ood_scenes``: a seen object on an unseen table (``OOD_TABLES``) next to a plate.
- ``probe``: one object on any table; label = its hue x shade (12 classes, chance 1/12).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import numpy as np
import torch

from ..shapes import shape_mask

COLORS = {"red": (0.9, 0.12, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1)}
SHADES = ("bright", "dark", "pale")  # the hue as is, halved, mixed with white
COMBOS: Tuple[Tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHADES)  # the 12 probe classes
PLATE = ("white", "plate")  # scenery: never a target; the OOD split's distractor
N_CLASSES = len(COMBOS) + 2  # per-pixel classes: table, the 12 objects, the plate
HELD_OUT = (("red", "dark"), ("green", "pale"), ("blue", "bright"))  # never a robot-data target
TRAIN_COMBOS = tuple(c for c in COMBOS if c not in HELD_OUT)
TRAIN_TABLES = ((0.62, 0.5, 0.38), (0.55, 0.55, 0.55), (0.7, 0.62, 0.5))
OOD_TABLES = ((0.35, 0.2, 0.45), (0.2, 0.4, 0.42))
ALL_TABLES = TRAIN_TABLES + OOD_TABLES
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
SPLITS = ("vl", "train", "id", "ood_objects", "ood_scenes", "probe")
SHADE_BINS = np.array([-0.5, 0.0, 0.5])  # action x of each shade
COLOR_BINS = np.array([-0.75, -0.25, 0.25, 0.75])  # action y of each hue


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    objects: List[Tuple[str, str]]  # (hue, shade); objects[0] is the target
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


def rgb(colour: str, shade: str) -> Tuple[float, float, float]:
    """The block's colour: its hue as is ("bright"), halved ("dark") or mixed with white ("pale")."""
    hue = COLORS[colour]
    if shade == "dark":
        return tuple(0.5 * v for v in hue)
    if shade == "pale":
        return tuple(0.45 + 0.55 * v for v in hue)
    return hue


def draw(rng: np.random.Generator, objects: Sequence[Tuple[str, str]], table, size: int = 112) -> Scene:
    """Blocks (squares of jittered size) in distinct cells of a 3x3 grid (jittered) on a slightly noisy table."""
    img = np.empty((size, size, 3), np.float32)
    img[:] = np.asarray(table, np.float32) + rng.normal(0, 0.03, 3).astype(np.float32)
    cover = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    cells = rng.choice(9, len(objects), replace=False)
    for (colour, shade), cell in zip(objects, cells):
        c = (np.array([cell % 3, cell // 3]) * 2 + 1) / 6 * size + rng.uniform(-0.04, 0.04, 2) * size
        if (colour, shade) == PLATE:
            m = _mask("circle", xx, yy, c[0], c[1], size * 0.14)
            img[m], cover[m] = 0.96, N_CLASSES - 1
        else:
            m = _mask("square", xx, yy, c[0], c[1], size * rng.uniform(0.095, 0.115))
            img[m], cover[m] = rgb(colour, shade), 1 + COMBOS.index((colour, shade))
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    pixels = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    return Scene(pixels, list(objects), cells.astype(np.int64), cover)


def _distractors(rng, target, n: int, combos: Sequence[Tuple[str, str]] = COMBOS) -> List[Tuple[str, str]]:
    """``n`` objects from ``combos`` unlike the target: one shares its hue, one its shade (so a question about
    the target must name both)."""
    same_colour = [c for c in combos if c[0] == target[0] and c != target]
    same_shade = [c for c in combos if c[1] == target[1] and c != target]
    pool = [group[rng.integers(len(group))] for group in (same_colour, same_shade) if group]
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
        elif split == "ood_objects":  # unseen hue x shade, seen tables
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
    """(x, y) of the bin for ``obj``: x by shade, y by hue."""
    return np.array([SHADE_BINS[SHADES.index(obj[1])], COLOR_BINS[list(COLORS).index(obj[0])]], np.float32)


def sorted_right(xy: np.ndarray, obj: Tuple[str, str]) -> bool:
    """Does the predicted (x, y) fall nearest to ``obj``'s bin on both axes?"""
    shade = int(np.argmin(np.abs(SHADE_BINS - xy[0])))
    colour = int(np.argmin(np.abs(COLOR_BINS - xy[1])))
    return shade == SHADES.index(obj[1]) and colour == list(COLORS).index(obj[0])


def name(obj: Tuple[str, str]) -> str:
    """ "dark red" """
    return f"{obj[1]} {obj[0]}"
