"""`openvla-align eval run RECIPE --vla-path ... [--adapter ...]`: roll the model out in the paper's environments.

A recipe (``recipes/eval/*.yaml``) names the environments, seeds, parallel environments, object set, episode length
and unnorm key. For each (environment, seed) the runner resets a batched environment, feeds every step's images
and instructions to the model in one batch, turns the 7 greedy action tokens into un-normalised 7-D actions (as
OpenVLA's ``predict_action`` does, for the whole batch at once) and records per-episode success ("success once",
as the reference counts it) to ``OUT/<env_id>/<obj_set>/<seed>/result.json``, with the identity of what produced it
(``identity.py``: the weights' fingerprint, unnorm key, settings). A re-run skips the pairs this model and setting
already finished, so an interrupted evaluation resumes; results of another model or setting stop it before the VLA
is loaded. ``--shard K/N`` and ``torchrun`` split the pairs over jobs and ranks (``shard.py``); the simulator is
the recipe's ``simulator:`` (``simulators.py``; default ``simpler``).

The environment contract (``simpler.SimplerEnv`` builds the paper's environments as the reference does):
``reset(obj_set) -> (images uint8 (B, H, W, 3), instructions [B], info)`` and
``step(actions float (B, 7), un-normalised) -> (images, reward, done, info)`` with ``info["success"]`` (B,) bool.

Seeding, as the reference's runner: ``random``, ``numpy`` and ``torch`` are seeded with the evaluation seed before
the environment is built; the environment's ``num_envs`` copies are seeded ``seed * 1000 + i`` once, at
construction; each evaluation then resets with the object set only.
"""

from __future__ import annotations

import argparse
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .._io import read_yaml
from ..argtypes import int_list, nonnegative_int, positive_int, shard_spec
from ..vla.args import ModelArgs
from . import identity as identities
from .results import RESULT_FILE, read_result, write_result

logger = logging.getLogger(__name__)

PAPER_SEEDS = [0, 1, 2, 4, 5, 6, 7, 8]  # the reference README's evaluation loop (no seed 3)


@dataclass
class EvalRecipe:
    suite: str
    envs: List[str]
    seeds: List[int] = field(default_factory=lambda: list(PAPER_SEEDS))
    num_envs: int = 128
    obj_set: str = "test"
    episode_len: Optional[int] = None  # None: the simulator's per-environment limit (LIBERO: OFT's per suite)
    unnorm_key: str = "sft"  # "auto": the simulator's rule per environment (LIBERO: OFT's, the suite's name)
    simulator: str = "simpler"  # see eval.simulators
    policy: Dict[str, object] = field(default_factory=dict)  # policy settings (LIBERO: eval.policies.PolicySettings)
    episodes: Optional[int] = None  # episodes per (env, seed); None: the simulator's (Simpler num_envs, LIBERO 50)

    @classmethod
    def load(cls, path) -> "EvalRecipe":
        data = read_yaml(path, "evaluation recipe")
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not an evaluation recipe (a YAML mapping).")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(cls.__dataclass_fields__)}.")
        missing = [k for k in ("suite", "envs") if k not in data]
        if missing:
            raise ValueError(f"{path}: missing {missing}.")
        recipe = cls(**data)
        recipe.check(path)
        return recipe

    def check(self, where="recipe") -> None:
        for name in ("envs", "seeds"):
            values = list(getattr(self, name))
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise ValueError(f"{where}: {name} {twice} are listed more than once; each is evaluated once.")
        if self.num_envs < 1 or any(v is not None and v < 1 for v in (self.episode_len, self.episodes)):
            raise ValueError(f"{where}: num_envs, episode_len and episodes must be >= 1.")
        if not isinstance(self.policy, dict):
            raise ValueError(f"{where}: policy must be a mapping of policy settings, not {self.policy!r}.")


# --------------------------------------------------------------------------------------------------- policy
class BatchedPolicy:
    """Images + instructions -> un-normalised 7-D actions, for a whole batch per call: the greedy action tokens of
    ``vla.actions.ActionDecoder`` (prompts and "▁" as upstream ``predict_action``), un-normalised as it does."""

    def __init__(self, loaded, unnorm_key: str):
        from ..vla.actions import ActionDecoder
        from ..vla.layout import unwrap

        self.loaded = loaded
        base = unwrap(loaded.model)
        config = getattr(base, "config", None)
        stats = getattr(base, "norm_stats", None) or getattr(config, "norm_stats", None) or {}
        if unnorm_key not in stats:
            raise ValueError(
                f"unnorm_key {unnorm_key!r} is not in the model's norm_stats (has: {sorted(stats)}); pass the dataset "
                "the model was fine-tuned on, or merge its dataset_statistics.json into config.json "
                "(`openvla-align merge` does)."
            )
        action = stats[unnorm_key]["action"]
        self.q01, self.q99 = np.asarray(action["q01"], dtype=np.float64), np.asarray(action["q99"], dtype=np.float64)
        self.mask = np.asarray(action.get("mask", [True] * len(self.q01)), dtype=bool)
        self.decoder = ActionDecoder(loaded, n_tokens=len(self.q01))

    def __call__(self, images: Sequence[np.ndarray], instructions: Sequence[str]) -> np.ndarray:
        return self.unnormalize(self.action_tokens(images, instructions))

    def prompts(self, images: Sequence[np.ndarray], instructions: Sequence[str]):
        """The decoder's token rows and the batch's pixel values."""
        from PIL import Image

        loaded = self.loaded
        pixels = loaded.pixel_values([Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in images])
        return self.decoder.rows(instructions), pixels.to(loaded.device, loaded.dtype)

    def action_tokens(self, images, instructions, *, kv_cache: bool = True) -> np.ndarray:
        """Greedy action token ids (B, action_dim); ``kv_cache=False`` re-runs the whole forward per token."""
        return self.decoder.decode(*self.prompts(images, instructions), kv_cache=kv_cache)

    def unnormalize(self, token_ids: np.ndarray) -> np.ndarray:
        from ..vla.actions import unnormalize_tokens

        return unnormalize_tokens(token_ids, self.decoder.vocab_size, self.q01, self.q99, self.mask)


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def pairs_of(recipe: EvalRecipe) -> List[Tuple[str, int]]:
    """The recipe's (environment, seed) pairs, in a fixed order (environments, then seeds)."""
    return [(env_id, seed) for env_id in recipe.envs for seed in recipe.seeds]


def result_path(out, recipe: EvalRecipe, env_id: str, seed: int) -> Path:
    return Path(out) / env_id / recipe.obj_set / str(seed) / RESULT_FILE


def plan(recipe: EvalRecipe, out, pairs=None, identity: Optional[Dict] = None, overwrite: bool = False):
    """``(todo, done)`` among ``pairs`` (all of the recipe's by default): a pair is done when its ``result.json``
    reads and was produced by ``identity`` (any readable one when ``identity`` is None). A result cut short by a
    crash is re-run (logged); a result of another model or setting stops everything (:class:`ResultConflict`)
    unless ``overwrite``."""
    todo, done, conflicts = [], [], []
    for env_id, seed in pairs_of(recipe) if pairs is None else pairs:
        path = result_path(out, recipe, env_id, seed)
        if overwrite or not path.exists():
            todo.append((env_id, seed))
            continue
        try:
            have = read_result(path).get("identity")
        except (ValueError, OSError) as exc:
            logger.warning("%s; evaluating it again", exc)
            todo.append((env_id, seed))
            continue
        diffs = identities.differences(have, identity) if identity is not None else []
        if diffs:
            conflicts.append((path, diffs, have))
        else:
            done.append((env_id, seed))
    if conflicts:
        path, diffs, have = conflicts[0]
        raise ResultConflict(
            f"{Path(out)} already holds results of another model or setting for {len(conflicts)} of these "
            f"(env, seed) pairs ({path}: {identities.describe(diffs, have)}): pass --out DIR to keep both, or "
            "--overwrite to replace them"
        )
    return todo, done


class ResultConflict(ValueError):
    """Results on disk that another model or setting produced."""


def run_recipe(
    recipe: EvalRecipe,
    policy: Callable,
    make_env: Callable,
    out,
    *,
    overwrite: bool = False,
    progress: bool = True,
    meta: Optional[Dict] = None,
    video: int = 0,
    identity: Optional[Dict] = None,
    pairs: Optional[Sequence[Tuple[str, int]]] = None,
    label: str = "",
    policy_for: Optional[Callable[[str], Callable]] = None,
    episode_len_of: Optional[Callable[[str], int]] = None,
) -> Dict[str, object]:
    """Evaluate every (env, seed) of ``recipe`` that :func:`plan` finds missing, or exactly ``pairs`` when the caller
    planned them already (``eval run`` plans once, before its ranks meet); ``make_env(env_id, seed)`` builds a
    batched environment; ``identity`` is written into each ``result.json``. ``policy_for(env_id)``, when given,
    picks the policy per environment (LIBERO: the suite's un-normalisation key); ``episode_len_of(env_id)`` the step
    limit when the recipe sets none (LIBERO: the suite's).

    Each episode's record holds its instruction, "success once" (as the reference counts it), the first step at
    which it succeeded (None if never), the steps it ran, its copy's seed as the environment reports it
    (``env.seeds``; Simpler: ``seed * 1000 + i``; None for an environment that reports none) and, when the
    environment numbers its episodes (``info["episodes"]`` at reset; LIBERO: the benchmark's initial state), that
    number. ``video`` > 0 also writes
    the first ``video`` episodes of each (env, seed) as GIFs beside ``result.json``."""
    from tqdm import tqdm

    from .video import write_episode_gif

    out = Path(out)
    todo, skipped = plan(recipe, out, None, identity, overwrite) if pairs is None else (list(pairs), [])
    done = []
    prefix = f"[{label}] " if label else ""
    bar = tqdm(total=None, unit="episode", disable=not progress, dynamic_ncols=True)
    for env_id, seed in todo:
        bar.set_description(f"{prefix}{env_id} seed {seed}")
        random.seed(seed)  # as the reference's runner, before the environment is built
        np.random.seed(seed)
        torch.manual_seed(seed)
        episode_len = recipe.episode_len or (episode_len_of(env_id) if episode_len_of else None)
        if not episode_len:
            raise ValueError(f"{env_id}: the recipe sets no episode_len and the simulator gives none")
        env = make_env(env_id, seed)
        try:
            records, frames = rollout(
                env, policy_for(env_id) if policy_for else policy, recipe, episode_len, video, bar
            )
        finally:
            if hasattr(env, "close"):
                env.close()
        where = out / env_id / recipe.obj_set / str(seed)
        for k, kept in enumerate(frames):
            write_episode_gif(
                where / f"episode_{k}.gif", kept, records[k]["instruction"], records[k]["first_success_step"]
            )
        extra = dict(meta or {}, **({"identity": identity} if identity is not None else {}))
        success = [r["first_success_step"] is not None for r in records]
        write_result(
            out, env_id, recipe.obj_set, seed, success, records, episode_len=episode_len, suite=recipe.suite, **extra
        )
        done.append((env_id, seed))
        bar.write(f"{prefix}{env_id} seed {seed}: success {np.mean(success):.3f} over {len(success)} episodes")
    bar.close()
    return {"evaluated": done, "skipped": skipped, "out": str(out)}


def _observation(obs):
    """An environment's observation as numpy: an image batch, or a dict of per-row arrays."""
    return {k: _as_numpy(v) for k, v in obs.items()} if isinstance(obs, dict) else _as_numpy(obs)


def _rows(obs, rows: np.ndarray):
    """The observation of the given rows: an image batch or a dict of per-row arrays (LIBERO's cameras + state)."""
    if isinstance(obs, dict):
        return {k: v[rows] for k, v in obs.items()}
    return obs[rows]


def _frames(obs) -> np.ndarray:
    """The images a video shows: the batch itself, or the third-person camera of a dict observation."""
    return obs["full_image"] if isinstance(obs, dict) else obs


def rollout(env, policy: Callable, recipe: EvalRecipe, episode_len: int, video: int = 0, bar=None):
    """Every episode of one (env, seed): ``(records, frames)``.

    An environment runs ``env.episodes`` episodes (default: one reset of ``num_envs``), ``num_envs`` at a time: each
    ``reset(obj_set)`` starts the next block. Per step, the policy sees the block's observations (an image batch,
    or a dict of per-row arrays) and returns un-normalised actions (B, 7), or action chunks (B, K, 7) that run
    open-loop: the chunk's last ``policy.open_loop_steps`` actions (default all K) are executed one per step before
    the policy is asked again, as OpenVLA-OFT's ``deque(maxlen=num_open_loop_steps).extend(chunk)`` does.

    An environment with ``stops_at_success = True`` (LIBERO, where OFT's loop leaves an episode at ``done``) stops
    stepping an episode once it succeeded: the policy is asked for the unfinished rows only, the finished rows' action
    rows are zeros it ignores, and the block ends when every episode finished. Otherwise (Simpler) every episode runs
    ``episode_len`` steps and success is "success once"."""
    total = int(getattr(env, "episodes", 0) or recipe.num_envs)
    stops = bool(getattr(env, "stops_at_success", False))
    records: List[dict] = []
    frames: List[List[np.ndarray]] = []
    seeds = list(getattr(env, "seeds", None) or [])
    while len(records) < total:
        obs, instructions, info = env.reset(recipe.obj_set)
        obs = _observation(obs)
        n = len(instructions)
        if n == 0:
            raise RuntimeError(f"{type(env).__name__}.reset returned no episodes after {len(records)} of {total}")
        numbers = list((info or {}).get("episodes") or [None] * n)
        first_success = np.full(n, -1)
        active = np.ones(n, dtype=bool)
        ran = np.zeros(n, dtype=int)  # steps each episode took
        keep = min(max(video - len(frames), 0), n)
        kept = [[im] for im in _frames(obs)[:keep]]
        chunk, chunk_rows, at = None, None, 0
        for step in range(1, episode_len + 1):
            rows = np.flatnonzero(active)
            if rows.size == 0:
                break
            if chunk is None or at >= chunk.shape[1] or not np.isin(rows, chunk_rows).all():
                out = np.asarray(policy(_rows(obs, rows), [instructions[i] for i in rows]), dtype=np.float64)
                out = out[:, None] if out.ndim == 2 else out
                if out.ndim != 3 or out.shape[0] != rows.size:
                    raise ValueError(
                        f"the policy returned actions of shape {out.shape} for {rows.size} observations; "
                        "expected (B, 7) or chunks (B, K, 7)"
                    )
                steps = int(getattr(policy, "open_loop_steps", 0) or out.shape[1])
                chunk, chunk_rows, at = out[:, -steps:], rows, 0
            actions = np.zeros((n, chunk.shape[2]))
            actions[chunk_rows] = chunk[:, at]
            actions[~active] = 0.0  # finished episodes are not stepped
            at += 1
            ran[rows] += 1
            obs, _, _, step_info = env.step(actions)
            obs = _observation(obs)
            now = _as_numpy(step_info["success"]).astype(bool).reshape(-1)
            if stops:
                now &= active
            first_success[(first_success < 0) & now] = step
            images = _frames(obs)
            for k, seq in enumerate(kept):
                if active[k]:
                    seq.append(images[k])
            if stops:
                active &= first_success < 0
        frames.extend(kept)
        block_seeds = seeds[len(records) : len(records) + n] if len(seeds) >= total else (seeds or [None] * n)[:n]
        for i in range(n):
            s = int(first_success[i])
            records.append(
                {
                    "instruction": str(instructions[i]),
                    "first_success_step": s if s > 0 else None,
                    "env_seed": block_seeds[i] if i < len(block_seeds) else None,
                    "steps": int(ran[i]),
                    **({"episode": numbers[i]} if numbers[i] is not None else {}),
                }
            )
        if bar is not None:
            bar.update(n)
    return records, frames


# the policy decodes with the checkpoint's own attention; the default dtype is the reference's
MODEL = ModelArgs(flag="--vla-path", cameras=False, dtype="bfloat16", attn_implementation=None)


def default_out(vla_path, adapter, fingerprint: str) -> Path:
    """``eval/<adapter or model directory name>-<8 hex of the weights' fingerprint>``: two models that share a
    directory name (``runs/a/merged``, ``runs/b/merged``) get two directories."""
    return Path("eval") / f"{Path(adapter or vla_path).name}-{fingerprint.split(':')[-1][:8]}"


def _cmd_run(args) -> int:
    from . import simulators
    from .shard import Group, Ranks

    # cheap checks first, what the user typed before what the machine lacks: the recipe and backends, the model's
    # files, the environment ids (which need the simulator), the results already on disk; then loading the VLA
    recipe = EvalRecipe.load(args.recipe)
    if args.seeds:
        recipe.seeds = list(args.seeds)
    if args.num_envs:
        recipe.num_envs = args.num_envs
    if args.episodes:
        recipe.episodes = args.episodes
    recipe.policy = {**recipe.policy, **dict(args.policy or [])}
    recipe.check("--seeds/--num-envs")
    env_cls = simulators.resolve(recipe.simulator)
    recipe.envs = simulators.expand_env_ids(env_cls, recipe.envs)
    recipe.check(args.recipe)
    simulators.check(env_cls, "check_settings", recipe.num_envs, args.sim_backend, args.render_backend)
    simulators.check(env_cls, "check_recipe", recipe)
    make_policy = simulators.policy_factory(env_cls, recipe.policy, args.recipe) or BatchedPolicy
    ranks = Ranks.from_env(args.shard or (0, 1))
    device, _ = MODEL.device_dtype(args)
    device = ranks.device(device, torch.cuda.device_count() if device.startswith("cuda") else 0)
    vla_path, adapter = MODEL.spec(args)
    simulators.check(env_cls, "check_env_ids", recipe.envs)
    unnorm_key = args.unnorm_key or recipe.unnorm_key
    unnorm_keys = simulators.unnorm_keys(env_cls, recipe.envs, unnorm_key, vla_path, adapter)
    simulators.check(env_cls, "check_policy", recipe.policy, vla_path)
    simulators.check(env_cls, "check_runtime")
    identity = identities.build(
        vla_path,
        adapter,
        unnorm_key=unnorm_key,
        recipe=recipe,
        simulator=recipe.simulator,
        sim_backend=args.sim_backend,
        render_backend=args.render_backend,
        dtype=args.dtype,
        unnorm_keys=unnorm_keys,
    )
    out = Path(args.out) if args.out else default_out(vla_path, adapter, identity["fingerprint"])
    shard_pairs = ranks.of_shard(pairs_of(recipe))
    todo, _ = plan(recipe, out, pairs_of(recipe), identity, args.overwrite)  # every pair: a conflict stops all
    todo = [p for p in todo if p in set(shard_pairs)]
    group = Group(ranks)
    try:
        group.barrier()  # every rank has listed what is missing before any rank writes
        mine = ranks.of_rank(todo)
        evaluated: List = []
        if mine:
            loaded = MODEL.load(args, device=device)
            policies: Dict[str, Callable] = {}

            def policy_for(env_id: str) -> Callable:
                key = unnorm_keys[env_id]
                if key not in policies:
                    policies[key] = make_policy(loaded, key)
                return policies[key]

            def episode_len_of(env_id: str) -> int:
                return simulators.episode_len(env_cls, env_id, recipe.episode_len)

            def make_env(env_id: str, seed: int):
                kwargs = dict(sim_backend=args.sim_backend, render_backend=args.render_backend)
                if recipe.episodes is not None:
                    kwargs["episodes"] = recipe.episodes
                return env_cls(env_id, seed, recipe.num_envs, episode_len_of(env_id), **kwargs)

            meta = {"vla_path": str(vla_path), "adapter": str(adapter) if adapter else None}
            summary = run_recipe(
                recipe,
                None,
                make_env,
                out,
                meta=meta,
                video=args.video,
                identity=identity,
                pairs=mine,
                label=ranks.label,
                policy_for=policy_for,
                episode_len_of=episode_len_of,
            )
            evaluated = summary["evaluated"]
        if ranks.world > 1:
            print(f"{ranks.label}: {len(evaluated)} evaluated", flush=True)
        group.barrier()  # rank 0 sums up once every rank is through
    finally:
        group.close()
    if ranks.rank == 0:
        missing, done = plan(recipe, out, shard_pairs, identity)
        scope = f" of {ranks.label.split(',')[0]}" if ranks.shards > 1 else ""
        if not todo:
            print(
                f"all {len(done)} (env, seed) pairs{scope} already evaluated for this model and setting (the VLA "
                f"was not loaded); results in {out}"
            )
        else:
            now = len(todo) - len([p for p in missing if p in set(todo)])
            by = f" by {ranks.world} ranks" if ranks.world > 1 else ""
            print(
                f"{now} evaluated{by}, {len(done) - now} already there, {len(missing)} missing{scope}; results in {out}"
            )
        if missing:
            return 1
    return 0


def policy_setting(text: str) -> Tuple[str, object]:
    """``KEY=VALUE`` -> (KEY, VALUE read as YAML: ``true``, ``2``, ``0.5`` or a word)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: write KEY=VALUE, e.g. use_proprio=false")
    return key.strip(), yaml.safe_load(value)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("run")
    p.add_argument(
        "recipe",
        help="evaluation recipe, e.g. recipes/eval/ood.yaml, recipes/eval/vlthink.yaml, recipes/eval/libero.yaml",
    )
    MODEL.add(p)
    p.add_argument(
        "--out", default=None, help="results directory (default: eval/<adapter or model name>-<weights fingerprint>)"
    )
    p.add_argument("--unnorm-key", default=None, help="override the recipe's unnorm key")
    p.add_argument("--seeds", type=int_list, default=None, help="comma-separated seeds instead of the recipe's")
    p.add_argument("--num-envs", type=positive_int, default=None, help="parallel environments instead of the recipe's")
    p.add_argument(
        "--episodes",
        type=positive_int,
        default=None,
        help="episodes per (env, seed) instead of the simulator's (LIBERO: the first N of the 50 initial states)",
    )
    p.add_argument(
        "--policy",
        type=policy_setting,
        action="append",
        metavar="KEY=VALUE",
        help="a policy setting over the recipe's `policy:` (repeatable; LIBERO: OpenVLA-OFT's GenerateConfig names, "
        "e.g. --policy num_images_in_input=1 --policy use_proprio=false)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="re-run (env, seed) pairs that already have results, whoever made them"
    )
    p.add_argument(
        "--shard",
        type=shard_spec,
        default=None,
        metavar="K/N",
        help="evaluate the K-th of N shares of the (env, seed) pairs (K from 0; e.g. a SLURM array task); under "
        "torchrun the ranks also split the pending pairs among them",
    )
    p.add_argument(
        "--video",
        type=nonnegative_int,
        default=0,
        metavar="K",
        help="write the first K episodes of each (env, seed) as GIFs",
    )
    p.add_argument(
        "--sim-backend", default="gpu", choices=("gpu", "cpu"), help="ManiSkill physics backend (Simpler only)"
    )
    p.add_argument(
        "--render-backend",
        default="gpu",
        choices=("gpu", "cpu"),
        help="ManiSkill renderer (cpu: software Vulkan; Simpler only; LIBERO renders through MUJOCO_GL)",
    )
    p.set_defaults(func=_cmd_run)
    return p
