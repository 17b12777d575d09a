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
    episode_len: int = 80
    unnorm_key: str = "sft"
    simulator: str = "simpler"  # see eval.simulators

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
        if self.num_envs < 1 or self.episode_len < 1:
            raise ValueError(f"{where}: num_envs and episode_len must be >= 1.")


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
) -> Dict[str, object]:
    """Evaluate every (env, seed) of ``recipe`` that :func:`plan` finds missing, or exactly ``pairs`` when the caller
    planned them already (``eval run`` plans once, before its ranks meet); ``make_env(env_id, seed)`` builds a
    batched environment; ``identity`` is written into each ``result.json``.

    Each episode's record holds its instruction, "success once" (as the reference counts it), the first step at
    which it succeeded (None if never) and its copy's seed as the environment reports it (``env.seeds``; Simpler:
    ``seed * 1000 + i``; None for an environment that reports none). ``video`` > 0 also writes the
    first ``video`` episodes of each (env, seed) as GIFs beside ``result.json``."""
    from tqdm import tqdm

    from .video import write_episode_gif

    out = Path(out)
    todo, skipped = plan(recipe, out, None, identity, overwrite) if pairs is None else (list(pairs), [])
    done = []
    episodes = len(todo) * recipe.num_envs
    prefix = f"[{label}] " if label else ""
    bar = tqdm(total=episodes, unit="episode", disable=not progress, dynamic_ncols=True)
    for env_id, seed in todo:
        bar.set_description(f"{prefix}{env_id} seed {seed}")
        random.seed(seed)  # as the reference's runner, before the environment is built
        np.random.seed(seed)
        torch.manual_seed(seed)
        env = make_env(env_id, seed)
        images, instructions, _ = env.reset(recipe.obj_set)
        images, n = _as_numpy(images), len(instructions)
        first_success = np.full(n, -1)
        frames = [[im] for im in images[: min(video, n)]]
        for step in range(1, recipe.episode_len + 1):
            actions = policy(images, list(instructions))
            images, _, _, info = env.step(actions)
            images = _as_numpy(images)  # once per step, for the policy and the videos
            now = _as_numpy(info["success"]).astype(bool).reshape(-1)
            first_success[(first_success < 0) & now] = step
            for kept, im in zip(frames, images):
                kept.append(im)
        env_seeds = list(getattr(env, "seeds", None) or [None] * n)
        if hasattr(env, "close"):
            env.close()
        success = first_success > 0
        records = [
            {"instruction": str(text), "first_success_step": int(s) if s > 0 else None, "env_seed": env_seed}
            for text, s, env_seed in zip(instructions, first_success, env_seeds)
        ]
        where = out / env_id / recipe.obj_set / str(seed)
        for k, kept in enumerate(frames):
            write_episode_gif(
                where / f"episode_{k}.gif", kept, records[k]["instruction"], records[k]["first_success_step"]
            )
        extra = dict(meta or {}, **({"identity": identity} if identity is not None else {}))
        write_result(
            out,
            env_id,
            recipe.obj_set,
            seed,
            success.tolist(),
            records,
            episode_len=recipe.episode_len,
            suite=recipe.suite,
            **extra,
        )
        done.append((env_id, seed))
        bar.update(n)
        bar.write(f"{prefix}{env_id} seed {seed}: success {success.mean():.3f} over {n} episodes")
    bar.close()
    return {"evaluated": done, "skipped": skipped, "out": str(out)}


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
    recipe.check("--seeds/--num-envs")
    env_cls = simulators.resolve(recipe.simulator)
    simulators.check(env_cls, "check_settings", recipe.num_envs, args.sim_backend, args.render_backend)
    ranks = Ranks.from_env(args.shard or (0, 1))
    device, _ = MODEL.device_dtype(args)
    device = ranks.device(device, torch.cuda.device_count() if device.startswith("cuda") else 0)
    vla_path, adapter = MODEL.spec(args)
    simulators.check(env_cls, "check_env_ids", recipe.envs)
    unnorm_key = args.unnorm_key or recipe.unnorm_key
    identity = identities.build(
        vla_path,
        adapter,
        unnorm_key=unnorm_key,
        recipe=recipe,
        simulator=recipe.simulator,
        sim_backend=args.sim_backend,
        render_backend=args.render_backend,
        dtype=args.dtype,
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
            policy = BatchedPolicy(MODEL.load(args, device=device), unnorm_key)

            def make_env(env_id: str, seed: int):
                backends = dict(sim_backend=args.sim_backend, render_backend=args.render_backend)
                return env_cls(env_id, seed, recipe.num_envs, recipe.episode_len, **backends)

            meta = {"vla_path": str(vla_path), "adapter": str(adapter) if adapter else None}
            summary = run_recipe(
                recipe,
                policy,
                make_env,
                out,
                meta=meta,
                video=args.video,
                identity=identity,
                pairs=mine,
                label=ranks.label,
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


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("run")
    p.add_argument("recipe", help="evaluation recipe, e.g. recipes/eval/ood.yaml or recipes/eval/vlthink.yaml")
    MODEL.add(p)
    p.add_argument(
        "--out", default=None, help="results directory (default: eval/<adapter or model name>-<weights fingerprint>)"
    )
    p.add_argument("--unnorm-key", default=None, help="override the recipe's unnorm key")
    p.add_argument("--seeds", type=int_list, default=None, help="comma-separated seeds instead of the recipe's")
    p.add_argument("--num-envs", type=positive_int, default=None, help="parallel environments instead of the recipe's")
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
    p.add_argument("--sim-backend", default="gpu", choices=("gpu", "cpu"), help="ManiSkill physics backend")
    p.add_argument(
        "--render-backend", default="gpu", choices=("gpu", "cpu"), help="ManiSkill renderer (cpu: software Vulkan)"
    )
    p.set_defaults(func=_cmd_run)
    return p
