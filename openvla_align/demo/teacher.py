"""Training the demo's teacher (``demo-scenes``, defined in ``teachers.scenes``) on the generated scenes.

Each 14 px patch's feature must predict what covers how much of that patch (soft cross-entropy over the scene
classes) and where it is, seeing a 3x3-patch neighbourhood; a few seconds on the CPU.
"""

from __future__ import annotations

from typing import Sequence

from ..teachers.scenes import SceneTeacher
from .objectives import fit_dense


def train_scene_teacher(teacher: SceneTeacher, scenes: Sequence, n_classes: int, steps: int, seed: int) -> float:
    """Fit the teacher (and a throw-away linear head) to the scenes' patch targets; returns the last loss."""
    losses = fit_dense(
        teacher._features,
        teacher.parameters(),
        scenes,
        teacher.preprocess,
        teacher.spec.width,
        n_classes,
        steps,
        3e-3,
        seed,
        "teacher",
    )
    teacher.freeze()
    return losses[-1]
