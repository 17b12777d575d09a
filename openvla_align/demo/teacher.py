"""Training the demo's teacher (``demo-scenes``, defined in ``teachers.scenes``) on the generated scenes.

Each 14 px patch's feature must predict what covers how much of that patch (soft cross-entropy over the scene
classes) and where it is, seeing a 3x3-patch neighbourhood; a few seconds on the CPU.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..teachers.scenes import SceneTeacher
from .objectives import fit_dense


def train_scene_teacher(
    teacher: SceneTeacher, images: torch.Tensor, covers: Sequence[np.ndarray], n_classes: int, steps: int, seed: int
) -> float:
    """Fit the teacher (and a throw-away linear head) to the patch targets; returns the last loss."""
    x = teacher.preprocess(images)
    losses = fit_dense(
        teacher._features, teacher.parameters(), x, covers, teacher.spec.width, n_classes, steps, 3e-3, seed, "teacher"
    )
    teacher.freeze()
    return losses[-1]
