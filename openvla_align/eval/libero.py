"""LIBERO as ``eval run``'s simulator (``simulator: libero``), run as OpenVLA-OFT's ``run_libero_eval.py`` runs it.

An environment id is ``<suite>-<task>`` (``libero_spatial-3``); a recipe may name a whole suite. Per task, OFT builds
one ``OffScreenRenderEnv`` (256-px cameras, ``env.seed(0)``) and runs its 50 episodes in it one after the other, each
from the benchmark's initial state of that number: ``env.reset()``, ``set_init_state``, 10 steps of the dummy action
``[0, 0, 0, 0, 0, 0, -1]``, then at most the suite's step limit of policy steps, leaving the episode at the first
``done`` (LIBERO's ``done`` is the task's success). :class:`LiberoEnv` runs the same episodes ``num_envs`` at a time,
one worker process per parallel copy (``libero_worker.py``, launched by file path with ``$LIBERO_PYTHON`` so that
LIBERO can live in a venv of its own).

What is exact, and why:

- observations: ``full_image``/``wrist_image`` are the agent-view and wrist renders turned 180° (OFT's
  ``get_libero_image``/``get_libero_wrist_image``), ``state`` is end-effector position, axis-angle of its quaternion
  (:func:`quat2axisangle`: OFT's formula, operation for operation) and gripper joint positions (OFT's
  ``prepare_observation``); OFT's resizing for the policy is the policy's business (``eval.policies``);
- actions: :func:`process_action` is OFT's ``process_action`` for ``model_family="openvla"`` (gripper [0, 1] ->
  sign(2x - 1), then negated); the environment gets each row as a list of Python floats, as OFT's ``action.tolist()``;
- the reset history: ``env.reset()`` draws the fixtures' placements (bodies without joints, which ``set_init_state``
  does not restore) from numpy's global generator, which ``env.seed(0)`` seeded and every earlier reset advanced.
  So OFT's episode k starts from the generator state its k earlier resets left, and episode k in a fresh environment
  looks different (libero_spatial task 0, episode 1, CPU build: the same robot state, two fixtures moved by up to
  1.5 cm, 13% of the agent-view and 16% of the wrist pixels changed). The copies here chain that state: copy i
  resets from the state copy i-1's reset left (the first from ``seed(0)``'s), so every episode starts exactly as in
  OFT's one environment (bitwise on the CPU build). Steps draw nothing from the generator (checked), and the policy
  is assumed to draw nothing from numpy's global generator either (OFT's heads use torch's). The resets thus run one
  after another (a few seconds each); the wait steps and the episodes run in parallel.

The recipe's seed seeds the runner's generators (as OFT's ``set_seed_everywhere``, seed 7 in OFT), not the
simulator: OFT seeds every environment with 0 and its initial states are fixed, so ``seeds`` is 0 for every episode.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import libero_worker
from .libero_worker import read_frame, write_frame

# OFT's TaskSuite / TASK_MAX_STEPS: (tasks, step limit)
SUITES: Dict[str, Tuple[int, int]] = {
    "libero_spatial": (10, 220),
    "libero_object": (10, 280),
    "libero_goal": (10, 300),
    "libero_10": (10, 520),
    "libero_90": (90, 400),
}
EPISODES = 50  # OFT's num_trials_per_task: the benchmark's initial states 0..49
WAIT_STEPS = 10  # OFT's num_steps_wait
WAIT_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # OFT's get_libero_dummy_action
RESOLUTION = 256  # OFT's env_img_res
ENV_SEED = 0  # OFT's get_libero_env: env.seed(0)
HORIZON = 1000  # LIBERO's ControlEnv default: robosuite refuses to step past it
OBS_KEYS = ("agentview_image", "robot0_eye_in_hand_image", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
WORKER = Path(libero_worker.__file__)
SETUP_DOC = "docs/libero.md"
ASSETS_COMMAND = (
    "git clone --depth 1 https://github.com/Lifelong-Robot-Learning/LIBERO /tmp/LIBERO && cp -r "
    "/tmp/LIBERO/libero/libero/assets {where}"
)
GL_CHOICES = (
    "MUJOCO_GL=egl (a GPU driver's EGL, or Mesa's software EGL without a GPU: apt libegl1 libegl-mesa0 "
    "libgl1-mesa-dri; PYOPENGL_PLATFORM=egl), osmesa (apt libosmesa6; PYOPENGL_PLATFORM=osmesa) or glfw (robosuite "
    "1.4 renders it through EGL too; glx needs an X display)"
)


# --------------------------------------------------------------------------------------------------- OFT's pieces


def quat2axisangle(quat) -> np.ndarray:
    """OFT's ``quat2axisangle`` (robosuite's): (x, y, z, w) -> axis * angle, with w clipped to [-1, 1] and zeros for
    a rotation whose sine is 0 — the same operations in the same order, without clipping the caller's array."""
    quat = np.array(quat, dtype=np.float64)
    quat[3] = min(max(quat[3], -1.0), 1.0)
    den = np.sqrt(1.0 - quat[3] * quat[3])
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return (quat[:3] * 2.0 * math.acos(quat[3])) / den


def process_action(actions) -> np.ndarray:
    """OFT's ``process_action(action, "openvla")`` on each row: ``normalize_gripper_action(binarize=True)`` (the
    gripper [0, 1] -> ``sign(2x - 1)``; exactly 0.5 gives 0) then ``invert_gripper_action`` (negated: -1 opens)."""
    out = np.array(actions, dtype=np.float64)
    out[..., -1] = np.sign(2 * (out[..., -1] - 0.0) / (1.0 - 0.0) - 1)
    out[..., -1] *= -1.0
    return out


def observation(raw: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """One row of OFT's ``prepare_observation`` before its resizing: the two renders turned 180° and the 8-d state."""
    state = np.concatenate((raw["robot0_eef_pos"], quat2axisangle(raw["robot0_eef_quat"]), raw["robot0_gripper_qpos"]))
    return {
        "full_image": np.ascontiguousarray(raw["agentview_image"][::-1, ::-1]),
        "wrist_image": np.ascontiguousarray(raw["robot0_eye_in_hand_image"][::-1, ::-1]),
        "state": state,
    }


def parse_env_id(env_id: str) -> Tuple[str, int]:
    """``"libero_spatial-3"`` -> ``("libero_spatial", 3)``; ValueError for anything that is not a suite's task."""
    suite, sep, task = str(env_id).rpartition("-")
    if not sep or suite not in SUITES or not task.isdigit() or task != str(int(task)) or int(task) >= SUITES[suite][0]:
        raise ValueError(env_id)
    return suite, int(task)


def libero_python() -> str:
    """The interpreter LIBERO is installed in: ``$LIBERO_PYTHON``, else this one."""
    return os.environ.get("LIBERO_PYTHON") or sys.executable


# --------------------------------------------------------------------------------------------------- workers


class WorkerError(RuntimeError):
    """A worker failed: its traceback, or how it died and the end of its stderr."""


def _unpack(packed) -> np.ndarray:
    dtype, shape, data = packed
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)


def worker_environment(base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The workers' environment: this process's, without an empty ``CUDA_VISIBLE_DEVICES`` (the usual way to hide
    GPUs from a CPU run), which robosuite 1.4's EGL context reads as a device list and fails on
    (``int('')``: "invalid literal for int()"); without it, EGL renders on its first device (Mesa's software one on a
    machine without a GPU)."""
    env = dict(os.environ if base is None else base)
    if env.get("CUDA_VISIBLE_DEVICES") == "":
        del env["CUDA_VISIBLE_DEVICES"]
    return env


class _Worker:
    """One worker process: requests on its stdin, replies on its stdout, its stderr in a temporary file (shown when
    it fails). Started in a session of its own, so a Ctrl-C reaches the runner, which stops it."""

    def __init__(self, python: str, script: Path, index: int):
        self.index = index
        self.python = python
        self.stderr = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(
                [python, str(script)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.stderr,
                start_new_session=True,
                env=worker_environment(),
            )
        except OSError as exc:
            self.stderr.close()
            raise WorkerError(f"cannot start the LIBERO interpreter {python} (LIBERO_PYTHON): {exc}") from exc

    def send(self, command: str, **args) -> None:
        try:
            write_frame(self.proc.stdin, (command, args))
        except (BrokenPipeError, ValueError, OSError):
            raise self._died() from None

    def receive(self):
        try:
            status, value = read_frame(self.proc.stdout)
        except EOFError:
            raise self._died() from None
        if status != "ok":
            raise WorkerError(f"LIBERO worker {self.index} failed:\n{value}")
        return value

    def call(self, command: str, **args):
        self.send(command, **args)
        return self.receive()

    def _died(self) -> WorkerError:
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = "still running, its pipe closed"
        return WorkerError(
            f"LIBERO worker {self.index} ({self.python}) exited ({code}); its stderr ends:\n{self.tail()}"
        )

    def tail(self, lines: int = 20) -> str:
        self.stderr.seek(0)
        text = self.stderr.read().decode(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:]) or "(nothing)"

    def request_stop(self) -> None:
        """Ask it to close its environment and exit, and close our ends of its pipes: a worker blocked writing a
        reply nobody reads gets a broken pipe instead of waiting forever."""
        if self.proc.poll() is None:
            try:
                self.send("close")
            except WorkerError:
                pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def wait_or_kill(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def _stop_all(workers: List[_Worker], timeout: float = 10.0) -> None:
    """Stop every worker: all are asked at once, then each has what is left of ``timeout`` to exit before it is
    killed."""
    for worker in workers:
        worker.request_stop()
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.wait_or_kill(max(0.0, deadline - time.monotonic()))
    workers.clear()


# --------------------------------------------------------------------------------------------------- environment


class LiberoEnv:
    """One LIBERO task's evaluation episodes, ``num_envs`` at a time in parallel worker processes.

    ``reset("default") -> (obs, [instruction] * b, {"episodes": [initial state per row]})`` starts the next block of
    up to ``num_envs`` episodes; ``step(actions (b, 7)) -> (obs, reward (b,), done (b,), {"success": done})`` steps
    every row that has not succeeded yet (a finished row keeps its last observation). ``obs`` holds ``full_image``
    and ``wrist_image`` ((b, 256, 256, 3) uint8) and ``state`` ((b, 8) float64). ``episodes`` caps the episodes per
    task (default OFT's 50, for smoke runs fewer)."""

    stops_at_success = True
    worker_script = WORKER  # the worker's file (tests substitute a stand-in speaking the same protocol)

    def __init__(
        self,
        env_id: str,
        seed: int,
        num_envs: int,
        episode_len: int,
        *,
        sim_backend: str = "gpu",
        render_backend: str = "gpu",
        episodes: Optional[int] = None,
    ):
        self.check_env_ids([env_id])
        self.check_settings(num_envs, sim_backend, render_backend)
        if episode_len + WAIT_STEPS > HORIZON:
            raise ValueError(
                f"episode_len {episode_len}: LIBERO's environments stop at {HORIZON} steps, {WAIT_STEPS} of them "
                f"waiting; use at most {HORIZON - WAIT_STEPS}"
            )
        self.env_id = env_id
        self.suite, self.task = parse_env_id(env_id)
        self.episodes = EPISODES if episodes is None else int(episodes)
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {episodes}")
        self.num_envs = num_envs
        self.seeds = [ENV_SEED] * self.episodes
        self._next = 0
        self._workers: List[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)
        try:
            python = libero_python()
            for i in range(min(num_envs, self.episodes)):
                self._workers.append(_Worker(python, self.worker_script, i))
            for w in self._workers:
                w.send("make", suite=self.suite, task_id=self.task, resolution=RESOLUTION, keys=list(OBS_KEYS))
            made = [w.receive() for w in self._workers]
        except BaseException:
            self.close()
            raise
        self.instruction = made[0]["language"]
        self._rng = made[0]["rng"]  # the generator state after env.seed(0): episode 0's
        if made[0]["initial_states"] < self.episodes:
            self.close()
            raise ValueError(
                f"{env_id} has {made[0]['initial_states']} initial states, fewer than {self.episodes} episodes"
            )
        self._obs: Dict[str, np.ndarray] = {}
        self._done = np.zeros(0, dtype=bool)
        self._reward = np.zeros(0)

    # ------------------------------------------------------------------ cheap checks (no LIBERO needed)

    @staticmethod
    def expand_env_ids(envs: Sequence[str]) -> List[str]:
        """A suite's name stands for all its tasks, ``<suite>-0`` ... ; anything else passes through."""
        out: List[str] = []
        for env in envs:
            out.extend(f"{env}-{t}" for t in range(SUITES[env][0])) if env in SUITES else out.append(env)
        return out

    @staticmethod
    def check_env_ids(env_ids: Sequence[str]) -> None:
        bad = []
        for env_id in env_ids:
            try:
                parse_env_id(env_id)
            except ValueError:
                bad.append(env_id)
        if bad:
            suites = ", ".join(f"{s} (tasks 0-{n - 1})" for s, (n, _) in SUITES.items())
            raise ValueError(
                f"unknown LIBERO environment id(s) {bad}: an id is <suite>-<task> (e.g. libero_spatial-3), or a "
                f"suite's name for all its tasks; suites: {suites}"
            )

    @staticmethod
    def check_settings(num_envs: int, sim_backend: str, render_backend: str) -> None:
        """``num_envs`` is the number of worker processes; the backends are ManiSkill's flags, which LIBERO (MuJoCo on
        the CPU, rendering as ``MUJOCO_GL`` says) has no use for: ignored."""
        if int(num_envs) < 1:
            raise ValueError(f"--num-envs {num_envs}: LIBERO runs at least one worker process")

    @staticmethod
    def episode_len_of(env_id: str) -> int:
        """OFT's ``TASK_MAX_STEPS`` of the environment's suite (policy steps; the wait steps come before)."""
        return SUITES[parse_env_id(env_id)[0]][1]

    @staticmethod
    def unnorm_key_of(env_id: str, norm_stats: Mapping) -> str:
        """OFT's ``check_unnorm_key``: the suite's name, else ``<suite>_no_noops``, among the checkpoint's keys
        (``eval.policies.resolve_unnorm_key``)."""
        from .policies import resolve_unnorm_key

        try:
            return resolve_unnorm_key(norm_stats, parse_env_id(env_id)[0])
        except ValueError as exc:
            raise ValueError(f"{env_id}: {exc}") from None

    @staticmethod
    def check_recipe(recipe) -> None:
        """The recipe's settings LIBERO can run, before anything loads: the benchmark's initial states
        (``obj_set: default``), at most 50 episodes per task, episodes within robosuite's horizon."""
        if recipe.obj_set != "default":
            raise ValueError(
                f"obj_set {recipe.obj_set!r}: LIBERO's episodes start from the benchmark's initial states; set "
                "obj_set: default"
            )
        if recipe.episodes is not None and recipe.episodes > EPISODES:
            raise ValueError(f"episodes {recipe.episodes}: a LIBERO task has {EPISODES} initial states; use fewer")
        if recipe.episode_len is not None and recipe.episode_len + WAIT_STEPS > HORIZON:
            raise ValueError(
                f"episode_len {recipe.episode_len}: LIBERO's environments stop at {HORIZON} steps, {WAIT_STEPS} of "
                f"them waiting; use at most {HORIZON - WAIT_STEPS}"
            )

    @staticmethod
    def check_policy(settings: Mapping, vla_path) -> None:
        """The policy settings and the checkpoint's files they need (action head, proprio projector, ...; the camera
        count its ``align`` sidecar records), read without loading the model (``eval.policies.check_checkpoint``)."""
        from .policies import PolicySettings, check_checkpoint

        check_checkpoint(vla_path, PolicySettings.from_dict(dict(settings)))

    @staticmethod
    def make_policy(loaded, settings: Mapping, unnorm_key: str):
        from .policies import PolicySettings, make_policy

        return make_policy(loaded, PolicySettings.from_dict(dict(settings)), unnorm_key)

    @classmethod
    def check_runtime(cls) -> None:
        """Start the LIBERO interpreter once: LIBERO imports, its assets are there, a MuJoCo offscreen renderer starts
        under the current ``MUJOCO_GL``; else one line that says what to do."""
        python = libero_python()
        worker = _Worker(python, cls.worker_script, 0)
        try:
            report = worker.call("check")
        except WorkerError as exc:
            raise RuntimeError(
                f"the LIBERO interpreter {python} (LIBERO_PYTHON) cannot run the worker: "
                f"{str(exc).strip().splitlines()[-1]}"
            ) from exc
        finally:
            _stop_all([worker])
        problem, detail = report["problem"], report["detail"]
        if problem == "config":
            raise RuntimeError(
                f"LIBERO's config {detail} does not exist (without it `import libero.libero` asks questions on "
                f"stdin): set LIBERO_CONFIG_PATH to a directory with a config.yaml, see {SETUP_DOC}"
            )
        if problem == "import":
            raise RuntimeError(
                f"LIBERO does not import in {python} ({detail}): install it in its own venv and set LIBERO_PYTHON to "
                f"that venv's python, see {SETUP_DOC}"
            )
        if problem == "assets":
            state = "is empty" if report.get("exists") else "does not exist"
            raise RuntimeError(
                f"LIBERO's assets (meshes, textures) are missing: {detail} {state}; get them with: "
                f"{ASSETS_COMMAND.format(where=Path(detail).parent)} (see {SETUP_DOC})"
            )
        if problem == "renderer":
            raise RuntimeError(
                f"MuJoCo cannot render offscreen with MUJOCO_GL={report.get('mujoco_gl') or '(unset)'} ({detail}): "
                f"set {GL_CHOICES}"
            )

    # ------------------------------------------------------------------ episodes

    def reset(self, obj_set: str):
        if obj_set != "default":
            raise ValueError(
                f"obj_set {obj_set!r}: LIBERO's episodes start from the benchmark's initial states; set obj_set: "
                "default (OFT's initial_states_path DEFAULT)"
            )
        if self._next >= self.episodes:
            raise RuntimeError(f"{self.env_id}: all {self.episodes} episodes have been started")
        numbers = list(range(self._next, min(self._next + self.num_envs, self.episodes)))
        workers = self._workers[: len(numbers)]
        wait = dict(wait_steps=WAIT_STEPS, wait_action=list(WAIT_ACTION))
        # the resets one after the other, each from the generator state the previous one left (OFT's sequence)
        for worker, episode in zip(workers, numbers):
            worker.send("reset", episode=episode, rng=self._rng, **wait)
            self._rng = worker.receive()
        rows = [observation({k: _unpack(v) for k, v in w.receive().items()}) for w in workers]
        self._next += len(numbers)
        self._obs = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        self._done = np.zeros(len(numbers), dtype=bool)
        self._reward = np.zeros(len(numbers))
        return self._copy_obs(), [self.instruction] * len(numbers), {"episodes": numbers}

    def step(self, actions):
        actions = np.asarray(actions, dtype=np.float64)
        if actions.shape != (len(self._done), 7):
            raise ValueError(f"expected un-normalised actions of shape ({len(self._done)}, 7), got {actions.shape}")
        rows = np.flatnonzero(~self._done)
        env_actions = process_action(actions[rows])
        for i, action in zip(rows, env_actions):
            self._workers[i].send("step", action=action.tolist())
        for i in rows:
            reply = self._workers[i].receive()
            row = observation({k: _unpack(v) for k, v in reply["obs"].items()})
            for k, v in row.items():
                self._obs[k][i] = v
            self._reward[i] = reply["reward"]
            self._done[i] = reply["done"]
        return self._copy_obs(), self._reward.copy(), self._done.copy(), {"success": self._done.copy()}

    def _copy_obs(self) -> Dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._obs.items()}

    def close(self) -> None:
        """Stop the workers (each gets ``close``; those still running 10 s later are killed)."""
        _stop_all(self._workers)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
