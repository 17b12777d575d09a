"""`openvla-align eval throughput RECIPE --vla-path CKPT`: episodes per second of `eval run`'s batched loop against
OpenVLA-OFT's own one-at-a-time LIBERO loop, on the same policy, the same task and the same simulator.

OFT's loop is OFT's code: ``experiments.robot.libero.run_libero_eval.run_task`` (one environment, one policy query
per ``num_open_loop_steps`` steps, one observation per query), imported from OFT's checkout and given the model and
components our policy loaded. It needs LIBERO importable in this interpreter, as OFT's own evaluation does (OFT's
README installs LIBERO into its environment). Two of its side effects are switched off, both in its favour: the MP4
it writes after every episode (``save_rollout_video``) and its per-episode log lines. Its step limit is the one given
here (``--steps``, put into its ``TASK_MAX_STEPS`` for the run) so both loops run episodes of the same length; a
random policy never succeeds, so every episode runs to the limit in both loops, which the counts check (OFT's
``run_episode`` swallows exceptions: a count short of ``episodes * (steps + 10)`` is reported as its error).

Ours: :func:`~openvla_align.eval.run.rollout` over the simulator's batched environment with ``--num-envs`` parallel
copies (each a process), one policy call per chunk for all of them. Rounds alternate the loops; each loop's figure is
the mean episodes/s over rounds with a 95 % t interval, and its speed against OFT's loop is the mean of the per-round
ratios (paired by round) with a 95 % t interval.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np

from ..argtypes import int_list, positive_int


@contextlib.contextmanager
def _inside(directory) -> Iterator[None]:
    """Run in ``directory`` (OFT's loop writes ./rollouts and logs relative to the working directory)."""
    here = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(here)


def ours(env_cls, policy, recipe, env_id: str, episodes: int, num_envs: int, steps: int, seed: int = 7) -> Dict:
    """One timed run of the batched loop: environment construction, every reset and step, every policy call."""
    from dataclasses import replace

    from .run import rollout

    start = time.perf_counter()
    env = env_cls(env_id, seed, num_envs, steps, episodes=episodes)
    try:
        records, _ = rollout(env, policy, replace(recipe, num_envs=num_envs), steps)
    finally:
        env.close()
    seconds = time.perf_counter() - start
    return {"loop": f"openvla-align, {num_envs} env(s)", "episodes": len(records), "seconds": seconds,
            "env_steps": int(sum(r["steps"] for r in records))}  # fmt: skip


def oft_loop(policy, env_id: str, episodes: int, steps: int, settings, unnorm_key: str) -> Dict:
    """One timed run of OpenVLA-OFT's ``run_task`` on the first ``episodes`` initial states of ``env_id``'s task."""
    from experiments.robot.libero import run_libero_eval as oft
    from libero.libero import benchmark

    from ..vla.layout import unwrap
    from .libero import parse_env_id
    from .policies import read_norm_stats

    suite, task_id = parse_env_id(env_id)
    base = unwrap(policy.loaded.model)
    stats = read_norm_stats(policy.loaded.path)
    if stats:
        base.norm_stats = stats  # as OFT's get_vla (its _load_dataset_stats)
    known = set(oft.GenerateConfig.__dataclass_fields__)
    cfg = oft.GenerateConfig(
        pretrained_checkpoint=policy.loaded.path,
        task_suite_name=suite,
        num_trials_per_task=episodes,
        unnorm_key=unnorm_key,
        **{k: v for k, v in vars(settings).items() if k in known},
    )
    counted = {"steps": 0, "errors": []}
    make_env = oft.get_libero_env

    def counting_env(*args, **kwargs):
        env, description = make_env(*args, **kwargs)
        step = env.step

        def counted_step(action):
            counted["steps"] += 1
            return step(action)

        env.step = counted_step
        return env, description

    def log(message, log_file=None):
        if message.startswith("Episode error"):
            counted["errors"].append(message)

    patches = {"get_libero_env": counting_env, "save_rollout_video": lambda *a, **k: None, "log_message": log}
    limits = dict(oft.TASK_MAX_STEPS)
    old = {name: getattr(oft, name) for name in patches}
    task_suite = benchmark.get_benchmark_dict()[suite]()
    hidden = os.environ.pop("CUDA_VISIBLE_DEVICES") if os.environ.get("CUDA_VISIBLE_DEVICES") == "" else None
    try:  # an empty CUDA_VISIBLE_DEVICES breaks robosuite's EGL context: dropped as for our workers
        for name, value in patches.items():
            setattr(oft, name, value)
        for key in list(oft.TASK_MAX_STEPS):
            if str(getattr(key, "value", key)) == suite:
                oft.TASK_MAX_STEPS[key] = steps
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as cwd, _inside(cwd):
            oft.run_task(cfg, task_suite, task_id, base, 224, policy.loaded._processor, policy.action_head,
                         policy.proprio_projector, policy.noisy_action_projector, 0, 0, None)  # fmt: skip
        seconds = time.perf_counter() - start
    finally:
        if hidden is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = hidden
        for name, value in old.items():
            setattr(oft, name, value)
        oft.TASK_MAX_STEPS.clear()
        oft.TASK_MAX_STEPS.update(limits)
    if counted["errors"]:
        raise RuntimeError(f"OpenVLA-OFT's run_episode swallowed an error: {counted['errors'][0]}")
    expected = episodes * (steps + cfg.num_steps_wait)
    if counted["steps"] != expected:
        raise RuntimeError(f"OpenVLA-OFT's loop stepped {counted['steps']} times, not {expected}: an episode ended")
    return {"loop": OFT_LOOP, "episodes": episodes, "seconds": seconds,
            "env_steps": episodes * steps}  # fmt: skip


OFT_LOOP = "OpenVLA-OFT run_task, 1 env"


def summarize(runs: List[Dict]) -> List[Dict]:
    """Per loop: mean episodes/s over rounds with its 95 % t interval, environment steps/s, and, when OFT's loop ran,
    the mean of the per-round speed ratios to it (paired by round: a slow spell of the machine hits both) with its
    95 % t interval."""
    from ..stats import mean_interval

    out = []
    oft = {r["round"]: r["seconds"] / r["episodes"] for r in runs if r["loop"] == OFT_LOOP}
    for loop in dict.fromkeys(r["loop"] for r in runs):
        mine = [r for r in runs if r["loop"] == loop]
        rates = [r["episodes"] / r["seconds"] for r in mine]
        row = {"loop": loop, "rounds": len(mine), "episodes_per_s": float(np.mean(rates))}
        if len(rates) > 1:
            ci = mean_interval(rates)
            row.update(low=ci.low, high=ci.high)
        row["steps_per_s"] = float(np.mean([r["env_steps"] / r["seconds"] for r in mine]))
        ratios = [oft[r["round"]] / (r["seconds"] / r["episodes"]) for r in mine if r["round"] in oft]
        if ratios:
            row["vs_oft"] = float(np.mean(ratios))
            if len(ratios) > 1:
                ci = mean_interval(ratios)
                row.update(vs_oft_low=ci.low, vs_oft_high=ci.high)
        out.append(row)
    return out


def _cmd_throughput(args) -> int:
    import torch

    from . import simulators
    from .run import MODEL, EvalRecipe

    recipe = EvalRecipe.load(args.recipe)
    recipe.policy = {**recipe.policy, **dict(args.policy or [])}
    env_cls = simulators.resolve(recipe.simulator)
    env_ids = simulators.expand_env_ids(env_cls, [args.task] if args.task else recipe.envs)
    env_id = env_ids[0]
    simulators.check(env_cls, "check_env_ids", [env_id])
    vla_path, adapter = MODEL.spec(args)
    key = simulators.unnorm_keys(env_cls, [env_id], args.unnorm_key or recipe.unnorm_key, vla_path, adapter)[env_id]
    make_policy = simulators.policy_factory(env_cls, recipe.policy, args.recipe)
    if make_policy is None:
        raise ValueError(f"{args.recipe}: simulator {recipe.simulator} has no batched policy of its own to time")
    simulators.check(env_cls, "check_policy", recipe.policy, vla_path)
    simulators.check(env_cls, "check_runtime")
    device, _ = MODEL.device_dtype(args)
    torch.set_num_threads(args.threads) if args.threads else None
    policy = make_policy(MODEL.load(args, device=device), key)
    runs: List[Dict] = []
    for round_ in range(args.rounds):
        for n in args.num_envs:
            runs.append({"round": round_, **ours(env_cls, policy, recipe, env_id, args.episodes, n, args.steps)})
            print(json.dumps(runs[-1]), flush=True)
        if args.oft_loop:
            from .policies import PolicySettings

            settings = PolicySettings.from_dict(recipe.policy)
            runs.append({"round": round_, **oft_loop(policy, env_id, args.episodes, args.steps, settings, key)})
            print(json.dumps(runs[-1]), flush=True)
    table = summarize(runs)
    print(f"\n{env_id}: {args.episodes} episodes x {args.steps} steps, {args.rounds} round(s), "
          f"{os.cpu_count()} CPU(s), torch threads {torch.get_num_threads()}")  # fmt: skip
    for r in table:
        ci = f" [{r['low']:.4f}, {r['high']:.4f}]" if "low" in r else ""
        ratio = f"  {r['vs_oft']:.2f}x OFT's loop" if "vs_oft" in r else ""
        if "vs_oft_low" in r:
            ratio += f" [{r['vs_oft_low']:.2f}, {r['vs_oft_high']:.2f}]"
        print(f"  {r['loop']:<32} {r['episodes_per_s']:.4f} episodes/s{ci}  {r['steps_per_s']:.2f} steps/s{ratio}")
    if args.out:
        from .._io import atomic_write_bytes

        text = json.dumps({"env_id": env_id, "episodes": args.episodes, "steps": args.steps, "runs": runs,
                           "summary": table}, indent=2)  # fmt: skip
        atomic_write_bytes(Path(args.out), (text + "\n").encode())
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    from .run import MODEL, policy_setting

    p = subparsers.add_parser("throughput")
    p.add_argument("recipe", help="a LIBERO evaluation recipe, e.g. recipes/eval/libero-spatial.yaml")
    MODEL.add(p)
    p.add_argument("--task", default=None, help="the environment to time (default: the recipe's first)")
    p.add_argument("--episodes", type=positive_int, default=4, help="episodes per run (the task's first N)")
    p.add_argument("--steps", type=positive_int, default=40, help="step limit of every episode, in both loops")
    p.add_argument("--num-envs", type=int_list, default=[1, 2, 4], help="parallel environments of our loop")
    p.add_argument("--rounds", type=positive_int, default=3, help="rounds (each runs every loop once)")
    p.add_argument("--oft-loop", action="store_true", help="also time OpenVLA-OFT's run_task (needs its checkout)")
    p.add_argument("--unnorm-key", default=None, help="override the recipe's unnorm key")
    p.add_argument("--policy", type=policy_setting, action="append", metavar="KEY=VALUE", help="as in eval run")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="write every run and the summary as JSON")
    p.set_defaults(func=_cmd_throughput)
    return p
