"""Recover [0,1] RGB from OpenVLA's ``pixel_values``.

OpenVLA-7B's fused backbone receives 6 channels per image: channels 0-2 normalised for DINOv2 (ImageNet mean/std) and
channels 3-5 normalised for SigLIP (mean = std = 0.5). OpenVLA-OFT stacks several such images along the channels
(third-person camera first, then wrist cameras): 6 x ``num_images_in_input`` channels; ``split_images`` turns them
into one image per row, in the order the model puts their visual tokens. The tensors reach the model in bf16, so the
reference implementation de-normalises with the bf16-rounded ImageNet constants; we default to the same numbers
so teachers see exactly what they see there.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..norms import IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD


def _bf16(values: Sequence[float]) -> tuple:
    return tuple(torch.tensor(values, dtype=torch.float32).to(torch.bfloat16).float().tolist())


# (0.484375, 0.455078125, 0.40625) and (0.228515625, 0.2236328125, 0.224609375)
DINO_MEAN_BF16 = _bf16(IMAGENET_MEAN)
DINO_STD_BF16 = _bf16(IMAGENET_STD)


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """x * std + mean per channel, computed in float32."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.float() * s + m


def images_per_sample(pixel_values: torch.Tensor) -> int:
    """How many images each row of ``pixel_values`` holds: 3 channels is one single-backbone image, 6k channels k
    fused images (OFT's multi-image inputs exist only for the fused backbone)."""
    channels = pixel_values.shape[1] if pixel_values.ndim == 4 else 0
    if channels == 3:
        return 1
    if channels == 0 or channels % 6:
        raise ValueError(
            f"pixel_values must be (B, 6 * num_images, H, W) (fused DINOv2+SigLIP, OpenVLA-OFT stacks its cameras) or "
            f"(B, 3, H, W) (single backbone); got {tuple(pixel_values.shape)}."
        )
    return channels // 6


def image_tokens(visual: torch.Tensor, num_images: int, images: str = "all") -> torch.Tensor:
    """Visual tokens (B, N * T, D) of every image (``"all"``) or of the first, third-person one (``"primary"``)."""
    if images not in ("all", "primary"):
        raise ValueError(f"images={images!r}: choose one of ('all', 'primary').")
    if images == "all" or num_images <= 1:
        return visual
    if visual.shape[1] % num_images:
        raise ValueError(
            f"The VLA has {visual.shape[1]} visual tokens, not a multiple of the {num_images} images per sample; "
            "check num_images_in_input against the pixel_values the model is given."
        )
    return visual[:, : visual.shape[1] // num_images]


def split_images(pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 6N, H, W) -> (B * N, 6, H, W): sample 0's N images, then sample 1's, ... (the models' token order). A
    3-channel or 6-channel batch is returned as it is."""
    n = images_per_sample(pixel_values)
    if n == 1:
        return pixel_values
    b, c, h, w = pixel_values.shape
    return pixel_values.reshape(b * n, c // n, h, w)


def rgb_from_pixel_values(
    pixel_values: torch.Tensor,
    *,
    source: str = "dino",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """[0,1] float32 RGB (B,3,H,W) from OpenVLA ``pixel_values``.

    6 channels (fused DINOv2+SigLIP): ``source="dino"`` (default, what the reference uses) reads channels 0-2,
    ``source="siglip"`` channels 3-5. 3 channels (single backbone): pass that backbone's ``mean``/``std``
    (default: DINOv2's). Not clamped: like the reference, values a hair outside [0, 1] from the
    bf16-rounded constants are passed on as they are.
    """
    if pixel_values.ndim != 4 or pixel_values.shape[1] not in (3, 6):
        raise ValueError(
            f"pixel_values must be (B, 6, H, W) (fused DINOv2+SigLIP) or (B, 3, H, W); got {tuple(pixel_values.shape)}."
        )
    if source not in ("dino", "siglip"):
        raise ValueError(f"source={source!r} must be 'dino' or 'siglip'.")
    if pixel_values.shape[1] == 6:
        x = pixel_values[:, :3] if source == "dino" else pixel_values[:, 3:]
        default_mean, default_std = (DINO_MEAN_BF16, DINO_STD_BF16) if source == "dino" else (SIGLIP_MEAN, SIGLIP_STD)
    else:
        x = pixel_values
        default_mean, default_std = DINO_MEAN_BF16, DINO_STD_BF16
    return denormalize(x, mean or default_mean, std or default_std)


def normalize_fused(rgb: torch.Tensor) -> torch.Tensor:
    """The inverse: [0,1] RGB -> OpenVLA's fused 6-channel ``pixel_values`` (exact ImageNet / SigLIP constants,
    as OpenVLA's image processor computes them)."""

    def norm(mean, std):
        m, s = (torch.tensor(v, device=rgb.device).view(1, 3, 1, 1) for v in (mean, std))
        return (rgb - m) / s

    return torch.cat([norm(IMAGENET_MEAN, IMAGENET_STD), norm(SIGLIP_MEAN, SIGLIP_STD)], dim=1)
