"""Episode videos: an animated GIF of the environment's frames with the instruction and the success step drawn on."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def write_episode_gif(
    path, frames: Sequence[np.ndarray], instruction: str, success_step: Optional[int], fps: int = 5
) -> Path:
    """``frames`` (uint8 H x W x 3; frame 0 after reset, frame t after step t) at the control rate (5 Hz), with the
    instruction on every frame and, from ``success_step`` on, "success at step N"."""
    from PIL import Image, ImageDraw

    from .._io import atomic_write_bytes

    images = []
    for t, frame in enumerate(frames):
        im = Image.fromarray(np.asarray(frame, dtype=np.uint8)).convert("RGB")
        draw = ImageDraw.Draw(im)
        lines = [instruction, f"step {t}"]
        if success_step is not None and t >= success_step:
            lines.append(f"success at step {success_step}")
        for i, text in enumerate(lines):
            xy = (6, 6 + 14 * i)
            draw.text((xy[0] + 1, xy[1] + 1), text, fill=(0, 0, 0))
            draw.text(xy, text, fill=(255, 255, 0) if "success" in text else (255, 255, 255))
        images.append(im)
    import io

    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path
