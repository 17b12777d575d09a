"""Episode videos: an animated GIF of the environment's frames with the instruction and the success step drawn on."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np


def _font(size: int):
    """A legible scalable font: matplotlib's DejaVu Sans when matplotlib is installed, else PIL's scalable default
    (Pillow >= 10.1), else PIL's bitmap font."""
    from PIL import ImageFont

    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except Exception:  # no matplotlib, or no FreeType in this Pillow
        pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> List[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels (a longer word gets a line of its own)."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + ([line] if line else [])


def write_episode_gif(
    path, frames: Sequence[np.ndarray], instruction: str, success_step: Optional[int], fps: int = 5
) -> Path:
    """``frames`` (uint8 H x W x 3; frame 0 after reset, frame t after step t) at the control rate (5 Hz), with the
    instruction on every frame and, from ``success_step`` on, "success at step N": in a scalable font sized to the
    frame (21 px on the simulator's 640 x 480) on a dark band across the top, wrapped to the frame's width."""
    from PIL import Image, ImageDraw

    from .._io import atomic_write_bytes

    images, font = [], None
    for t, frame in enumerate(frames):
        im = Image.fromarray(np.asarray(frame, dtype=np.uint8)).convert("RGB")
        if font is None:
            size = max(12, im.height // 22)
            font, pad = _font(size), max(3, size // 4)
        draw = ImageDraw.Draw(im, "RGBA")
        lines = [(text, (255, 255, 255)) for text in _wrap(draw, instruction, font, im.width - 2 * pad)]
        lines.append((f"step {t}", (200, 200, 200)))
        if success_step is not None and t >= success_step:
            lines.append((f"success at step {success_step}", (255, 220, 0)))
        line_height = int(font.getbbox("Hg")[3]) + pad
        draw.rectangle((0, 0, im.width, pad + line_height * len(lines)), fill=(0, 0, 0, 170))
        for i, (text, colour) in enumerate(lines):
            draw.text((pad, pad + line_height * i), text, fill=colour, font=font)
        images.append(im)
    import io

    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path
