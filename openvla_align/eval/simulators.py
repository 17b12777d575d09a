"""The simulators ``eval run`` rolls policies out in; an evaluation recipe's ``simulator:`` names one.

A name is a built-in (``simpler``: the paper's Simpler/ManiSkill3 environments), an entry point of the group
``openvla_align.simulators`` in an installed package, or ``module:Class`` importable from ``sys.path``. The class
follows ``simpler.SimplerEnv``'s contract::

    Env(env_id, seed, num_envs, episode_len, *, sim_backend, render_backend)
    .reset(obj_set) -> (images uint8 (B, H, W, 3), instructions [B], info)
    .step(actions float (B, 7), un-normalised) -> (images, reward, done, info)   # info["success"]: (B,) bool
    .close()

and may add two cheap checks that ``eval run`` calls before it loads anything: the classmethods
``check_settings(num_envs, sim_backend, render_backend)`` and ``check_env_ids(env_ids)`` (raise ``ValueError``).
"""

from __future__ import annotations

import importlib
from typing import Dict

BUILTIN: Dict[str, str] = {"simpler": "openvla_align.eval.simpler:SimplerEnv"}
ENTRY_POINT_GROUP = "openvla_align.simulators"


def _entry_points() -> Dict[str, str]:
    from importlib.metadata import entry_points

    eps = entry_points()
    found = eps.select(group=ENTRY_POINT_GROUP) if hasattr(eps, "select") else eps.get(ENTRY_POINT_GROUP, [])
    return {ep.name: ep.value for ep in found}


def resolve(name: str):
    """The environment class a recipe's ``simulator:`` names."""
    target = BUILTIN.get(name) or _entry_points().get(name) or (name if ":" in name else None)
    if target is None:
        known = sorted(set(BUILTIN) | set(_entry_points()))
        raise ValueError(
            f"unknown simulator {name!r}: known {', '.join(known)}; or give module:Class of an environment class "
            "with SimplerEnv's contract (see openvla_align.eval.simulators)"
        )
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"simulator {name!r}: cannot import {target} ({exc})") from exc
    return cls


def check(cls, hook: str, *args) -> None:
    """Call the class's optional cheap check ``hook`` (``check_settings`` or ``check_env_ids``)."""
    fn = getattr(cls, hook, None)
    if fn is not None:
        fn(*args)
