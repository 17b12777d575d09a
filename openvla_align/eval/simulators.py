"""The simulators ``eval run`` rolls policies out in; an evaluation recipe's ``simulator:`` names one.

A name is an entry point of the group ``openvla_align.simulators`` in an installed package (this package registers
``simpler``: the paper's Simpler/ManiSkill3 environments) or ``module:Class`` importable from ``sys.path``. The class
follows ``simpler.SimplerEnv``'s contract::

    Env(env_id, seed, num_envs, episode_len, *, sim_backend, render_backend)
    .reset(obj_set) -> (images uint8 (B, H, W, 3), instructions [B], info)
    .step(actions float (B, 7), un-normalised) -> (images, reward, done, info)   # info["success"]: (B,) bool
    .close()
    .seeds -> [int] (optional): each parallel copy's seed, recorded with its episode

and may add two cheap checks that ``eval run`` calls before it loads anything: the classmethods
``check_settings(num_envs, sim_backend, render_backend)`` and ``check_env_ids(env_ids)`` (raise ``ValueError``).
"""

from __future__ import annotations

from .._plugins import entry_point_targets, load_target

ENTRY_POINT_GROUP = "openvla_align.simulators"


def resolve(name: str):
    """The environment class a recipe's ``simulator:`` names."""
    registered = entry_point_targets(ENTRY_POINT_GROUP)
    target = registered.get(name) or (name if ":" in name else None)
    if target is None:
        known = sorted(registered)
        raise ValueError(
            f"unknown simulator {name!r}: known {', '.join(known)}; or give module:Class of an environment class "
            "with SimplerEnv's contract (see openvla_align.eval.simulators)"
        )
    try:
        cls = load_target(target)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"simulator {name!r}: cannot import {target} ({exc})") from exc
    return cls


def check(cls, hook: str, *args) -> None:
    """Call the class's optional cheap check ``hook`` (``check_settings`` or ``check_env_ids``)."""
    fn = getattr(cls, hook, None)
    if fn is not None:
        fn(*args)
