"""Vision teachers: registry plus one module per family (radio, dinov2, siglip, theia)."""

from ._registry import (
    ENTRY_POINT_GROUP,
    TeacherPluginError,
    broken_plugins,
    create_teacher,
    get_teacher_factory,
    list_teachers,
    load_plugins,
    register_teacher,
    teacher_spec,
)
from .base import STUDENT_GRID, Teacher, TeacherSpec, TeacherWeightsNotFound, resample_grid

__all__ = [
    "ENTRY_POINT_GROUP",
    "STUDENT_GRID",
    "Teacher",
    "TeacherPluginError",
    "TeacherSpec",
    "TeacherWeightsNotFound",
    "broken_plugins",
    "create_teacher",
    "get_teacher_factory",
    "list_teachers",
    "load_plugins",
    "register_teacher",
    "resample_grid",
    "teacher_spec",
]
