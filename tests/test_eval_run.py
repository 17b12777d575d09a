"""`openvla-align eval run`: the rollout loop, batched action decoding and result files.

The environment here is a STAND-IN with the batched interface of the reference implementation's Simpler wrapper
(reset(obj_set) -> images, instructions, info; step(actions) -> images, reward, done, info["success"]). It is not
the simulator: it checks what the runner feeds it and declares success from the actions it receives.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from openvla_align.eval import load_run
from openvla_align.eval.report import build_report
from openvla_align.eval.run import BatchedPolicy, EvalRecipe, rollout, run_recipe
from openvla_align.tiny import save_tiny_checkpoint
from openvla_align.vla.checkpoint import load_vla

from conftest import cli_fails

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "eval"


class StandInEnv:
    """Batched like the reference's wrapper; success once the gripper action (dim 6) of an env exceeds 0.5."""

    def __init__(self, env_id, seed, num_envs=3, log=None):
        self.rng = np.random.default_rng(seed)
        self.num_envs, self.env_id, self.log = num_envs, env_id, log if log is not None else []

    def _images(self):
        return torch.as_tensor(self.rng.integers(0, 256, (self.num_envs, 64, 64, 3), dtype=np.uint8))

    def reset(self, obj_set):
        self.log.append(("reset", self.env_id, obj_set))
        return self._images(), [f"put the carrot on the plate {i}" for i in range(self.num_envs)], {}

    def step(self, actions):
        actions = np.asarray(actions)
        assert actions.shape == (self.num_envs, 7) and np.isfinite(actions).all()
        self.log.append(("step", actions.copy()))
        success = torch.as_tensor(actions[:, 6] > 0.5)
        return (
            self._images(),
            torch.zeros(self.num_envs),
            torch.zeros(self.num_envs, dtype=torch.bool),
            {"success": success},
        )


@pytest.fixture
def checkpoint(tmp_path, vla, tokenizer):
    stats = {"action": {"q01": [-0.5] * 6 + [0.0], "q99": [0.5] * 6 + [1.0], "mask": [True] * 6 + [False]}}
    vla.config.norm_stats = {"sft": stats}
    save_tiny_checkpoint(tmp_path / "ckpt", vla, tokenizer)
    return tmp_path / "ckpt"


def test_recipes_name_the_papers_environments():
    from openvla_align.eval import OOD_ENVS, VL_THINK

    ood, think = EvalRecipe.load(RECIPES / "ood.yaml"), EvalRecipe.load(RECIPES / "vlthink.yaml")
    assert tuple(ood.envs) == OOD_ENVS and len(ood.envs) == 13 and list(think.envs) == list(VL_THINK)
    for r in (ood, think):
        assert (r.seeds, r.num_envs, r.obj_set, r.episode_len, r.unnorm_key) == (
            [0, 1, 2, 4, 5, 6, 7, 8],
            128,
            "test",
            80,
            "sft",
        )


def test_policy_decodes_a_batch_like_predict_action(checkpoint):
    loaded = load_vla(checkpoint)
    policy = BatchedPolicy(loaded, "sft")
    vocab_size = policy.decoder.vocab_size
    ids = np.array([[vocab_size - 1] * 7, [vocab_size - 256] * 7])  # lowest and highest bins
    actions = policy.unnormalize(ids)
    lowest, highest = -1 + 1 / 255, 1 - 1 / 255  # the first and last of 255 bin centres in [-1, 1]
    np.testing.assert_allclose(actions[0, :6], -0.5 + (lowest + 1) / 2)
    np.testing.assert_allclose(actions[1, :6], -0.5 + (highest + 1) / 2)
    assert actions[0, 6] == pytest.approx(lowest, abs=1e-15)  # masked (gripper): left normalised, as OpenVLA
    images = [np.full((64, 64, 3), v, dtype=np.uint8) for v in (10, 200)]
    batch = policy(images, ["put the carrot on the plate", "Open the drawer"])
    one = policy(images[1:], ["open the drawer"])  # batching changes nothing (right padding, masked in the cache)
    assert batch.shape == (2, 7) and np.allclose(batch[1], one[0])
    with pytest.raises(ValueError, match="unnorm_key 'bridge_orig' is not in the model's norm_stats"):
        BatchedPolicy(loaded, "bridge_orig")


def test_rollout_writes_results_the_report_reads_and_resumes(checkpoint, tmp_path):
    recipe = EvalRecipe(
        suite="ood",
        envs=["PutOnPlateInScene25Carrot-v1", "PutOnPlateInScene25Plate-v1"],
        seeds=[0, 1],
        num_envs=3,
        episode_len=2,
    )
    policy = BatchedPolicy(load_vla(checkpoint), "sft")
    log = []
    summary = run_recipe(
        recipe, policy, lambda env, seed: StandInEnv(env, seed, log=log), tmp_path / "out", progress=False
    )
    assert len(summary["evaluated"]) == 4 and summary["skipped"] == []
    assert sum(1 for e in log if e[0] == "reset") == 4 and sum(1 for e in log if e[0] == "step") == 8
    assert all(e[2] == "test" for e in log if e[0] == "reset")
    result = json.loads((tmp_path / "out" / recipe.envs[0] / "test" / "0" / "result.json").read_text())
    steps = [e[1] for e in log if e[0] == "step"][:2]
    expected = (steps[0][:, 6] > 0.5) | (steps[1][:, 6] > 0.5)  # success once over the episode
    assert [e["success"] for e in result["episodes"]] == expected.tolist()
    assert result["episode_len"] == 2 and result["suite"] == "ood"
    report = build_report([load_run(tmp_path / "out")])
    assert report.problems == [] and len(report.cells) == 2

    again = run_recipe(recipe, policy, lambda env, seed: StandInEnv(env, seed), tmp_path / "out", progress=False)
    assert again["evaluated"] == [] and len(again["skipped"]) == 4  # finished pairs are not re-run


@pytest.mark.skipif(importlib.util.find_spec("mani_skill") is not None, reason="the simulator is installed here")
def test_cli_without_the_simulator_says_what_to_install(checkpoint, tmp_path, capsys):
    missing = "Simpler/ManiSkill environments are not installed"
    ood = str(RECIPES / "ood.yaml")
    cli_fails(capsys, ["eval", "run", ood, "--vla-path", str(checkpoint)], missing)
    # what the user typed is checked before what the machine lacks: the model's path, then the environment ids
    cli_fails(capsys, ["eval", "run", ood, "--vla-path", str(tmp_path / "nope")], r"--vla-path '.*nope' does not exist")
    cli_fails(capsys, ["eval", "run", ood, "--vla-path", str(tmp_path)], r"has no config.json: not a checkpoint")
    typo = tmp_path / "typo.yaml"
    typo.write_text("suite: ood\nenvs: [PutOnPlateInScene25Carot-v1]\n")
    message = (
        r"unknown environment id\(s\) \['PutOnPlateInScene25Carot-v1'\] \(did you mean PutOnPlateInScene25Carrot-v1\?\)"
    )
    cli_fails(capsys, ["eval", "run", str(typo), "--vla-path", str(checkpoint)], message)
    assert not (tmp_path / "eval").exists() and not Path("eval").exists()


@pytest.mark.parametrize(
    "recipe, args, message",
    [
        ("suite: x\nenvs: [a]\nepisode: 3\n", [], "unknown keys"),
        ("suite: x\nenvs: [a]\nseeds: [0, 1, 1]\n", [], r"seeds \[1\] are listed more than once"),
        ("suite: x\nenvs: [a, a]\n", [], r"envs \['a'\] are listed more than once"),
        ("suite: x\nenvs: [a]\nnum_envs: 4\n", ["--sim-backend", "cpu"], "pass --num-envs 1 for a CPU smoke test"),
        ("suite: x\nenvs: [a]\npolicy: {center_crop: true}\n", [], r"takes no policy settings \(got \['center_crop'\]"),
        ("suite: x\nenvs: [a]\nepisodes: 3\n", [], "Simpler runs num_envs episodes per"),
    ],
    ids=["unknown-key", "duplicate-seed", "duplicate-env", "cpu-with-4-envs", "policy-settings", "episodes"],
)
def test_bad_recipes_and_backends_fail_before_anything_loads(tmp_path, capsys, recipe, args, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe)
    cli_fails(capsys, ["eval", "run", str(bad), "--vla-path", str(tmp_path / "no-model"), *args], message)
    assert not Path("eval").exists()


def test_kv_cached_decoding_equals_full_forwards_for_prompts_of_different_lengths(checkpoint):
    """One prefill + single-token steps over right-padded rows give the tokens of re-running the whole forward per
    token; every token is one of the 256 action tokens."""
    policy = BatchedPolicy(load_vla(checkpoint), "sft")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    instructions = ["put the carrot on the plate", "pick up the red cup and put it in the bowl near the left", "push"]
    rows, _ = policy.prompts(images, instructions)
    assert len({len(r) for r in rows}) == 3  # three prompt lengths in one batch
    cached = policy.action_tokens(images, instructions)
    full = policy.action_tokens(images, instructions, kv_cache=False)
    assert cached.shape == (3, 7) and (cached == full).all()
    vocab_size = policy.decoder.vocab_size
    assert ((cached >= vocab_size - 256) & (cached < vocab_size)).all()
    alone = np.concatenate([policy.action_tokens(images[i : i + 1], instructions[i : i + 1]) for i in range(3)])
    assert (alone == cached).all()  # batch-invariant


def test_preallocated_cache_steps_give_the_growing_caches_tokens(checkpoint, monkeypatch):
    """The decode steps write into a preallocated key/value cache on the transformers releases it supports (4.40,
    OpenVLA's pin, and 5.x: both installed in the test environments) and choose the tokens of the growing cache."""
    import transformers

    from openvla_align.vla import actions

    policy = BatchedPolicy(load_vla(checkpoint), "sft")
    images = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    instructions = ["put the carrot on the plate", "pick up the red cup and put it in the bowl near the left", "push"]
    made = []
    real = actions.preallocated_cache
    monkeypatch.setattr(actions, "preallocated_cache", lambda *a: made.append(real(*a)) or made[-1])
    static = policy.action_tokens(images, instructions)
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    supported = (major, minor) == (4, 40) or major >= 5
    assert made and all((m is not None) == supported for m in made)
    policy.decoder.preallocate = False
    assert (policy.action_tokens(images, instructions) == static).all()


class ChunkEnv:
    """A STAND-IN with LIBERO's batched contract (dict observations, several reset blocks per (env, seed), episodes
    that end at their first success): episode ``e`` succeeds at step ``2 e + 2``. It records what it is asked."""

    stops_at_success = True

    def __init__(self, episodes=5, num_envs=2):
        self.episodes, self.num_envs, self.next, self.log = episodes, num_envs, 0, []

    def _obs(self):
        b = len(self.block)
        marks = np.asarray(self.block, dtype=np.uint8)[:, None, None, None]
        return {"full_image": np.broadcast_to(marks, (b, 8, 8, 3)).copy(), "state": np.asarray(self.block)[:, None]}

    def reset(self, obj_set):
        self.block = list(range(self.next, min(self.next + self.num_envs, self.episodes)))
        self.next += len(self.block)
        self.t, self.done = 0, np.zeros(len(self.block), dtype=bool)
        return self._obs(), [f"task {e}" for e in self.block], {"episodes": list(self.block)}

    def step(self, actions):
        self.t += 1
        assert not actions[self.done].any(), "a finished episode was given an action"
        self.log.append((list(self.block), actions.copy()))
        now = np.asarray([2 * e + 2 == self.t for e in self.block]) & ~self.done
        self.done |= now
        return self._obs(), None, now, {"success": now}


class ChunkPolicy:
    """Chunks of 4 actions whose first dimension counts 1, 2, 3, 4 and whose second is the row's episode number."""

    open_loop_steps = 3

    def __init__(self):
        self.calls = []

    def __call__(self, obs, instructions):
        self.calls.append(obs["state"][:, 0].tolist())
        chunk = np.zeros((len(instructions), 4, 7))
        chunk[:, :, 0] = np.arange(1, 5)
        chunk[:, :, 1] = obs["state"][:, :1]
        return chunk


def test_chunks_run_open_loop_and_episodes_end_at_their_first_success(tmp_path):
    env, policy = ChunkEnv(), ChunkPolicy()
    recipe = EvalRecipe(suite="libero_spatial", envs=["libero_spatial-0"], seeds=[7], num_envs=2, obj_set="default")
    records, frames = rollout(env, policy, recipe, episode_len=6, video=3)
    # blocks (0, 1), (2, 3), (4); episode e succeeds at step 2 e + 2 when that is within 6 steps
    assert [r["episode"] for r in records] == [0, 1, 2, 3, 4]
    assert [r["first_success_step"] for r in records] == [2, 4, 6, None, None]
    assert [r["steps"] for r in records] == [2, 4, 6, 6, 6]
    # the chunk's LAST open_loop_steps actions run in order (OFT's deque(maxlen=...).extend), then the policy is
    # asked again, for the unfinished rows only
    first_block = [a for rows, a in env.log if rows == [0, 1]]
    assert [a[1, 0] for a in first_block] == [2, 3, 4, 2]
    assert policy.calls == [[0, 1], [1], [2, 3], [2, 3], [4], [4]]
    assert all(a[1, 1] == 1 for a in first_block)  # row 1's own actions
    # videos: the reset frame and one per step the episode ran
    assert [len(f) for f in frames] == [3, 5, 7]


def test_libero_report_pools_episodes_with_wilson_intervals(tmp_path):
    from openvla_align.eval.report import libero_markdown, wilson_interval
    from openvla_align.eval.results import write_result

    out = tmp_path / "run"
    for task, wins in ((0, 50), (1, 0)):
        records = [{"instruction": f"task {task}"} for _ in range(50)]
        write_result(out, f"libero_spatial-{task}", "default", 7, [i < wins for i in range(50)], records)
    write_result(out, "libero_goal-3", "default", 7, [True, False], [{"instruction": "goal"}] * 2)
    run = load_run(out)
    assert set(run.cells) == {
        ("libero_spatial-0", "default", "7"),
        ("libero_spatial-1", "default", "7"),
        ("libero_goal-3", "default", "7"),
    }
    # Wilson at 0 of 50: [0, z^2 / (n + z^2)]
    low, high = wilson_interval(0, 50)
    assert low == 0 and abs(high - 1.959964**2 / (50 + 1.959964**2)) < 1e-6
    text = libero_markdown([run])
    assert "| run | libero_spatial | libero_goal | overall |" in text
    assert "0.500 [0.404, 0.596] (50/100)" in text and "(51/102)" in text
    assert "| 1 | task 1 | 0.000 [0.000, 0.071] (0/50) |" in text
