"""A small synthetic VL-Think set: coloured boards on a table, questions with and without the board, as JSONL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from ..shapes import SHAPES, shape_mask
from .vlthink_items import POSITIONS

SYNTH_COLORS = {
    "black": (20, 20, 20),
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 230),
    "orange": (245, 140, 20),
    "purple": (140, 50, 170),
    "yellow": (240, 215, 30),
    "brown": (120, 70, 30),
}
SYNTH_SHAPES = SHAPES


def _shape_mask(shape: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2.0
    return shape_mask(shape, xx - c, yy - c, size * 0.32)


def make_synthetic_vlthink(directory: Union[str, Path], n_scenes: int = 12, seed: int = 0, size: int = 224) -> Path:
    """Write a small VL-Think-style set for tests and smoke runs: ``directory/images/*.png`` and
    ``directory/vlthink.jsonl``.

    Each scene is a table with 2-3 boards in left/center/right slots; even scenes are *color* scenes (plain
    boards of different colours, board = "the red board"), odd scenes *shape* scenes (white boards with a black
    shape, board = "the circle board"). Every scene gets one question about a present board and one about an
    absent one. Synthetic: it exercises the pipeline, it is not the paper's benchmark."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    board_px = size // 4
    slot_x = {"left": size // 6, "center": size // 2, "right": 5 * size // 6}
    items = []
    for s in range(n_scenes):
        img = np.empty((size, size, 3), np.uint8)
        img[:] = rng.integers(120, 170, 3)  # table
        domain = "color" if s % 2 == 0 else "shape"
        names = list(SYNTH_COLORS) if domain == "color" else list(SYNTH_SHAPES)
        k = int(rng.integers(2, 4))
        chosen = [names[i] for i in rng.permutation(len(names))[: k + 1]]
        shown, absent = chosen[:k], chosen[k]
        slots = [POSITIONS[i] for i in sorted(rng.permutation(3)[:k])]
        top = size // 2 - board_px // 2 + int(rng.integers(-size // 10, size // 10))
        for name, slot in zip(shown, slots):
            left = slot_x[slot] - board_px // 2
            region = img[top : top + board_px, left : left + board_px]
            if domain == "color":
                region[:] = SYNTH_COLORS[name]
            else:
                region[:] = (235, 235, 235)
                region[_shape_mask(name, board_px)] = (15, 15, 15)
        noise = rng.normal(0, 4, img.shape)
        img = np.clip(img.astype(np.float64) + noise, 0, 255).astype(np.uint8)
        rel = f"images/scene_{s:03d}.png"
        Image.fromarray(img).save(directory / rel)
        target = int(rng.integers(k))
        items.append(
            {
                "image": rel,
                "board": f"the {shown[target]} board",
                "present": True,
                "position": slots[target],
                "domain": domain,
            }
        )
        items.append(
            {"image": rel, "board": f"the {absent} board", "present": False, "position": None, "domain": domain}
        )
    path = directory / "vlthink.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    return path
