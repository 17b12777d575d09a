"""What is installed: distributions' versions, entry points of a group, and the ``module:attr`` targets they name."""

from __future__ import annotations

import importlib
from typing import Any, Dict, List, Optional


def entry_points(group: str) -> List[Any]:
    """The installed packages' entry points (``importlib.metadata.EntryPoint``) in ``group``."""
    from importlib.metadata import entry_points as installed

    eps = installed()
    return list(eps.select(group=group) if hasattr(eps, "select") else eps.get(group, []))


def entry_point_targets(group: str) -> Dict[str, str]:
    """``{name: "module:attr"}`` of the installed packages' entry points in ``group``."""
    return {ep.name: ep.value for ep in entry_points(group)}


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
