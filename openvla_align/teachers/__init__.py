"""Vision teachers: registry plus one module per family (radio, dinov2, siglip, theia)."""

from ._registry import (
    ENTRY_POINT_GROUP,
    TeacherPluginError,
    broken_plugins,
    create_teacher,
    get_teacher_factory,
    list_teachers,
    load_plugins,
    register_builtin,
    register_teacher,
    teacher_spec,
)
from .spec import STUDENT_GRID, CatalogEntry, TeacherRequest, TeacherSpec, TeacherWeightsNotFound, WeightSource

_TORCH_NAMES = {"Teacher", "resample_grid"}  # from .base, imported on first use (the rest needs no torch)
_BUILD_NAMES = {"build_teacher", "teacher_from_config"}  # from .build, likewise


def __getattr__(name: str):
    if name in _TORCH_NAMES:
        from . import base

        return getattr(base, name)
    if name in _BUILD_NAMES:
        from . import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CatalogEntry",
    "ENTRY_POINT_GROUP",
    "STUDENT_GRID",
    "Teacher",
    "TeacherPluginError",
    "TeacherRequest",
    "TeacherSpec",
    "WeightSource",
    "TeacherWeightsNotFound",
    "broken_plugins",
    "build_teacher",
    "create_teacher",
    "get_teacher_factory",
    "list_teachers",
    "load_plugins",
    "register_builtin",
    "register_teacher",
    "resample_grid",
    "teacher_from_config",
    "teacher_spec",
]
