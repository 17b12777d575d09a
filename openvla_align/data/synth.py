"""Synthetic motion-planner episodes in the collector's own file format (for tests and the demo).

Each episode has near-zero steps (dropped by the build unless the gripper toggles), a gripper toggle, and a success
streak that is longer than six steps (so the build's early stop shows), pictured as coloured blocks on a table.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import numpy as np

INSTRUCTIONS = ("put the carrot on the plate", "put the spoon on the towel", "put the eggplant in the basket")


def synthetic_episode(rng: np.random.Generator, steps: int = 12, size: Tuple[int, int] = (480, 640)) -> dict:
    from PIL import Image

    h, w = size
    actions, images, infos = [], [], []
    base = np.full((h, w, 3), rng.integers(60, 200, 3), dtype=np.uint8)
    grip = 1.0
    for t in range(steps):
        if t % 4 == 1:  # a near-zero step: dropped unless the gripper toggles here
            delta = rng.uniform(-0.004, 0.004, 6)
        else:
            delta = np.concatenate([rng.uniform(-0.05, 0.05, 3), rng.uniform(-0.2, 0.2, 3)])
        if t == 5:
            grip = -grip  # close the gripper on a near-zero step: kept because the gripper toggles
        actions.append(np.concatenate([delta, [grip]]).astype(np.float32))
        frame = base.copy()
        y, x = (int(v) for v in rng.integers(0, [h - h // 5, w - w // 5]))
        frame[y : y + h // 5, x : x + w // 5] = rng.integers(0, 256, 3)
        images.append(Image.fromarray(frame))
        infos.append({"success": np.bool_(t >= 2), "elapsed_steps": np.int64(t)})  # a long success streak
    return {
        "is_image_encode": False,
        "image": images,
        "instruction": INSTRUCTIONS[int(rng.integers(len(INSTRUCTIONS)))],
        "action": actions,
        "info": infos,
    }


def write_synthetic_episodes(directory, n: int = 8, steps: int = 12, seed: int = 0, size=(480, 640)) -> List[Path]:
    """``n`` episodes as ``directory/episode_000.npz`` ... in the collector's format (a pickled dict, compressed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = directory / f"episode_{i:03d}.npz"
        np.savez_compressed(path, synthetic_episode(rng, steps, size))
        paths.append(path)
    return paths
