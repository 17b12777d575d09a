"""What is installed: distributions' versions, entry points of a group, and the ``module:attr`` targets they name."""

from __future__ import annotations

import importlib
from typing import Any, Dict, Optional


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


def installed_version(distribution: str) -> Optional[str]:
    """The installed version of ``distribution``; None when it is not installed (e.g. run from a source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None
