"""The generated scenes' object shapes as boolean pixel masks, drawn with numpy: the tiny test data
(``testing.data``), the synthetic VL-Think set (``probe.vlthink_synth``) and the demo (``demo.scenes``) draw with it."""

import numpy as np

SHAPES = ("square", "circle", "triangle", "cross")


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, half: float, *, square: float = 1.0, slope: float = 0.5):
    """Where ``shape`` of half-size ``half`` covers the pixels at offsets ``dx``, ``dy`` from its centre: a square
    of half-side ``square * half``, a circle of radius ``half``, a triangle (apex up, height ``2 * half``, half-width
    ``slope`` times the distance below the apex) or a cross (arms a third of ``half`` wide)."""
    if shape == "square":
        return (np.abs(dx) <= half * square) & (np.abs(dy) <= half * square)
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "triangle":
        return (dy >= -half) & (dy <= half) & (np.abs(dx) <= (dy + half) * slope)
    if shape == "cross":
        return ((np.abs(dx) <= half / 3) & (np.abs(dy) <= half)) | ((np.abs(dy) <= half / 3) & (np.abs(dx) <= half))
    raise ValueError(f"Unknown shape {shape!r}; choose from {SHAPES}.")
