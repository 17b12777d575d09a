"""Frame keys: how a cached teacher target is found again for a training sample.

A key is the BLAKE2b-128 digest of the frame's uint8 RGB bytes (H, W, 3) and its shape, exactly as the RLDS pipeline
hands it to OpenVLA's image processor. At training time the same bytes are recovered from the batch's
``pixel_values``: the processor only divides by 255 and normalises, so ``round((x * std + mean) * 255)`` gives the
frame back bit for bit. Image augmentation breaks that (the cache refuses to run with it), and a batch that was not
produced from uint8 frames is detected rather than mis-keyed.

A multi-view teacher's targets belong to a *sample* (its cameras seen together): a sample's key is the BLAKE2b-128
digest of its frames' keys in camera order (``sample_key``), so the same frames in another order or with another
camera are another sample.

The recovery runs on the training loop's thread every step (2 cameras x batch 8 = 16 frames of 224 px at OpenVLA-OFT's
7B recipe), so it is written for that: one strided pass from the normalised channels straight into a channels-last
float buffer, the checks in place, and no (B, 3, H, W) -> (B, H, W, 3) copy of its own (~4x faster than the plain
chain of tensor ops, which allocated seven frame-sized temporaries).
"""

from __future__ import annotations

import hashlib
from typing import List, Sequence

import numpy as np
import torch

from ..vla.pixels import IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD, normalize_fused

KEY_BYTES = 16
# Recovered values must sit this close to an integer; the processor's float32 arithmetic is ~1e-4 off at most.
MAX_ROUNDING = 0.05
_SAMPLE_PERSON = b"oa-sample-key"  # domain separation: a sample key never equals a frame key


def _frame_hash(shape_bytes: bytes, data) -> bytes:
    h = hashlib.blake2b(shape_bytes, digest_size=KEY_BYTES)
    h.update(data)
    return h.digest()


def frame_key(frame: np.ndarray) -> bytes:
    """Key of one uint8 RGB frame (H, W, 3)."""
    frame = np.ascontiguousarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame_key needs a uint8 (H, W, 3) RGB frame, got {frame.dtype} {frame.shape}.")
    return _frame_hash(np.asarray(frame.shape, dtype=np.int64).tobytes(), frame)


def sample_key(frame_keys: Sequence[bytes]) -> bytes:
    """Key of a sample's cameras seen together (a multi-view teacher's row): its frames' keys, in camera order."""
    if not frame_keys or any(len(k) != KEY_BYTES for k in frame_keys):
        raise ValueError(f"sample_key needs one or more {KEY_BYTES}-byte frame keys.")
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=_SAMPLE_PERSON)
    h.update(len(frame_keys).to_bytes(4, "little"))
    for key in frame_keys:
        h.update(key)
    return h.digest()


def sample_keys(frame_keys: Sequence[bytes], views: int) -> List[bytes]:
    """Sample keys of consecutive groups of ``views`` frame keys (one image per row, a sample's cameras in a row)."""
    if views < 1 or len(frame_keys) % views:
        raise ValueError(f"{len(frame_keys)} images are not whole samples of {views} camera(s) each.")
    return [sample_key(frame_keys[i : i + views]) for i in range(0, len(frame_keys), views)]


def frames_from_pixel_values(pixel_values: torch.Tensor) -> np.ndarray:
    """uint8 RGB frames (B, H, W, 3) recovered from OpenVLA ``pixel_values`` (fused 6-channel or 3-channel)."""
    if pixel_values.ndim != 4 or pixel_values.shape[1] not in (3, 6):
        raise ValueError(
            f"pixel_values must be (B, 6, H, W) (fused DINOv2+SigLIP) or (B, 3, H, W); got {tuple(pixel_values.shape)}."
        )
    # Exact constants (not the bf16-rounded ones the teacher input uses): the SigLIP channels of a fused input
    # (mean = std = 0.5 are exact in binary), ImageNet's for a single backbone. x * (255 std) + 255 mean lands within
    # ~1e-4 of the integer the processor started from, as x * std + mean then * 255 does.
    fused = pixel_values.shape[1] == 6
    mean, std = (SIGLIP_MEAN, SIGLIP_STD) if fused else (IMAGENET_MEAN, IMAGENET_STD)
    x = pixel_values.detach()
    x = (x[:, 3:] if fused else x).to("cpu", torch.float32)
    b, _, h, w = x.shape
    scaled = torch.empty((b, h, w, 3), dtype=torch.float32)  # channels-last: the frames' own layout
    if len(set(mean)) == 1 and len(set(std)) == 1:
        torch.mul(x.permute(0, 2, 3, 1), std[0] * 255.0, out=scaled).add_(mean[0] * 255.0)
    else:
        torch.mul(x.permute(0, 2, 3, 1), torch.tensor(std, dtype=torch.float32) * 255.0, out=scaled)
        scaled.add_(torch.tensor(mean, dtype=torch.float32) * 255.0)
    rounded = scaled.round()
    if scaled.numel():
        low, high = rounded.aminmax()
        off = scaled.sub_(rounded).abs_().max().item()  # `scaled` is spent from here on
    else:
        low = high = torch.tensor(0.0)
        off = 0.0
    if not off <= MAX_ROUNDING or low < 0 or high > 255:  # `not <=`: a NaN fails too
        raise ValueError(
            "pixel_values do not come from uint8 frames normalised the way OpenVLA's image processor does "
            f"(values are up to {off:.3f} off the 0..255 grid). Cached teacher targets can only be looked up for "
            "unaugmented frames: train with --image_aug false, or drop --align.teacher_cache to run the teacher live."
        )
    return rounded.to(torch.uint8).numpy()


def keys_from_pixel_values(pixel_values: torch.Tensor) -> List[bytes]:
    """One key per row of ``pixel_values`` (one image per row), as ``frame_key`` of the recovered frame."""
    frames = frames_from_pixel_values(pixel_values)
    shape = np.asarray(frames.shape[1:], dtype=np.int64).tobytes()
    return [_frame_hash(shape, frame) for frame in frames]  # each row is C-contiguous: hashed in place


def pixel_values_from_frames(frames: Sequence[np.ndarray]) -> torch.Tensor:
    """Fused 6-channel ``pixel_values`` for uint8 frames, computed as OpenVLA's processor computes them (to_tensor,
    then normalise with the exact ImageNet and SigLIP constants)."""
    rgb = torch.from_numpy(np.stack([np.asarray(f) for f in frames])).permute(0, 3, 1, 2).float().div(255.0)
    return normalize_fused(rgb)
