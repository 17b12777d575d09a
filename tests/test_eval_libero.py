"""LIBERO as `eval run`'s simulator (``eval.libero``) against OpenVLA-OFT's own functions, and its worker processes.

OFT's pieces come from OFT's files (``../shared/upstream/openvla-oft`` beside the repository, or
``$OPENVLA_OFT_SRC``): their function definitions are taken out with ``ast`` and run with numpy and math in scope,
so neither TensorFlow nor OFT's prismatic is needed; skipped with the reason when the checkout is absent.

The worker protocol (chained resets, episodes ended at success, a worker's error or death, stdout chatter) is tested
with a stand-in environment in the real worker file, in this interpreter. The opt-in tests drive the real simulator
(the CPU build: ``../shared/libero/setup-cpu-libero.sh OUT``, then ``source OUT/env.sh`` and
``LIBERO_PYTHON=OUT/venv/bin/python``) and replay the same episodes with OFT's functions in the LIBERO interpreter.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pytest

from openvla_align.eval.libero import (
    SUITES,
    WAIT_ACTION,
    LiberoEnv,
    WorkerError,
    observation,
    process_action,
    quat2axisangle,
)

REPO = Path(__file__).resolve().parents[1]
OFT = Path(os.environ.get("OPENVLA_OFT_SRC") or REPO.parent / "shared" / "upstream" / "openvla-oft")
ROBOT = OFT / "experiments" / "robot"
needs_oft = pytest.mark.skipif(
    not (ROBOT / "libero" / "run_libero_eval.py").is_file(),
    reason=f"no OpenVLA-OFT checkout at {OFT} (set OPENVLA_OFT_SRC): the comparisons run OFT's own functions",
)
LIBERO_PYTHON = os.environ.get("LIBERO_PYTHON")
needs_libero = pytest.mark.skipif(
    not LIBERO_PYTHON,
    reason="LIBERO_PYTHON is unset: build the CPU LIBERO with ../shared/libero/setup-cpu-libero.sh OUT, source "
    "OUT/env.sh and set LIBERO_PYTHON=OUT/venv/bin/python",
)


def oft_definitions(path, names, scope):
    """Run the top-level definitions ``names`` (functions, classes, assignments) of OFT's file ``path`` in ``scope``
    (a dict holding what they use), without executing the file's imports."""
    tree = ast.parse(Path(path).read_text())

    def name_of(node):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            return node.name
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            return node.targets[0].id
        return None

    body = [node for node in tree.body if name_of(node) in names]
    missing = set(names) - {name_of(node) for node in body}
    assert not missing, f"{path} no longer defines {missing}"
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec", dont_inherit=True), scope)
    return scope


@pytest.fixture(scope="module")
def oft():
    """OFT's functions: run_libero_eval.py's, libero_utils.py's and robot_utils.py's gripper transforms."""
    from enum import Enum

    scope = {"np": np, "math": math, "os": os, "Enum": Enum}
    oft_definitions(ROBOT / "robot_utils.py", ["normalize_gripper_action", "invert_gripper_action"], scope)
    names = ["get_libero_image", "get_libero_wrist_image", "quat2axisangle", "get_libero_dummy_action"]
    oft_definitions(ROBOT / "libero" / "libero_utils.py", names, scope)
    scope["resize_image_for_policy"] = lambda img, size: img  # the policy's resizing (eval.policies), not ours
    names = ["TaskSuite", "TASK_MAX_STEPS", "GenerateConfig", "check_unnorm_key", "prepare_observation"]
    names.append("process_action")
    scope.update(__name__="oft_run_libero_eval", dataclass=dataclass, Path=Path, Optional=Optional, Union=Union)
    return oft_definitions(ROBOT / "libero" / "run_libero_eval.py", names, scope)


# ------------------------------------------------------------------------------------------------------ cheap checks


def test_env_ids_expand_and_check():
    ids = LiberoEnv.expand_env_ids(["libero_spatial", "libero_90-89", "libero_goal-0"])
    assert ids == [f"libero_spatial-{t}" for t in range(10)] + ["libero_90-89", "libero_goal-0"]
    LiberoEnv.check_env_ids(ids)
    bad = ["libero_spatial-10", "libero_foo-1", "libero_goal", "libero_10-x", "libero_10-01", "libero_10-0"]
    with pytest.raises(ValueError) as err:
        LiberoEnv.check_env_ids(bad)
    message = str(err.value)
    assert "\n" not in message
    assert message == (
        "unknown LIBERO environment id(s) ['libero_spatial-10', 'libero_foo-1', 'libero_goal', 'libero_10-x', "
        "'libero_10-01']: an id "
        "is <suite>-<task> (e.g. libero_spatial-3), or a suite's name for all its tasks; suites: libero_spatial "
        "(tasks 0-9), libero_object (tasks 0-9), libero_goal (tasks 0-9), libero_10 (tasks 0-9), libero_90 (tasks 0-89)"
    )


def test_settings_are_accepted_and_the_backends_ignored():
    for backend in ("gpu", "cpu"):
        LiberoEnv.check_settings(8, backend, backend)
    with pytest.raises(ValueError, match="--num-envs 0"):
        LiberoEnv.check_settings(0, "gpu", "gpu")


def test_make_policy_hands_the_recipe_settings_to_eval_policies(monkeypatch):
    from openvla_align.eval import policies

    seen = {}

    def make_policy(loaded, settings, unnorm_key):
        seen.update(loaded=loaded, settings=settings, unnorm_key=unnorm_key)
        return "policy"

    monkeypatch.setattr(policies, "make_policy", make_policy)
    assert LiberoEnv.make_policy("model", {"num_open_loop_steps": 4}, "libero_goal_no_noops") == "policy"
    assert seen == {
        "loaded": "model",
        "settings": policies.PolicySettings.from_dict({"num_open_loop_steps": 4}),
        "unnorm_key": "libero_goal_no_noops",
    }


@needs_oft
def test_step_limits_are_ofts(oft):
    assert {s: LiberoEnv.episode_len_of(f"{s}-0") for s in SUITES} == {
        suite.value: steps for suite, steps in oft["TASK_MAX_STEPS"].items()
    }
    assert list(SUITES) == [suite.value for suite in oft["TaskSuite"]]
    assert oft["GenerateConfig"]().num_steps_wait == 10 and oft["GenerateConfig"]().num_trials_per_task == 50
    assert tuple(oft["get_libero_dummy_action"]("openvla")) == WAIT_ACTION


@needs_oft
@pytest.mark.parametrize(
    "keys",
    [["libero_spatial"], ["libero_spatial_no_noops"], ["libero_spatial", "libero_spatial_no_noops"], ["bridge"], []],
)
def test_unnorm_key_is_ofts_rule(oft, keys):
    stats = {k: {} for k in keys}
    cfg = oft["GenerateConfig"](task_suite_name="libero_spatial")
    try:
        oft["check_unnorm_key"](cfg, type("Model", (), {"norm_stats": stats}))
    except AssertionError:
        with pytest.raises(ValueError) as err:
            LiberoEnv.unnorm_key_of("libero_spatial-4", stats)
        assert str(err.value).startswith("libero_spatial-4: unnorm key: ") and "\n" not in str(err.value)
        assert f"(has: {sorted(keys)})" in str(err.value)
        return
    assert LiberoEnv.unnorm_key_of("libero_spatial-4", stats) == cfg.unnorm_key


@needs_oft
def test_process_action_is_ofts_bitwise(oft):
    rng = np.random.default_rng(0)
    actions = rng.normal(size=(12, 7))
    actions[:, 6] = [0.0, 1.0, 0.5, 0.4999999, 0.5000001, -0.3, 1.7, -0.0, 0.25, 0.75, 1e-300, 0.5 + 1e-16]
    ours = process_action(actions)
    theirs = np.stack([oft["process_action"](a, "openvla") for a in actions])
    assert ours.dtype == theirs.dtype == np.float64
    assert ours.tobytes() == theirs.tobytes()  # bitwise, signed zeros included
    assert ours[:3, 6].tolist() == [1.0, -1.0, -0.0]  # closed, open, and exactly 0.5 gives 0 (np.sign)


@needs_oft
def test_observation_is_ofts_bitwise(oft):
    """Our observation against OFT's prepare_observation (its resizing left to the policy): the 180° turns and the
    state, with quaternions at the edges of quat2axisangle (w = ±1, |w| > 1 clipped, a near-zero angle)."""
    rng = np.random.default_rng(1)
    quats = [rng.normal(size=4) for _ in range(20)]
    quats = [q / np.linalg.norm(q) for q in quats]
    quats += [np.array([0.0, 0.0, 0.0, 1.0]), np.array([0.0, 0.0, 0.0, -1.0]), np.array([1e-9, 0, 0, 1.0000001])]
    quats += [np.array([0.1, 0.2, 0.3, -1.2]), np.array([1e-8, -2e-8, 3e-8, 1.0 - 1e-16]), np.array([1.0, 0, 0, 0])]
    for q in quats:
        raw = {
            "agentview_image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
            "robot0_eye_in_hand_image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
            "robot0_eef_pos": rng.normal(size=3),
            "robot0_eef_quat": q.copy(),
            "robot0_gripper_qpos": rng.normal(size=2) * 0.04,
        }
        ours = observation(raw)
        np.testing.assert_array_equal(raw["robot0_eef_quat"], q)  # ours does not clip the caller's array (OFT's does)
        theirs, _ = oft["prepare_observation"]({k: v.copy() for k, v in raw.items()}, None)
        for key in ("full_image", "wrist_image", "state"):
            assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape
            assert ours[key].tobytes() == np.ascontiguousarray(theirs[key]).tobytes(), (key, q)
        assert quat2axisangle(q).tobytes() == oft["quat2axisangle"](q.copy()).tobytes()


# ------------------------------------------------------------------------------------------------------ the workers

STANDIN = '''
"""A stand-in LIBERO task for the worker protocol: the real worker file, a fake environment."""
import importlib.util, os, sys
import numpy as np

spec = importlib.util.spec_from_file_location("libero_worker", {worker!r})
libero_worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(libero_worker)


class FakeEnv:
    """reset() draws a 'fixture offset' from numpy's global generator (a varying number of draws, like LIBERO's
    rejection sampling); the observation shows it, the step count and the last action received."""

    def __init__(self):
        self.steps, self.action = 0, [0.0] * 7

    def seed(self, seed):
        np.random.seed(seed)

    def reset(self):
        draws = 1 + int(np.random.randint(3))
        self.offset = np.random.uniform(size=draws)[-1]
        print("chatter on stdout", flush=True)
        os.write(1, b"chatter on fd 1\\n")

    def set_init_state(self, state):
        self.pos, self.steps = float(state), 0
        return self._obs()

    def step(self, action):
        assert isinstance(action, list) and all(type(a) is float for a in action), action
        if action[0] == 666.0:
            raise ValueError("the stand-in's step failed")
        if action[0] == 999.0:
            os._exit(7)
        self.steps += 1
        self.action = action
        self.pos += action[0]
        return self._obs(), float(self.pos), self.pos >= 1.0, {{}}

    def _obs(self):
        image = np.full((256, 256, 3), int(self.offset * 255), np.uint8)
        image[0, 0] = [self.steps, 0, 0]
        return {{
            "agentview_image": image,
            "robot0_eye_in_hand_image": image[::-1],
            "robot0_eef_pos": np.array([self.pos, self.offset, self.steps], dtype=np.float64),
            "robot0_eef_quat": np.array([0.0, 0.0, 0.0, 1.0]),
            "robot0_gripper_qpos": np.array(self.action[-2:]),
        }}

    def close(self):
        pass


def load_task(suite, task_id, resolution):
    if task_id == 9:
        input("a question on stdin")
    if task_id == 8:
        raise RuntimeError("the stand-in cannot build task 8")
    env = FakeEnv()
    env.seed(0)
    return env, f"stand-in {{suite}} task {{task_id}}", np.arange(6) * 0.1


libero_worker.main(load_task)
'''


@pytest.fixture
def standin(tmp_path, monkeypatch):
    """LiberoEnv with its workers running the stand-in task, in this interpreter."""
    from openvla_align.eval import libero_worker

    script = tmp_path / "standin_worker.py"
    script.write_text(STANDIN.format(worker=str(Path(libero_worker.__file__))))
    monkeypatch.setattr(LiberoEnv, "worker_script", script)
    monkeypatch.setenv("LIBERO_PYTHON", sys.executable)
    return LiberoEnv


def run_block(env, actions_per_step):
    """One reset and the given actions; the observations after each step."""
    obs, instructions, info = env.reset("default")
    seen = [obs]
    for actions in actions_per_step:
        obs, reward, done, step_info = env.step(actions)
        assert (step_info["success"] == done).all()
        seen.append(obs)
    return info["episodes"], instructions, seen


def test_parallel_copies_chain_the_reset_generator_as_one_sequential_env(standin):
    """Episode k's reset draws from the generator state the k earlier resets left, whichever copy runs it: 5
    episodes 3 at a time see exactly what 5 episodes in one environment see."""
    parallel, sequential = (
        standin("libero_goal-2", 7, 3, 20, episodes=5),
        standin("libero_goal-2", 7, 1, 20, episodes=5),
    )
    try:
        assert parallel.seeds == [0] * 5 and parallel.episodes == 5 and len(parallel._workers) == 3
        starts = {}
        for env in (parallel, sequential):
            firsts = []
            while env._next < env.episodes:
                episodes, instructions, seen = run_block(env, [])
                assert instructions == ["stand-in libero_goal task 2"] * len(episodes)
                firsts += [(k, {key: v[i] for key, v in seen[0].items()}) for i, k in enumerate(episodes)]
            starts[env] = firsts
        assert [k for k, _ in starts[parallel]] == [k for k, _ in starts[sequential]] == [0, 1, 2, 3, 4]
        offsets = []
        for (_, a), (_, b) in zip(starts[parallel], starts[sequential]):
            for key in a:
                assert a[key].tobytes() == b[key].tobytes(), key
            offsets.append(a["state"][1])
        assert len(set(offsets)) == 5  # every reset drew anew
        rng = np.random.RandomState(0)  # what the chain must equal: one generator through the five resets
        expected = [rng.uniform(size=1 + int(rng.randint(3)))[-1] for _ in range(5)]
        assert offsets == expected
        with pytest.raises(RuntimeError, match="all 5 episodes have been started"):
            parallel.reset("default")
    finally:
        parallel.close()
        sequential.close()


def test_an_episode_stops_at_success_and_actions_are_processed(standin):
    """A row that succeeded is not stepped again (its action row is ignored, its observation kept); the others get
    OFT's processed action as Python floats."""
    env = standin("libero_spatial-0", 7, 3, 20, episodes=3)
    try:
        obs, _, info = env.reset("default")
        assert info["episodes"] == [0, 1, 2] and obs["state"].shape == (3, 8) and obs["full_image"].dtype == np.uint8
        # each copy waited 10 steps with the dummy action (the stand-in's gripper qpos shows the last action's end)
        assert obs["state"][:, 2].tolist() == [10.0] * 3 and obs["state"][:, 6:].tolist() == [[0.0, -1.0]] * 3
        # initial positions 0.0, 0.1, 0.2; a step moves by action[0]; success at >= 1.0
        step1 = np.array([[0.2, 0, 0, 0, 0, 0, 0.9], [0.95, 0, 0, 0, 0, 0, 0.1], [0.1, 0, 0, 0, 0, 0, 0.5]])
        obs, reward, done, info = env.step(step1)
        assert done.tolist() == [False, True, False] and reward == pytest.approx([0.2, 1.05, 0.3])
        assert obs["state"][:, 6:].tolist() == [[0.0, -1.0], [0.0, 1.0], [0.0, -0.0]]  # gripper: OFT's processing
        step2 = np.array([[0.2] + [0.0] * 6, [np.nan] * 7, [0.8] + [0.0] * 6])
        before = {k: v[1].copy() for k, v in obs.items()}
        obs, reward, done, info = env.step(step2)
        assert done.tolist() == [False, True, True] and info["success"].tolist() == [False, True, True]
        for key, value in before.items():
            assert obs[key][1].tobytes() == value.tobytes(), key  # the finished row was not stepped
        assert obs["state"][:, 2].tolist() == [12.0, 11.0, 12.0]  # steps per row (eef_pos[2] counts them)
        obs, reward, done, info = env.step(np.array([[0.7] + [0.0] * 6, [np.nan] * 7, [np.nan] * 7]))
        assert done.all() and obs["state"][:, 2].tolist() == [13.0, 11.0, 12.0]
        with pytest.raises(ValueError, match=r"shape \(3, 7\), got \(2, 7\)"):
            env.step(np.zeros((2, 7)))
        with pytest.raises(ValueError, match="set obj_set: default"):
            env.reset("test")
    finally:
        env.close()


def test_a_worker_error_and_a_dead_worker_are_reported_and_nothing_is_left_running(standin):
    env = standin("libero_spatial-1", 7, 2, 20, episodes=2)
    procs = [w.proc for w in env._workers]
    try:
        env.reset("default")
        with pytest.raises(WorkerError) as err:
            env.step(np.array([[666.0] + [0.0] * 6, [0.0] * 7]))
        assert "LIBERO worker 0 failed" in str(err.value) and "ValueError: the stand-in's step failed" in str(err.value)
    finally:
        env.close()
    assert all(p.poll() is not None for p in procs)

    env = standin("libero_spatial-1", 7, 2, 20, episodes=2)
    procs = [w.proc for w in env._workers]
    try:
        env.reset("default")
        with pytest.raises(WorkerError) as err:
            env.step(np.array([[0.0] * 7, [999.0] + [0.0] * 6]))
        assert "LIBERO worker 1" in str(err.value) and "exited (7)" in str(err.value)
    finally:
        env.close()
    assert all(p.poll() is not None for p in procs)

    for task, expected in ((8, "RuntimeError: the stand-in cannot build task 8"), (9, "EOFError")):
        with pytest.raises(WorkerError, match=expected):  # input() meets /dev/null, not the protocol
            standin(f"libero_90-{task}", 7, 2, 20, episodes=2)


def test_close_does_not_wait_on_a_worker_blocked_writing(standin):
    """An interrupt between sending steps and reading their replies (~400 kB each, more than a pipe holds): close()
    still ends every worker at once."""
    import time

    env = standin("libero_spatial-2", 7, 2, 20, episodes=2)
    procs = [w.proc for w in env._workers]
    env.reset("default")
    for worker in env._workers:
        worker.send("step", action=[0.0] * 7)
    time.sleep(0.5)
    t0 = time.monotonic()
    env.close()
    assert time.monotonic() - t0 < 5 and all(p.poll() is not None for p in procs)


def test_workers_exit_when_the_runner_is_killed(standin, tmp_path):
    """A runner killed outright (no clean-up) leaves no worker behind: each sees its input end and exits."""
    import signal
    import time

    runner = f"""
import os, signal
from openvla_align.eval.libero import LiberoEnv
LiberoEnv.worker_script = {str(LiberoEnv.worker_script)!r}
env = LiberoEnv("libero_spatial-2", 7, 2, 20, episodes=2)
env.reset("default")
print(" ".join(str(w.proc.pid) for w in env._workers), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", runner], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as ended: its parent, the killed runner, is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_constructor_checks():
    with pytest.raises(ValueError, match="unknown LIBERO environment"):
        LiberoEnv("libero_spatial-12", 7, 2, 20)
    with pytest.raises(ValueError, match="use at most 990"):
        LiberoEnv("libero_spatial-1", 7, 2, 991)


def test_more_episodes_than_initial_states(standin):
    with pytest.raises(ValueError, match="libero_10-3 has 6 initial states, fewer than 7 episodes"):
        standin("libero_10-3", 7, 2, 20, episodes=7)


@pytest.mark.skipif(importlib.util.find_spec("libero") is not None, reason="LIBERO is installed in this interpreter")
def test_check_runtime_without_libero(tmp_path, monkeypatch):
    """This interpreter as LIBERO_PYTHON: no config, then no LIBERO; a missing interpreter. One line each."""
    monkeypatch.setenv("LIBERO_PYTHON", sys.executable)
    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(tmp_path))
    with pytest.raises(RuntimeError) as err:
        LiberoEnv.check_runtime()
    assert str(err.value).startswith(f"LIBERO's config {tmp_path / 'config.yaml'} does not exist")
    (tmp_path / "config.yaml").write_text("{}\n")
    with pytest.raises(RuntimeError) as err:
        LiberoEnv.check_runtime()
    assert str(err.value).startswith(f"LIBERO does not import in {sys.executable} (ModuleNotFoundError: ")
    monkeypatch.setenv("LIBERO_PYTHON", str(tmp_path / "no-python"))
    with pytest.raises(RuntimeError) as err:
        LiberoEnv.check_runtime()
    assert str(err.value).startswith(f"cannot start the LIBERO interpreter {tmp_path / 'no-python'}")
    assert all("\n" not in str(e) for e in [err.value])


# ------------------------------------------------------------------------------------------------------ the real LIBERO

# OFT's episodes in OFT's way, in the LIBERO interpreter: one environment, episode 0 (its wait steps, then STEPS
# processed actions), episode 1 after it; and episode 1 in a fresh environment.
REPLAY = """
import json, math, os, sys, time, types
from enum import Enum
import numpy as np
from libero.libero import benchmark, get_libero_path
from libero.libero.envs import OffScreenRenderEnv

robot, steps, suite_names, out = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
scope = dict(np=np, math=math, os=os, Enum=Enum, get_libero_path=get_libero_path, OffScreenRenderEnv=OffScreenRenderEnv)
oft_definitions(robot + "/robot_utils.py", ["normalize_gripper_action", "invert_gripper_action"], scope)
oft_definitions(robot + "/libero/libero_utils.py", ["get_libero_env", "get_libero_dummy_action", "get_libero_image",
                "get_libero_wrist_image", "quat2axisangle"], scope)
scope["resize_image_for_policy"] = lambda img, size: img
oft_definitions(robot + "/libero/run_libero_eval.py", ["prepare_observation", "process_action"], scope)
F = types.SimpleNamespace(**scope)

suite = benchmark.get_benchmark_dict()["libero_spatial"]()
task, initial_states = suite.get_task(0), suite.get_task_init_states(0)
record, t0 = {}, time.time()

def start(env, episode, name):
    env.reset()
    obs = env.set_init_state(initial_states[episode])
    for _ in range(10):
        obs, reward, done, info = env.step(F.get_libero_dummy_action("openvla"))
    keep(obs, name)

def keep(obs, name):
    observation, _ = F.prepare_observation(obs, None)
    for key, value in observation.items():
        record[f"{name}/{key}"] = np.ascontiguousarray(value)

env, language = F.get_libero_env(task, "openvla", resolution=256)
start(env, 0, "ep0")
for i, action in enumerate(steps):
    action = F.process_action(np.asarray(action, dtype=np.float64), "openvla")
    obs, reward, done, info = env.step(action.tolist())
    keep(obs, f"ep0/step{i}")
    record[f"ep0/step{i}/reward"], record[f"ep0/step{i}/done"] = np.float64(reward), np.bool_(done)
start(env, 1, "ep1")
env.close()
fresh, _ = F.get_libero_env(task, "openvla", resolution=256)
start(fresh, 1, "fresh_ep1")
fresh.close()
suites = {}
for name in suite_names:
    b = benchmark.get_benchmark_dict()[name]()
    suites[name] = [b.n_tasks, min(len(b.get_task_init_states(t)) for t in range(b.n_tasks))]
np.savez(out, language=language, suites=json.dumps(suites), seconds=time.time() - t0, **record)
"""
STEPS = [
    [0.4, -0.2, 0.1, 0.05, -0.05, 0.02, 0.9],
    [0.3, 0.5, -0.2, 0.0, 0.1, -0.1, 0.1],
    [-0.1, 0.2, 0.6, -0.1, 0.0, 0.05, 0.5],
]


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    """OFT's functions on the real simulator (REPLAY), and LiberoEnv on the same episodes: 2 in 2 parallel copies,
    then the same STEPS on both rows."""
    import time

    if not (ROBOT / "libero" / "libero_utils.py").is_file():
        pytest.skip(f"no OpenVLA-OFT checkout at {OFT} (set OPENVLA_OFT_SRC)")
    out = tmp_path_factory.mktemp("libero") / "oft.npz"
    script = textwrap.dedent(inspect.getsource(oft_definitions)) + "import ast\nfrom pathlib import Path\n" + REPLAY
    proc = subprocess.run(
        [LIBERO_PYTHON, "-c", script, str(ROBOT), json.dumps(STEPS), json.dumps(list(SUITES)), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    oft_record = dict(np.load(out))
    t0 = time.time()
    env = LiberoEnv("libero_spatial-0", 7, 2, 220, episodes=2)
    try:
        made = time.time()
        reset = env.reset("default")
        started = time.time()
        steps = [env.step(np.array([action, action])) for action in STEPS]
        stepped = time.time()
    finally:
        env.close()
    timing = {"make": made - t0, "reset": started - made, "step": (stepped - started) / len(STEPS)}
    return oft_record, reset, steps, timing


@needs_libero
def test_reset_is_ofts_episode_start_bitwise(replay):
    """Both episodes' first observations (after set_init_state and 10 wait steps) equal OFT's sequential ones byte
    for byte, though episode 1 ran in a copy of its own; the instruction is the task's language."""
    oft_record, (obs, instructions, info), _, timing = replay
    assert info["episodes"] == [0, 1] and instructions == [str(oft_record["language"])] * 2
    for row in (0, 1):
        for key in ("full_image", "wrist_image", "state"):
            theirs = oft_record[f"ep{row}/{key}"]
            assert obs[key][row].dtype == theirs.dtype and obs[key][row].tobytes() == theirs.tobytes(), (row, key)
    print(f"LiberoEnv timings (2 copies): {timing}; OFT replay {float(oft_record['seconds']):.1f} s")


@needs_libero
def test_the_reset_history_changes_the_first_observation(replay):
    """Why the copies chain the reset generator: OFT's episode 1 (after episode 0 in the same environment) and
    episode 1 in a fresh environment start from the same robot state but render differently — the fixtures'
    placements come from numpy's generator, which episode 0's reset advanced."""
    oft_record = replay[0]
    np.testing.assert_array_equal(oft_record["ep1/state"], oft_record["fresh_ep1/state"])
    for key, least in (("full_image", 0.05), ("wrist_image", 0.05)):
        differ = (oft_record["ep1/" + key] != oft_record["fresh_ep1/" + key]).any(axis=-1).mean()
        print(f"{key}: {differ:.1%} of the pixels differ between episode 1 after episode 0 and in a fresh env")
        assert differ > least  # measured: 12.9% (agent view), 16.3% (wrist) on the CPU build


@needs_libero
def test_steps_are_ofts_bitwise(replay):
    """Three processed actions through LiberoEnv.step equal OFT's process_action + env.step(action.tolist()), byte
    for byte: observations, reward, done."""
    oft_record, _, steps, _ = replay
    for i, (obs, reward, done, info) in enumerate(steps):
        for key in ("full_image", "wrist_image", "state"):
            assert obs[key][0].tobytes() == oft_record[f"ep0/step{i}/{key}"].tobytes(), (i, key)
        assert reward[0] == oft_record[f"ep0/step{i}/reward"] and done[0] == oft_record[f"ep0/step{i}/done"]
        assert info["success"].tolist() == done.tolist()


@needs_libero
def test_suites_match_the_installed_benchmark(replay):
    suites = json.loads(str(replay[0]["suites"]))
    for name, (tasks, _) in SUITES.items():
        assert suites[name][0] == tasks and suites[name][1] >= 50, name


def _one_line(exc) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text, text
    return text


@needs_libero
def test_check_runtime_on_the_real_libero(tmp_path, monkeypatch):
    """The CPU build passes; a renderer that cannot start (glx without a display), a missing config and missing
    assets (a LIBERO package without its assets directory, and no downloaded copy) each give one line."""
    LiberoEnv.check_runtime()

    with monkeypatch.context() as m:
        m.setenv("MUJOCO_GL", "glx")
        m.delenv("DISPLAY", raising=False)
        with pytest.raises(RuntimeError) as err:
            LiberoEnv.check_runtime()
        assert _one_line(err.value).startswith("MuJoCo cannot render offscreen with MUJOCO_GL=glx (")
        assert "MUJOCO_GL=egl" in str(err.value) and "osmesa" in str(err.value) and "glfw" in str(err.value)

    with monkeypatch.context() as m:
        m.setenv("LIBERO_CONFIG_PATH", str(tmp_path / "nowhere"))
        with pytest.raises(RuntimeError) as err:
            LiberoEnv.check_runtime()
        assert _one_line(err.value).startswith(f"LIBERO's config {tmp_path / 'nowhere' / 'config.yaml'} does not")

    # a copy of the installed package made of links to its files, without libero/libero/assets, first on the path
    found = subprocess.run(
        [LIBERO_PYTHON, "-c", "import importlib.util as u; print(u.find_spec('libero').submodule_search_locations[0])"],
        capture_output=True,
        text=True,
        check=True,
    )
    package = Path(found.stdout.strip())
    shadow = tmp_path / "site" / "libero"
    shadow.mkdir(parents=True)
    for entry in package.iterdir():
        if entry.name != "libero":
            (shadow / entry.name).symlink_to(entry)
    (shadow / "libero").mkdir()
    for entry in (package / "libero").iterdir():
        if entry.name != "assets":
            (shadow / "libero" / entry.name).symlink_to(entry)
    with monkeypatch.context() as m:
        m.setenv("PYTHONPATH", str(tmp_path / "site"))
        m.setenv("HOME", str(tmp_path / "home"))  # no copy in ~/.cache/libero/assets either
        with pytest.raises(RuntimeError) as err:
            LiberoEnv.check_runtime()
        where = tmp_path / "home" / ".cache" / "libero" / "assets"
        missing = "LIBERO's assets (meshes, textures) are missing:"
        assert _one_line(err.value).startswith(f"{missing} {where} does not exist")
        assert "git clone --depth 1 https://github.com/Lifelong-Robot-Learning/LIBERO" in str(err.value)
        (shadow / "libero" / "assets").mkdir()
        with pytest.raises(RuntimeError) as err:
            LiberoEnv.check_runtime()
        where = shadow / "libero" / "assets"
        assert _one_line(err.value).startswith(f"{missing} {where} is empty")


@needs_libero
def test_the_runner_drives_libero_in_blocks():
    """``eval.run.rollout`` over LiberoEnv: 3 episodes 2 at a time (two blocks, the resets chained across them),
    action chunks run open-loop, each record numbered by its initial state, seeded 0 as OFT's environments."""
    from openvla_align.eval.run import EvalRecipe, rollout

    recipe = EvalRecipe(suite="smoke", envs=["libero_object-1"], seeds=[7], num_envs=2, obj_set="default")
    calls = []

    def policy(obs, instructions):
        calls.append((sorted(obs), obs["full_image"].shape, obs["state"].shape, len(instructions)))
        return np.tile(np.array(STEPS[:2]), (len(instructions), 1, 1))  # a chunk of 2 actions per row

    env = LiberoEnv("libero_object-1", 7, 2, 280, episodes=3)
    try:
        records, frames = rollout(env, policy, recipe, episode_len=3, video=3)
    finally:
        env.close()
    assert [r["episode"] for r in records] == [0, 1, 2] and [r["env_seed"] for r in records] == [0, 0, 0]
    assert all(r["first_success_step"] is None and r["instruction"] == env.instruction for r in records)
    keys = ["full_image", "state", "wrist_image"]
    assert calls == [(keys, (2, 256, 256, 3), (2, 8), 2)] * 2 + [(keys, (1, 256, 256, 3), (1, 8), 1)] * 2
    assert [len(f) for f in frames] == [4, 4, 4] and frames[0][0].shape == (256, 256, 3)


def test_workers_do_not_inherit_an_empty_cuda_visible_devices():
    """robosuite 1.4's EGL context reads CUDA_VISIBLE_DEVICES as a device list: empty (GPUs hidden, as a CPU run hides
    them) it fails on int(''); the workers get the variable only when it names devices."""
    from openvla_align.eval.libero import worker_environment

    assert "CUDA_VISIBLE_DEVICES" not in worker_environment({"CUDA_VISIBLE_DEVICES": "", "MUJOCO_GL": "egl"})
    assert worker_environment({"CUDA_VISIBLE_DEVICES": "1"})["CUDA_VISIBLE_DEVICES"] == "1"


@needs_oft
@pytest.mark.parametrize("name", ["libero-spatial", "libero-object", "libero-goal", "libero-10", "libero"])
def test_oft_recipes_are_ofts_generate_config(oft, name):
    """Each OFT recipe's `policy:` is OFT's GenerateConfig defaults (read from OFT's file), its seed OFT's, its tasks
    the suite's (all four for libero.yaml), its step limit the simulator's per suite; the settings parse."""
    from openvla_align.eval.policies import PolicySettings
    from openvla_align.eval.run import EvalRecipe

    recipe = EvalRecipe.load(REPO / "recipes" / "eval" / f"{name}.yaml")
    defaults = oft["GenerateConfig"]()
    assert recipe.policy == {k: getattr(defaults, k) for k in recipe.policy}
    assert PolicySettings.from_dict(recipe.policy) == PolicySettings(**recipe.policy)
    assert recipe.seeds == [defaults.seed] and recipe.obj_set == "default" and recipe.episode_len is None
    suites = [recipe.suite] if name != "libero" else ["libero_spatial", "libero_object", "libero_goal", "libero_10"]
    assert LiberoEnv.expand_env_ids(recipe.envs) == [f"{s}-{t}" for s in suites for t in range(10)]
    assert recipe.unnorm_key == "auto" and recipe.simulator == "libero"
    LiberoEnv.check_recipe(recipe)


def test_openvla_recipe_is_openvlas_settings():
    from openvla_align.eval.policies import PolicySettings
    from openvla_align.eval.run import EvalRecipe

    recipe = EvalRecipe.load(REPO / "recipes" / "eval" / "libero-openvla.yaml")
    assert PolicySettings.from_dict(recipe.policy) == PolicySettings.for_openvla()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(obj_set="test"), "set obj_set: default"),
        (dict(episodes=51), "a LIBERO task has 50 initial states"),
        (dict(episode_len=991), "use at most 990"),
    ],
)
def test_recipes_libero_cannot_run_stop_before_anything_loads(change, message):
    from dataclasses import replace

    from openvla_align.eval.run import EvalRecipe

    recipe = replace(EvalRecipe.load(REPO / "recipes" / "eval" / "libero-spatial.yaml"), **change)
    with pytest.raises(ValueError, match=message):
        LiberoEnv.check_recipe(recipe)


# ------------------------------------------------------------------------------------------------ eval run's bad input
@pytest.fixture
def libero_run(tmp_path, vla, tokenizer, monkeypatch):
    """A LIBERO recipe and a tiny checkpoint with statistics under libero_spatial_no_noops; loading the VLA or
    starting LIBERO fails the test: each bad input must stop before either."""
    from openvla_align.tiny import save_tiny_checkpoint

    stats = {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7}, "proprio": {"q01": [-1.0] * 8, "q99": [1.0] * 8}}
    vla.config.norm_stats = {"libero_spatial_no_noops": stats}
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", vla, tokenizer) or tmp_path / "ckpt"

    def refuse(*a, **k):
        raise AssertionError("loaded the VLA or started LIBERO")

    monkeypatch.setattr("openvla_align.vla.checkpoint.load_vla", refuse)
    monkeypatch.setattr(LiberoEnv, "check_runtime", classmethod(refuse))
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "libero-spatial.yaml"
    recipe.write_text((REPO / "recipes" / "eval" / "libero-spatial.yaml").read_text())
    return recipe, Path(ckpt)


def _components(ckpt: Path, *names: str) -> None:
    for name in names:
        (ckpt / f"{name}--100_checkpoint.pt").write_bytes(b"")  # found by name; never read before the check fails


def _sidecar(ckpt: Path, num_images: int) -> None:
    import torch
    from safetensors.torch import save_file

    (ckpt / "align").mkdir()
    meta = {"openvla-align": json.dumps({"num_images": num_images})}
    save_file({"w": torch.zeros(1)}, str(ckpt / "align" / "projector.safetensors"), metadata=meta)


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown task", r"unknown LIBERO environment id\(s\) \['libero_spatial-12'\]"),
        ("unknown suite", r"unknown LIBERO environment id\(s\) \['libero_space'\]"),
        ("no action head", r"has no \*action_head\*checkpoint\* file, which use_l1_regression=true needs"),
        ("no proprio projector", r"has no \*proprio_projector\*checkpoint\* file, which use_proprio=true needs"),
        ("cameras", r"trained with 1 camera\(s\) per sample \(align/projector.safetensors\), not num_images_in"),
        ("unnorm key", r"libero_goal-0: .*libero_goal.*libero_spatial_no_noops"),
        ("explicit unnorm key", r"unnorm_key 'bridge' is not in .* \(has: \['libero_spatial_no_noops'\]\)"),
    ],
)
def test_bad_input_stops_eval_run_before_the_first_episode_and_writes_nothing(libero_run, capsys, case, message):
    from conftest import cli_fails

    recipe, ckpt = libero_run
    extra = []
    if case == "unknown task":
        recipe.write_text(recipe.read_text().replace("envs: [libero_spatial]", "envs: [libero_spatial-12]"))
    if case == "unknown suite":
        recipe.write_text(recipe.read_text().replace("envs: [libero_spatial]", "envs: [libero_space]"))
    if case in ("no proprio projector", "cameras", "unnorm key", "explicit unnorm key"):
        _components(ckpt, "action_head")
    if case in ("cameras", "unnorm key", "explicit unnorm key"):
        _components(ckpt, "proprio_projector")
    if case == "cameras":
        _sidecar(ckpt, 1)
    if case == "unnorm key":
        recipe.write_text(recipe.read_text().replace("envs: [libero_spatial]", "envs: [libero_goal-0]"))
    if case == "explicit unnorm key":
        extra = ["--unnorm-key", "bridge"]
    before = sorted(p.relative_to(recipe.parent) for p in recipe.parent.rglob("*"))
    cli_fails(capsys, ["eval", "run", str(recipe), "--vla-path", str(ckpt), "--device", "cpu", *extra], message)
    assert sorted(p.relative_to(recipe.parent) for p in recipe.parent.rglob("*")) == before  # nothing written


@needs_libero
@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="OFT's image preparation needs tensorflow")
def test_an_openvla_checkpoint_runs_libero_through_eval_run(tmp_path, vla, tokenizer, monkeypatch, capsys):
    """OpenVLA's own LIBERO checkpoints (recipes/eval/libero-openvla.yaml): a tiny OpenVLA with libero_goal
    statistics, one task, one episode, 12 steps, one action per query from the KV-cached decoder, in the real
    simulator; the record and the identity say what ran."""
    from openvla_align.cli import main
    from openvla_align.tiny import save_tiny_checkpoint

    stats = {"action": {"q01": [-0.5] * 6 + [0.0], "q99": [0.5] * 6 + [1.0], "mask": [True] * 6 + [False]}}
    vla.config.norm_stats = {"libero_goal": stats}
    save_tiny_checkpoint(tmp_path / "ckpt", vla, tokenizer)
    recipe = tmp_path / "libero-openvla.yaml"
    text = (REPO / "recipes" / "eval" / "libero-openvla.yaml").read_text()
    four = "envs: [libero_spatial, libero_object, libero_goal, libero_10]"
    recipe.write_text(text.replace(four, "envs: [libero_goal-2]") + "episode_len: 12\n")
    monkeypatch.chdir(tmp_path)
    args = ["eval", "run", str(recipe), "--vla-path", str(tmp_path / "ckpt"), "--device", "cpu", "--dtype", "float32",
            "--episodes", "1", "--num-envs", "1", "--out", "out"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "out" / "libero_goal-2" / "default" / "7" / "result.json").read_text())
    (episode,) = result["episodes"]
    assert episode["episode"] == 0 and episode["steps"] == 12 and episode["env_seed"] == 0
    assert result["identity"]["policy"]["num_open_loop_steps"] == 1 and result["episode_len"] == 12
