"""The one way to build a teacher: from the registry, seeded when asked, on a device, in a dtype.

``build_teacher`` takes the fields by name (the CLI tools have them as options); ``teacher_from_config`` reads them
from an ``AlignConfig`` (the training path). Every caller in the package builds its teacher through one of the two.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from .. import dtypes
from ._registry import create_teacher
from .spec import STUDENT_GRID, TeacherRequest


def build_teacher(
    name: str,
    *,
    dtype: str = "auto",
    device: Optional[str] = None,
    seed: Optional[int] = None,
    **factory_kwargs: Any,
):
    """The registered teacher ``name``, frozen. ``factory_kwargs``: the fields of ``TeacherRequest`` (``path``,
    ``resolution``, ``grid``, ``allow_random``, ``trust_remote_code``, ``arch``; every one reaches the factory, its
    default where not given) and any keyword a third-party factory adds. ``dtype``: ``auto`` (bfloat16 on CUDA,
    float32 elsewhere; left to the caller when ``device`` is None, e.g. the Aligner resolves it on the VLA's device),
    or a torch dtype name. ``seed`` makes random-weight (smoke-test) teachers the same on every call without touching
    the global RNG."""
    kwargs = {**TeacherRequest().kwargs(), **factory_kwargs}
    if seed is None:
        teacher = create_teacher(name, **kwargs)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            teacher = create_teacher(name, **kwargs)
    if device is not None:
        teacher = teacher.to(device)
    if dtype != "auto" or device is not None:
        teacher = teacher.to(dtypes.torch_dtype(dtypes.resolve(dtype, torch.device(device or "cpu").type)))
    return teacher


def teacher_from_config(
    config, *, grid: Tuple[int, int] = STUDENT_GRID, device: Optional[str] = None, **factory_kwargs
):
    """The teacher an ``AlignConfig`` names, with its path, resolution, weights policy and dtype."""
    return build_teacher(
        config.teacher,
        path=config.teacher_path,
        resolution=config.teacher_resolution,
        grid=grid,
        allow_random=config.allow_random_teacher,
        trust_remote_code=config.trust_remote_code,
        dtype=config.teacher_dtype,
        device=device,
        **factory_kwargs,
    )
