"""Extension points: what installed packages register under an entry-point group, and ``module:attr`` targets."""

from __future__ import annotations

import importlib
from typing import Any, Dict


def entry_point_targets(group: str) -> Dict[str, str]:
    """``{name: "module:attr"}`` of the installed packages' entry points in ``group``."""
    from importlib.metadata import entry_points

    eps = entry_points()
    found = eps.select(group=group) if hasattr(eps, "select") else eps.get(group, [])
    return {ep.name: ep.value for ep in found}


def load_target(target: str) -> Any:
    """The object a ``module:attr`` string names (``ImportError``/``AttributeError`` as the import raises them)."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
