"""Frame keys: how a cached teacher target is found again for a training sample.

A key is the BLAKE2b-128 digest of the frame's uint8 RGB bytes (H, W, 3) and its shape, exactly as the RLDS pipeline
hands it to OpenVLA's image processor. At training time the same bytes are recovered from the batch's
``pixel_values``: the processor only divides by 255 and normalises, so ``round((x * std + mean) * 255)`` gives the
frame back bit for bit. Image augmentation breaks that (the cache refuses to run with it), and a batch that was not
produced from uint8 frames is detected rather than mis-keyed.
"""

from __future__ import annotations

import hashlib
from typing import List, Sequence

import numpy as np
import torch

from ..vla.pixels import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SIGLIP_MEAN,
    SIGLIP_STD,
    normalize_fused,
    rgb_from_pixel_values,
)

KEY_BYTES = 16
# Recovered values must sit this close to an integer; the processor's float32 arithmetic is ~1e-4 off at most.
MAX_ROUNDING = 0.05


def frame_key(frame: np.ndarray) -> bytes:
    """Key of one uint8 RGB frame (H, W, 3)."""
    frame = np.ascontiguousarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame_key needs a uint8 (H, W, 3) RGB frame, got {frame.dtype} {frame.shape}.")
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    h.update(np.asarray(frame.shape, dtype=np.int64).tobytes())
    h.update(frame.tobytes())
    return h.digest()


def frames_from_pixel_values(pixel_values: torch.Tensor) -> np.ndarray:
    """uint8 RGB frames (B, H, W, 3) recovered from OpenVLA ``pixel_values`` (fused 6-channel or 3-channel)."""
    # Exact constants (not the bf16-rounded ones the teacher input uses): the SigLIP channels of a fused input
    # (mean = std = 0.5 are exact in binary), ImageNet's for a single backbone.
    fused = pixel_values.ndim == 4 and pixel_values.shape[1] == 6
    mean, std = (SIGLIP_MEAN, SIGLIP_STD) if fused else (IMAGENET_MEAN, IMAGENET_STD)
    x = pixel_values.detach().to("cpu", torch.float32)
    scaled = rgb_from_pixel_values(x, source="siglip", mean=mean, std=std) * 255.0
    rounded = scaled.round()
    off = (scaled - rounded).abs().max().item() if scaled.numel() else 0.0
    low, high = rounded.aminmax() if rounded.numel() else (torch.tensor(0.0), torch.tensor(0.0))
    if off > MAX_ROUNDING or low < 0 or high > 255:
        raise ValueError(
            "pixel_values do not come from uint8 frames normalised the way OpenVLA's image processor does "
            f"(values are up to {off:.3f} off the 0..255 grid). Cached teacher targets can only be looked up for "
            "unaugmented frames: train with --image_aug false, or drop --align.teacher_cache to run the teacher live."
        )
    return rounded.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def keys_from_pixel_values(pixel_values: torch.Tensor) -> List[bytes]:
    return [frame_key(f) for f in frames_from_pixel_values(pixel_values)]


def pixel_values_from_frames(frames: Sequence[np.ndarray]) -> torch.Tensor:
    """Fused 6-channel ``pixel_values`` for uint8 frames, computed as OpenVLA's processor computes them (to_tensor,
    then normalise with the exact ImageNet and SigLIP constants)."""
    rgb = torch.from_numpy(np.stack([np.asarray(f) for f in frames])).permute(0, 3, 1, 2).float().div(255.0)
    return normalize_fused(rgb)
