import pytest
import torch

from openvla_align.vla.pixels import (
    DINO_MEAN_BF16,
    DINO_STD_BF16,
    normalize_fused,
    rgb_from_pixel_values,
)


def test_bf16_constants_are_the_reference_numbers():
    assert DINO_MEAN_BF16 == (0.484375, 0.455078125, 0.40625)
    assert DINO_STD_BF16 == (0.228515625, 0.2236328125, 0.224609375)


def test_fused_round_trip():
    rgb = torch.rand(2, 3, 8, 8)
    pv = normalize_fused(rgb)
    assert pv.shape == (2, 6, 8, 8)
    # SigLIP half is exact; the DINOv2 half uses the bf16-rounded constants (as the reference), off by < 0.3 %.
    torch.testing.assert_close(rgb_from_pixel_values(pv, source="siglip"), rgb, atol=1e-6, rtol=0)
    torch.testing.assert_close(rgb_from_pixel_values(pv), rgb, atol=4e-3, rtol=0)
    exact = rgb_from_pixel_values(pv, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    torch.testing.assert_close(exact, rgb, atol=1e-6, rtol=0)


def test_dino_half_matches_reference_formula():
    pv = torch.randn(2, 6, 4, 4)
    mean = torch.tensor(DINO_MEAN_BF16).view(1, 3, 1, 1)
    std = torch.tensor(DINO_STD_BF16).view(1, 3, 1, 1)
    torch.testing.assert_close(rgb_from_pixel_values(pv), pv[:, :3] * std + mean)


def test_single_backbone_and_bad_shapes():
    rgb = torch.rand(1, 3, 4, 4)
    pv = (rgb - 0.5) / 0.5
    torch.testing.assert_close(rgb_from_pixel_values(pv, mean=(0.5,) * 3, std=(0.5,) * 3), rgb)
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, 6, H, W\)"):
        rgb_from_pixel_values(torch.zeros(1, 4, 2, 2))
