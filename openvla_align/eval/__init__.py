"""Simpler/ManiSkill evaluation: the paper's environments, result files and the tables built from them."""

from .envs import OOD_AXES, OOD_ENVS, VL_THINK, axis_of, short_name
from .results import Run, load_run, write_result

__all__ = [
    "OOD_AXES",
    "OOD_ENVS",
    "VL_THINK",
    "Run",
    "axis_of",
    "load_run",
    "short_name",
    "write_result",
]
