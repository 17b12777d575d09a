"""Teacher registry: a decorator, an fnmatch listing and one factory; third parties join via entry points.

Built-in teachers register through the same entry-point group (``openvla_align.teachers``) as third-party ones.
An entry point may name a module (importing it runs its ``@register_teacher`` decorators or ``register_builtin``
calls, and its ``TEACHERS`` table of ``CatalogEntry`` is registered) or a factory callable (registered under the
entry point's name). The built-ins are data (``catalog.TEACHERS``): a spec and the family module that builds them,
imported only when one of its teachers is created, so listing teachers needs no torch.

Every factory takes the same keywords, the fields of ``spec.TeacherRequest``. A family module registered with
``register_builtin`` implements ``build(spec, request, **params) -> Teacher``; the registry makes its keyword factory.
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any, Callable, Dict, List, Mapping, Optional

from .._plugins import entry_points
from .spec import TeacherRequest

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "openvla_align.teachers"
# Modules shipped with the package (their ``TEACHERS`` tables); read even when the package is used from a source tree
# without its entry points installed (e.g. `PYTHONPATH=. pytest`).
_BUILTIN_MODULES = ("openvla_align.teachers.catalog",)


class TeacherPluginError(RuntimeError):
    """A teacher plugin (entry point) failed to load."""


@dataclass(frozen=True)
class _Entry:
    name: str
    factory: Optional[Callable]  # None for a built-in until first use: see `_family_factory`
    source: str
    spec: Optional[object] = None  # TeacherSpec of the full-size model, shown by `openvla-align teachers`
    params: Mapping[str, Any] = field(default_factory=dict)


_REGISTRY: Dict[str, _Entry] = {}
_BROKEN: Dict[str, str] = {}  # entry-point name -> why it failed to load (reported once)
_loaded = False


def register_teacher(name: Optional[str] = None, *, spec=None, source: str = "") -> Callable:
    """Decorator registering a teacher factory ``fn(**kw) -> Teacher``; returns ``fn`` unchanged.

    Factories accept the fields of ``TeacherRequest`` as keywords (``path``, ``resolution``, ``grid``,
    ``allow_random``, ``trust_remote_code``, ``arch``) and ignore none of them silently.
    """

    def wrap(fn: Callable) -> Callable:
        key = name or fn.__name__
        prior = _REGISTRY.get(key)
        if prior is not None and prior.factory is not fn:
            raise ValueError(f"Teacher {key!r} is already registered by {prior.source or prior.factory.__module__}.")
        _REGISTRY[key] = _Entry(key, fn, source or fn.__module__, spec)
        return fn

    return wrap


def register_builtin(spec, module: str, **params: Any) -> None:
    """Register ``spec.name`` as data: ``module`` (imported when the teacher is first created) builds it with
    ``build(spec, request, **params)``, ``request`` a ``TeacherRequest`` of the factory call's keywords."""
    prior = _REGISTRY.get(spec.name)
    if prior is not None and (prior.source, prior.spec, dict(prior.params)) != (module, spec, params):
        raise ValueError(f"Teacher {spec.name!r} is already registered by {prior.source}.")
    if prior is None:
        _REGISTRY[spec.name] = _Entry(spec.name, None, module, spec, params)


def _register_table(module: ModuleType) -> None:
    """Register each ``CatalogEntry`` of a plugin module's ``TEACHERS`` table (a module may have none)."""
    for entry in getattr(module, "TEACHERS", ()):
        register_builtin(entry.spec, entry.module, **entry.params)


def load_plugins(force: bool = False) -> None:
    """Import the built-in teacher modules and every entry point of ``openvla_align.teachers`` once.

    A plugin that fails to load is logged once, with its name and error, and kept in :func:`broken_plugins`; every
    other plugin still loads. Asking for a broken plugin's teacher raises :class:`TeacherPluginError`.
    """
    global _loaded
    if _loaded and not force:
        return
    for module in _BUILTIN_MODULES:
        _register_table(importlib.import_module(module))
    for ep in entry_points(ENTRY_POINT_GROUP):
        if ep.name in _BROKEN and not force:
            continue
        try:
            obj = ep.load()
            if isinstance(obj, ModuleType):
                _register_table(obj)
            elif callable(obj):
                register_teacher(ep.name, source=ep.value)(obj)
        except Exception as exc:  # a broken third-party plugin must say which one it is, and hide no other
            _BROKEN[ep.name] = (
                f"Teacher plugin {ep.name!r} ({ep.value}) from entry-point group {ENTRY_POINT_GROUP!r} failed to "
                f"load: {exc!r}. Fix or uninstall the package that provides it."
            )
            logger.error("%s", _BROKEN[ep.name])
        else:
            _BROKEN.pop(ep.name, None)
    _loaded = True


def broken_plugins() -> Dict[str, str]:
    """Entry-point name -> error message of each teacher plugin that failed to load."""
    load_plugins()
    return dict(_BROKEN)


def list_teachers(pattern: str = "*") -> List[str]:
    """Sorted names of registered teachers matching an fnmatch ``pattern``."""
    load_plugins()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_teacher_factory(name: str) -> Callable:
    load_plugins()
    if name not in _REGISTRY:
        if name in _BROKEN:
            raise TeacherPluginError(_BROKEN[name])
        broken = f" (plugins that failed to load: {', '.join(sorted(_BROKEN))})" if _BROKEN else ""
        raise ValueError(f"Unknown teacher {name!r}. Known teachers: {', '.join(list_teachers())}{broken}.")
    entry = _REGISTRY[name]
    if entry.factory is None:
        entry = _REGISTRY[name] = replace(entry, factory=_family_factory(entry))
    return entry.factory


def _family_factory(entry: _Entry) -> Callable:
    """The keyword factory of a teacher registered as data: one ``TeacherRequest`` to its family's ``build``."""
    build = importlib.import_module(entry.source).build

    def factory(**kwargs: Any):
        return build(entry.spec, TeacherRequest.from_kwargs(entry.name, kwargs), **entry.params)

    factory.__name__ = factory.__qualname__ = "create_" + entry.name.replace("-", "_")
    factory.__module__ = entry.source
    factory.__doc__ = f"Build the frozen {entry.name} teacher; keywords: the fields of TeacherRequest."
    return factory


def teacher_spec(name: str):
    """The registered full-size ``TeacherSpec`` of ``name`` (None when its plugin gave none)."""
    load_plugins()
    if name not in _REGISTRY:
        get_teacher_factory(name)  # raises the unknown/broken-teacher error
    return _REGISTRY[name].spec


def create_teacher(name: str, **kwargs):
    """Build the registered teacher ``name``; keyword arguments go to its factory (path, resolution, ...)."""
    return get_teacher_factory(name)(**kwargs)
