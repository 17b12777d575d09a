"""`openvla-align eval run RECIPE --vla-path ... [--adapter ...]`: roll the model out in the paper's environments.

A recipe (``recipes/eval/*.yaml``) names the environments, seeds, parallel environments, object set, episode length
and unnorm key. For each (environment, seed) the runner resets a batched environment, feeds every step's images
and instructions to the model in one batch, turns the 7 greedy action tokens into un-normalised 7-D actions (as
OpenVLA's ``predict_action`` does, for the whole batch at once) and records per-episode success ("success once",
as the reference counts it) to ``OUT/<env_id>/<obj_set>/<seed>/result.json``. Finished (environment, seed) pairs
are skipped on a re-run, so an interrupted evaluation resumes.

The environment contract (the reference implementation's batched wrapper has this shape):
``reset(obj_set) -> (images uint8 (B, H, W, 3), instructions [B], info)`` and
``step(actions float (B, 7), un-normalised) -> (images, reward, done, info)`` with ``info["success"]`` (B,) bool.
"""

from __future__ import annotations

import argparse
import logging
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .results import RESULT_FILE, write_result

logger = logging.getLogger(__name__)

PROMPT = "In: What action should the robot take to {}?\nOut:"
N_BINS = 256
SIMULATOR_HINT = (
    "The paper's Simpler/ManiSkill environments are not installed. Install the ManiSkill and SimplerEnv forks that "
    "ship with the reference implementation (CognitiveAISystems/BlindVLA: `pip install -e ManiSkill` and "
    "`pip install -e SimplerEnv`, with their assets), then run this command again."
)


@dataclass
class EvalRecipe:
    suite: str
    envs: List[str]
    seeds: List[int] = field(default_factory=lambda: list(range(8)))
    num_envs: int = 128
    obj_set: str = "test"
    episode_len: int = 80
    unnorm_key: str = "sft"

    @classmethod
    def load(cls, path) -> "EvalRecipe":
        import yaml

        data = yaml.safe_load(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not an evaluation recipe (a YAML mapping).")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(cls.__dataclass_fields__)}.")
        missing = [k for k in ("suite", "envs") if k not in data]
        if missing:
            raise ValueError(f"{path}: missing {missing}.")
        return cls(**data)


# --------------------------------------------------------------------------------------------------- policy
class BatchedPolicy:
    """Images + instructions -> un-normalised 7-D actions, for a whole batch per call (greedy, no KV cache)."""

    def __init__(self, loaded, unnorm_key: str):
        from ..hooks import unwrap

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
        # OpenVLA: the last N_BINS ids below the unpadded vocabulary are the action bins
        self.vocab_size = int(getattr(base, "vocab_size", None) or len(loaded.tokenizer))
        bins = np.linspace(-1, 1, N_BINS)
        self.bin_centers = (bins[:-1] + bins[1:]) / 2.0
        self.action_dim = len(self.q01)
        tok = loaded.tokenizer
        space = tok.convert_tokens_to_ids("▁") if "▁" in tok.get_vocab() else None
        self.space_id = space  # predict_action appends Llama's "▁" (29871) to the prompt; so do we, when it exists

    def __call__(self, images: Sequence[np.ndarray], instructions: Sequence[str]) -> np.ndarray:
        from PIL import Image

        from ..probe.vlthink import next_token_logits

        loaded = self.loaded
        prompts = [PROMPT.format(str(i).lower()) for i in instructions]
        batch = loaded.batch(prompts, [Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in images])
        lengths = batch["attention_mask"].sum(1).tolist()
        rows = [batch["input_ids"][i, : int(n)].tolist() for i, n in enumerate(lengths)]
        if self.space_id is not None:
            rows = [r if r[-1] == self.space_id else r + [self.space_id] for r in rows]
        generated: List[List[int]] = [[] for _ in rows]
        was_training = loaded.model.training
        loaded.model.eval()
        try:
            for _ in range(self.action_dim):
                logits = next_token_logits(loaded, [r + g for r, g in zip(rows, generated)], batch["pixel_values"])
                for g, t in zip(generated, logits.argmax(-1).tolist()):
                    g.append(int(t))
        finally:
            loaded.model.train(was_training)
        return self.unnormalize(np.asarray(generated))

    def unnormalize(self, token_ids: np.ndarray) -> np.ndarray:
        idx = np.clip(self.vocab_size - token_ids - 1, 0, len(self.bin_centers) - 1)
        normalized = self.bin_centers[idx]
        actions = 0.5 * (normalized + 1) * (self.q99 - self.q01) + self.q01
        return np.where(self.mask, actions, normalized)


# --------------------------------------------------------------------------------------------------- environments
def simulator_wrapper() -> type:
    """The reference's batched Simpler wrapper class; a clear ImportError naming what to install when absent."""
    try:
        from simpler_env.env.simpler_wrapper import SimlerWrapper  # sic, the reference's spelling
    except ImportError as exc:
        raise ImportError(f"{SIMULATOR_HINT} ({exc})") from exc
    return SimlerWrapper


def simpler_env_factory(recipe: EvalRecipe, policy: BatchedPolicy, wrapper: Optional[type] = None) -> Callable:
    """The reference's batched Simpler wrapper, when installed (untested here: no simulator on this machine).

    It un-normalises actions itself from the model's statistics, so the adapter hands it normalised ones."""
    SimlerWrapper = wrapper or simulator_wrapper()

    class Adapter:
        def __init__(self, env_id: str, seed: int):
            args = types.SimpleNamespace(
                env_id=env_id,
                seed=seed,
                num_envs=recipe.num_envs,
                episode_len=recipe.episode_len,
                obj_set=recipe.obj_set,
                vla_unnorm_key=recipe.unnorm_key,
            )
            unnorm_state = {"q01": policy.q01, "q99": policy.q99, "mask": policy.mask}
            self.env = SimlerWrapper(args, unnorm_state)

        def reset(self, obj_set):
            return self.env.reset(obj_set)

        def step(self, actions):
            normalized = np.where(policy.mask, 2 * (actions - policy.q01) / (policy.q99 - policy.q01) - 1, actions)
            return self.env.step(torch.as_tensor(normalized, dtype=torch.float32))

    return Adapter


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def run_recipe(
    recipe: EvalRecipe,
    policy: Callable,
    make_env: Callable,
    out,
    *,
    overwrite: bool = False,
    progress: bool = True,
    meta: Optional[Dict] = None,
) -> Dict[str, object]:
    """Evaluate every (env, seed) of ``recipe``; ``make_env(env_id, seed)`` builds a batched environment."""
    out = Path(out)
    done, skipped = [], []
    for env_id in recipe.envs:
        for seed in recipe.seeds:
            target = out / env_id / recipe.obj_set / str(seed) / RESULT_FILE
            if target.is_file() and not overwrite:
                skipped.append((env_id, seed))
                continue
            torch.manual_seed(seed)
            np.random.seed(seed)
            env = make_env(env_id, seed)
            images, instructions, _ = env.reset(recipe.obj_set)
            success = np.zeros(len(instructions), dtype=bool)
            for _ in range(recipe.episode_len):
                actions = policy(_as_numpy(images), list(instructions))
                images, _, _, info = env.step(actions)
                success |= _as_numpy(info["success"]).astype(bool).reshape(-1)
            write_result(
                out,
                env_id,
                recipe.obj_set,
                seed,
                success.tolist(),
                episode_len=recipe.episode_len,
                suite=recipe.suite,
                **(meta or {}),
            )
            done.append((env_id, seed))
            if progress:
                print(f"{env_id} seed {seed}: success {success.mean():.3f} over {len(success)} episodes")
    return {"evaluated": done, "skipped": skipped, "out": str(out)}


def _cmd_run(args) -> int:
    from ..probe._model import load_vla, parse_model

    recipe = EvalRecipe.load(args.recipe)  # cheap checks first: the recipe, then the simulator, then the VLA
    if args.seeds:
        recipe.seeds = [int(s) for s in args.seeds.split(",")]
    if args.num_envs:
        recipe.num_envs = args.num_envs
    wrapper = simulator_wrapper()
    vla_path, adapter = parse_model(args.vla_path, args.adapter)
    loaded = load_vla(vla_path, adapter, device=args.device, dtype=args.dtype, attn_implementation=None)
    policy = BatchedPolicy(loaded, args.unnorm_key or recipe.unnorm_key)
    env_cls = simpler_env_factory(recipe, policy, wrapper)
    out = args.out or str(Path("eval") / Path(adapter or vla_path).name)
    meta = {"vla_path": str(vla_path), "adapter": str(adapter) if adapter else None}
    summary = run_recipe(recipe, policy, env_cls, out, overwrite=args.overwrite, meta=meta)
    print(f"{len(summary['evaluated'])} evaluated, {len(summary['skipped'])} already there; results in {out}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("run")
    p.add_argument("recipe", help="evaluation recipe, e.g. recipes/eval/ood.yaml or recipes/eval/vlthink.yaml")
    p.add_argument("--vla-path", required=True, help="base or merged OpenVLA checkpoint directory")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory on top of --vla-path")
    p.add_argument("--out", default=None, help="results directory (default: eval/<adapter or model name>)")
    p.add_argument("--unnorm-key", default=None, help="override the recipe's unnorm key")
    p.add_argument("--seeds", default=None, help="comma-separated seeds instead of the recipe's")
    p.add_argument("--num-envs", type=int, default=None, help="parallel environments instead of the recipe's")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device of the VLA")
    p.add_argument("--dtype", default="bfloat16", help="dtype of the VLA (bfloat16, float16 or float32)")
    p.add_argument("--overwrite", action="store_true", help="re-run (env, seed) pairs that already have results")
    p.set_defaults(func=_cmd_run)
    return p
