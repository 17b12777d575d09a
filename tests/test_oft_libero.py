"""`eval run` in the REAL LIBERO simulator with a tiny random OpenVLA-OFT policy (issue 30's real-simulator test).

Two tasks of libero_spatial, two episodes each, two parallel environments (worker processes in ``$LIBERO_PYTHON``),
OFT's protocol (recipes/eval/libero-spatial.yaml: L1 head, proprio, 2 cameras, centre crop, 8-step chunks open-loop,
10 wait steps, the benchmark's initial states), to the suite's step limit: a random policy does not succeed. Then:
the records and a video are written, a re-run resumes without loading the model, and `eval report` reads the
records into LIBERO's tables; two torchrun ranks share two tasks, and `eval throughput` runs OFT's own loop. The
policy is OFT's own checkpoint layout: the tiny model from OFT's classes with
random-weight ``action_head--0_checkpoint.pt`` / ``proprio_projector--0_checkpoint.pt`` written by OFT's classes.

Opt-in twice: OFT's checkout and fork (``OPENVLA_OFT_SRC``, as every OFT test) and a LIBERO build (``LIBERO_PYTHON``,
with ``LIBERO_CONFIG_PATH`` and ``MUJOCO_GL`` from its env.sh). The replay of a benchmark initial state against OFT's
``get_libero_image``/``get_libero_wrist_image`` is in tests/test_eval_libero.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import oft_assets as A
import pytest

LIBERO_PYTHON = os.environ.get("LIBERO_PYTHON")
pytestmark = [
    pytest.mark.skipif(A.oft_unavailable() is not None, reason=str(A.oft_unavailable())),
    pytest.mark.skipif(
        not LIBERO_PYTHON,
        reason="LIBERO_PYTHON is unset: build a CPU LIBERO with ../shared/libero/setup-cpu-libero.sh OUT (from a clone "
        "of Lifelong-Robot-Learning/LIBERO), source OUT/env.sh and set LIBERO_PYTHON=OUT/venv/bin/python",
    ),
]
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "eval" / "libero-spatial.yaml"
TASKS = ["libero_spatial-0", "libero_spatial-1"]
STEPS = 220  # libero_spatial's limit (OFT's TASK_MAX_STEPS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from test_oft_libero_policy import write_components

    from openvla_align.eval.policies import PolicySettings

    ckpt = A.build_tiny_oft_checkpoint(tmp_path_factory.mktemp("oft") / "tiny-oft", seed=0)
    write_components(ckpt, PolicySettings())  # OFT's LIBERO defaults: L1 head + proprio projector
    return ckpt


def _env(tmp_path) -> dict:
    env = A.oft_env(tmp_path / "home")
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(A.oft_src())])
    env.update(LIBERO_PYTHON=LIBERO_PYTHON, OMP_NUM_THREADS="1")
    return env


def _cli(tmp_path, *args, timeout=1800):
    cmd = [sys.executable, "-m", "openvla_align.cli", "eval", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path, timeout=timeout)


def test_a_tiny_oft_policy_runs_two_libero_spatial_tasks_batched(checkpoint, tmp_path):
    from PIL import Image

    recipe = tmp_path / "libero-spatial.yaml"  # "libero" in the command line: OFT's constants pick LIBERO's
    recipe.write_text(RECIPE.read_text().replace("envs: [libero_spatial]", f"envs: {json.dumps(TASKS)}"))
    out = tmp_path / "out"
    run = ["run", str(recipe), "--vla-path", str(checkpoint), "--device", "cpu", "--dtype", "float32",
           "--episodes", "2", "--num-envs", "2", "--video", "1", "--out", str(out)]  # fmt: skip
    proc = _cli(tmp_path, *run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 evaluated, 0 already there, 0 missing" in proc.stdout

    instructions = []
    for task in TASKS:
        where = out / task / "default" / "7"
        result = json.loads((where / "result.json").read_text())
        assert result["episode_len"] == STEPS and result["suite"] == "libero_spatial"
        identity = result["identity"]
        assert identity["simulator"] == "libero" and identity["unnorm_key"] == "auto" and identity["episodes"] == 2
        assert identity["policy"]["num_images_in_input"] == 2 and identity["policy"]["use_proprio"] is True
        episodes = result["episodes"]
        assert [e["episode"] for e in episodes] == [0, 1]  # the benchmark's initial states 0 and 1
        assert [e["env_seed"] for e in episodes] == [0, 0]  # OFT's get_libero_env seeds every env 0
        assert all(e["success"] is False and e["steps"] == STEPS for e in episodes), episodes
        assert len({e["instruction"] for e in episodes}) == 1
        instructions.append(episodes[0]["instruction"])
        with Image.open(where / "episode_0.gif") as gif:  # the first observation and one frame per step
            assert gif.n_frames == STEPS + 1 and gif.size[0] >= 256
        assert not (where / "episode_1.gif").exists()
    assert instructions[0] != instructions[1] and all(instructions)

    again = _cli(tmp_path, *run, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "all 2 (env, seed) pairs already evaluated for this model and setting (the VLA was not loaded)" in (
        again.stdout
    )

    report = _cli(tmp_path, "report", str(out), "--out", str(tmp_path / "tables"), timeout=600)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "| out | 0.000 [0.000, 0.490] (0/4) | 0.000 [0.000, 0.490] (0/4) |" in report.stdout
    assert f"| 0 | {instructions[0]} | 0.000 [0.000, 0.658] (0/2) |" in report.stdout
    rows = (tmp_path / "tables" / "libero.csv").read_text().splitlines()
    assert rows[0].startswith("run,suite,task,instruction,successes,episodes") and len(rows) == 1 + 4


@pytest.mark.skipif(
    importlib.util.find_spec("libero") is None,
    reason="OpenVLA-OFT's own loop runs LIBERO in its process: install LIBERO into this environment too (OFT's "
    "LIBERO.md does; docs/libero.md)",
)
def test_throughput_times_our_loop_and_ofts_own_run_task(checkpoint, tmp_path):
    """`eval throughput` drives OFT's run_task (imported from OFT's checkout) and ours on one task; OFT's loop must
    really step every episode to the limit (its run_episode swallows exceptions: the count is checked). Figures are
    for the README's benchmark, not asserted: a timed test proves nothing on a shared machine."""
    out = tmp_path / "throughput.json"
    args = ["throughput", str(RECIPE), "--vla-path", str(checkpoint), "--device", "cpu", "--dtype", "bfloat16",
            "--episodes", "1", "--steps", "8", "--num-envs", "1", "--rounds", "1", "--oft-loop",
            "--out", str(out)]  # fmt: skip
    proc = _cli(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [r["loop"] for r in runs] == ["openvla-align, 1 env(s)", "OpenVLA-OFT run_task, 1 env"]
    assert all(r["episodes"] == 1 and r["env_steps"] == 8 and r["seconds"] > 0 for r in runs)
    assert "x OFT's loop" in proc.stdout


def test_torchrun_ranks_share_the_tasks(checkpoint, tmp_path):
    """Two torchrun ranks, each its own LIBERO task (one episode of 16 steps); a re-run of one shard finds its task
    done without loading the model."""
    recipe = tmp_path / "libero-spatial.yaml"
    text = RECIPE.read_text().replace("envs: [libero_spatial]", "envs: [libero_spatial-3, libero_spatial-4]")
    recipe.write_text(text + "episode_len: 16\n")
    out = tmp_path / "out"
    run = ["run", str(recipe), "--vla-path", str(checkpoint), "--device", "cpu", "--dtype", "float32",
           "--episodes", "1", "--num-envs", "1", "--out", str(out)]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                "openvla_align.cli", "eval", *run]  # fmt: skip
    proc = subprocess.run(torchrun, capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 evaluated by 2 ranks, 0 already there, 0 missing" in proc.stdout
    for task in ("libero_spatial-3", "libero_spatial-4"):
        (episode,) = json.loads((out / task / "default" / "7" / "result.json").read_text())["episodes"]
        assert episode["steps"] == 16 and episode["episode"] == 0
    again = _cli(tmp_path, *run, "--shard", "1/2", timeout=600)
    assert again.returncode == 0 and "all 1 (env, seed) pairs of shard 1/2 already evaluated" in again.stdout, (
        again.stdout + again.stderr[-2000:]
    )
