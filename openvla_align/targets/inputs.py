"""Teacher inputs: how a batch's ``pixel_values`` become the images a teacher sees, one registered name each.

- ``reference`` (BlindVLA): the DINOv2 half of each fused image un-normalised with the bf16-rounded ImageNet
  constants (what the reference's bf16 tensors give), resized bilinearly to the teacher's resolution.
- ``spatial-forcing`` (Spatial Forcing's ``preprocess_normed_images``): the DINOv2 half un-normalised with the image
  processor's exact ImageNet constants, resized bicubic to the teacher's width (height to the aspect ratio, a multiple
  of 14) and centre-cropped to a square.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Sequence

import torch

from ..norms import IMAGENET_MEAN, IMAGENET_STD
from ..pooling import get_pooling
from ..teachers.base import resize_bicubic_crop, resize_bilinear
from ..vla.pixels import DINO_MEAN_BF16, DINO_STD_BF16, rgb_from_pixel_values


@dataclass(frozen=True)
class TeacherInput:
    mean: Sequence[float]  # un-normalises the DINOv2 half of the fused pixel_values
    std: Sequence[float]
    resize: Callable[[torch.Tensor, int], torch.Tensor]  # [0,1] (B, 3, H, W) -> (B, 3, R, R)

    def rgb(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[0,1] RGB (B, 3, H, W) of (B, 6 or 3, H, W) pixel_values, one image per row."""
        return rgb_from_pixel_values(pixel_values, mean=self.mean, std=self.std)


TEACHER_INPUTS: Dict[str, TeacherInput] = {
    "reference": TeacherInput(DINO_MEAN_BF16, DINO_STD_BF16, resize_bilinear),
    "spatial-forcing": TeacherInput(IMAGENET_MEAN, IMAGENET_STD, resize_bicubic_crop),
}


def get_teacher_input(name: str) -> TeacherInput:
    if name not in TEACHER_INPUTS:
        raise ValueError(f"Unknown teacher input {name!r}; known: {', '.join(TEACHER_INPUTS)}.")
    return TEACHER_INPUTS[name]


def configure_teacher(teacher, config) -> None:
    """Give ``teacher`` the run's input resize and pooling (an ``AlignConfig``'s ``teacher_input``, ``pooling`` and
    ``pooling_pos_embed``); a teacher without these hooks (a third party's module) is left as it is."""
    if not hasattr(teacher, "pool"):
        return
    teacher.resize = get_teacher_input(config.teacher_input).resize
    teacher.pool = get_pooling(config.pooling)
    teacher.pool_pos_embed = float(config.pooling_pos_embed)
