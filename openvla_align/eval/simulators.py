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

A simulator whose episodes differ from Simpler's (``libero``: OpenVLA-OFT's LIBERO protocol) says so with optional
members, each with a default that is Simpler's behaviour:

- ``reset`` may return a dict observation (``full_image``, ``wrist_image``, ``state``: per-row arrays) and
  ``info["episodes"]`` (each row's episode number); ``step`` returns the same kind;
- ``episodes`` (instance): episodes per (env, seed) (default ``num_envs``: one reset); each ``reset`` starts the
  next ``num_envs`` of them;
- ``stops_at_success = True``: an episode ends at its first success (the runner stops asking for its actions);
- ``expand_env_ids(envs) -> [env_id]``: a recipe's shorthand (a suite's name) into environment ids;
- ``episode_len_of(env_id) -> int``: the step limit when the recipe sets none;
- ``unnorm_key_of(env_id, norm_stats) -> str``: the key a recipe's ``unnorm_key: auto`` means for an environment;
- ``make_policy(loaded, settings, unnorm_key)``: the policy its observations need, from the recipe's ``policy:``
  settings (default :class:`~openvla_align.eval.run.BatchedPolicy`, which takes no settings);
- ``check_policy(settings, vla_path)``, ``check_runtime()``: cheap checks of the settings against the checkpoint's
  files, and of the simulator's installation (assets, renderer), before the model loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Optional

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


def expand_env_ids(cls, envs: List[str]) -> List[str]:
    """The recipe's environments with the simulator's shorthands expanded (e.g. ``libero_spatial`` -> its tasks)."""
    fn = getattr(cls, "expand_env_ids", None)
    return list(fn(list(envs))) if fn is not None else list(envs)


def episode_len(cls, env_id: str, recipe_value: Optional[int]) -> int:
    """The recipe's step limit, else the simulator's for this environment."""
    if recipe_value:
        return int(recipe_value)
    fn = getattr(cls, "episode_len_of", None)
    if fn is None:
        raise ValueError(f"{cls.__name__} has no default episode length: set episode_len in the recipe")
    return int(fn(env_id))


def policy_factory(cls, settings: Dict, where) -> Optional[Callable]:
    """``make(loaded, unnorm_key) -> policy`` for this simulator: its own ``make_policy`` with the recipe's
    ``policy:`` settings; None (the runner's batched OpenVLA decoder, which takes no settings) when it has none."""
    fn = getattr(cls, "make_policy", None)
    if fn is None:
        if settings:
            raise ValueError(
                f"{where}: simulator {cls.__name__} takes no policy settings (got {sorted(settings)}); drop `policy:`"
            )
        return None
    return lambda loaded, unnorm_key: fn(loaded, settings, unnorm_key)


STATS_FILE = "dataset_statistics.json"


def read_norm_stats(checkpoint) -> Dict:
    """The statistics OFT's and OpenVLA's evaluation un-normalise with, read without loading the model:
    ``dataset_statistics.json`` in the directory (their loaders put it over the config's), else ``config.json``'s
    ``norm_stats``; {} when neither has any."""
    for name, pick in ((STATS_FILE, lambda d: d), ("config.json", lambda d: d.get("norm_stats"))):
        path = Path(checkpoint) / name
        if path.is_file():
            try:
                stats = pick(json.loads(path.read_text()))
            except (json.JSONDecodeError, AttributeError) as exc:
                raise ValueError(f"{path} is not valid JSON ({exc}); the checkpoint is damaged") from None
            if stats:
                return dict(stats)
    return {}


def checkpoint_norm_stats(vla_path, adapter=None) -> Optional[Dict]:
    """:func:`read_norm_stats` of the adapter's directory, else the model's; None when neither has any."""
    for root in [p for p in (adapter, vla_path) if p]:
        stats = read_norm_stats(root)
        if stats:
            return stats
    return None


def unnorm_keys(cls, env_ids: List[str], key: str, vla_path, adapter=None) -> Dict[str, str]:
    """Each environment's un-normalisation key, checked against the checkpoint's statistics before it loads: ``auto``
    asks the simulator (``unnorm_key_of``); any other key is used for every environment."""
    stats = checkpoint_norm_stats(vla_path, adapter)
    if key == "auto":
        fn = getattr(cls, "unnorm_key_of", None)
        if fn is None:
            raise ValueError(f"unnorm_key auto: simulator {cls.__name__} has no rule for it; name the key")
        if stats is None:
            raise ValueError(
                f"unnorm_key auto: {vla_path} has no action statistics (dataset_statistics.json or config.json's "
                "norm_stats); pass --unnorm-key or copy the training run's dataset_statistics.json into it"
            )
        return {env: fn(env, stats) for env in env_ids}
    if stats is not None and key not in stats:
        raise ValueError(
            f"unnorm_key {key!r} is not in {vla_path}'s action statistics (has: {sorted(stats)}); pass the dataset the "
            "model was fine-tuned on (--unnorm-key)"
        )
    return {env: key for env in env_ids}
