"""The paper's Simpler/ManiSkill3 environments, built as the reference builds them, without its private wrapper.

The reference (BlindVLA's ``openvla_eval_batched.py`` over RL4VLA's ``simpler_env/env/simpler_wrapper.py``) creates
each environment with ``gym.make`` and the settings in :data:`ENV_SETTINGS`, seeds it once at construction with
``seed * 1000 + i`` for its ``num_envs`` parallel copies, then resets it per evaluation with only
``options={"obj_set": ...}``. Observations are ``obs["sensor_data"]["3rd_view_camera"]["rgb"]`` (uint8,
(B, 480, 640, 3)) and the instruction is ``env.unwrapped.get_language_instruction()``.

Its wrapper takes OpenVLA action *token ids* and, after un-normalising them (``clip(32000 - id - 1, 0, 254)``
bin centres, q01/q99 on the masked dimensions), hands the environment
``[world_vector (3), rotation_delta (3) as the axis-angle delta, 2 * (open_gripper > 0.5) - 1]``.
:func:`env_action` is that last transform, applied to the policy's un-normalised actions (the policy does the
clipping and un-normalising exactly as the wrapper does: see ``run.BatchedPolicy.unnormalize``).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

CONTROL_MODE = "arm_pd_ee_target_delta_pose_align2_gripper_pd_joint_pos"
ENV_SETTINGS: Dict[str, object] = {
    "obs_mode": "rgb+segmentation",
    "control_mode": CONTROL_MODE,
    "sim_config": {"sim_freq": 500, "control_freq": 5},
    "sensor_configs": {"shader_pack": "default"},
}
CAMERA = "3rd_view_camera"
EPISODE_LEN = 80  # the reference README's evaluation episodes
BACKENDS = ("gpu", "cpu")
INSTALL_HINT = (
    "The paper's Simpler/ManiSkill environments are not installed. On a GPU machine: `pip install -e ManiSkill -e "
    "SimplerEnv` from the reference implementation (CognitiveAISystems/BlindVLA), with its assets; openvla-align "
    "builds the environments itself, so RL4VLA's simpler_wrapper.py is not needed. For a CPU smoke test "
    "(--sim-backend cpu --render-backend cpu --num-envs 1) see the CPU build of the forks described in the README."
)


def env_seeds(seed: int, num_envs: int) -> List[int]:
    """The reference's per-copy seeds: ``seed * 1000 + i``."""
    return [seed * 1000 + i for i in range(num_envs)]


def env_action(actions: np.ndarray) -> np.ndarray:
    """Un-normalised OpenVLA actions (B, 7) -> the environment's (B, 7): world vector and rotation delta as they
    are, the gripper ``open`` in [0, 1] to ``2 * (open > 0.5) - 1`` (1 = open, -1 = close)."""
    actions = np.asarray(actions, dtype=np.float64)
    if actions.ndim != 2 or actions.shape[1] != 7:
        raise ValueError(f"expected un-normalised actions of shape (B, 7), got {actions.shape}")
    gripper = 2.0 * (actions[:, 6:7] > 0.5) - 1.0
    return np.concatenate([actions[:, :3], actions[:, 3:6], gripper], axis=1)


def check_backends(sim_backend: str, render_backend: str, num_envs: int) -> None:
    """ManiSkill's CPU simulation runs one environment per process; say so before anything is loaded."""
    for name, value in (("--sim-backend", sim_backend), ("--render-backend", render_backend)):
        if value not in BACKENDS:
            raise ValueError(f"{name} {value!r}: choose one of {BACKENDS}.")
    if sim_backend == "cpu" and num_envs != 1:
        raise ValueError(
            f"--sim-backend cpu runs one environment per process (ManiSkill's CPU backend), not --num-envs "
            f"{num_envs}: pass --num-envs 1 for a CPU smoke test, or use the GPU backend."
        )


def import_simulator():
    """Import gymnasium and register ManiSkill's environments (the paper's forks); a clear error when absent."""
    try:
        import gymnasium as gym
        import mani_skill.envs  # noqa: F401  (registers the environments)
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    return gym


def check_env_ids(env_ids: Sequence[str]) -> None:
    """Every id must be registered by the installed forks; the error lists the ones that are. Without the simulator,
    an id that is none of the paper's is reported first (a typo is the user's to fix, and cheaper to find out)."""
    try:
        gym = import_simulator()
    except ImportError as exc:
        import difflib

        from .envs import PAPER_ENVS

        unknown = [e for e in env_ids if e not in PAPER_ENVS]
        if unknown:
            close = [m for e in unknown for m in difflib.get_close_matches(e, PAPER_ENVS, n=1)]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(
                f"unknown environment id(s) {unknown}{hint}: none of the paper's {len(PAPER_ENVS)} "
                f"(`openvla_align.eval.envs`); the simulator is not installed either, so no fork's ids are known"
            ) from exc
        raise
    unknown = [e for e in env_ids if e not in gym.envs.registry]
    if unknown:
        known = sorted(k for k in gym.envs.registry if "InScene" in k)
        raise ValueError(f"unknown environment id(s) {unknown}; the installed forks register: {', '.join(known)}")


class SimplerEnv:
    """One batched environment of the paper, seeded as the reference seeds it.

    ``reset(obj_set) -> (images uint8 (B, H, W, 3), instructions [B], info)``;
    ``step(actions) -> (images, None, truncated (B,), info)`` with ``actions`` the policy's un-normalised (B, 7) and
    ``info["success"]`` (B,) bool.
    """

    def __init__(
        self,
        env_id: str,
        seed: int,
        num_envs: int,
        episode_len: int,
        *,
        sim_backend: str = "gpu",
        render_backend: str = "gpu",
    ):
        check_backends(sim_backend, render_backend, num_envs)
        gym = import_simulator()
        self.env = gym.make(
            env_id,
            num_envs=num_envs,
            sim_backend=sim_backend,
            render_backend=render_backend,
            max_episode_steps=episode_len,
            **ENV_SETTINGS,
        )
        self.num_envs = num_envs
        self.seeds = env_seeds(seed, num_envs)
        self.env.reset(seed=self.seeds)

    @staticmethod
    def check_settings(num_envs: int, sim_backend: str, render_backend: str) -> None:
        check_backends(sim_backend, render_backend, num_envs)

    @staticmethod
    def check_env_ids(env_ids: Sequence[str]) -> None:
        check_env_ids(env_ids)

    @staticmethod
    def episode_len_of(env_id: str) -> int:
        return EPISODE_LEN

    @staticmethod
    def check_recipe(recipe) -> None:
        if recipe.episodes is not None:
            raise ValueError(
                f"episodes {recipe.episodes}: Simpler runs num_envs episodes per (env, seed), one per parallel copy; "
                "set num_envs (--num-envs) instead"
            )

    def reset(self, obj_set: str) -> Tuple[np.ndarray, List[str], dict]:
        obs, info = self.env.reset(options={"obj_set": obj_set})
        return self._images(obs), list(self.env.unwrapped.get_language_instruction()), info

    def step(self, actions: np.ndarray):
        import torch

        # the reference hands float64; ManiSkill's to_tensor casts float64 actions to float32, as here
        action = torch.as_tensor(env_action(actions), dtype=torch.float32)
        obs, _reward, _terminated, truncated, info = self.env.step(action)
        return self._images(obs), None, np.asarray(_to_numpy(truncated)).reshape(-1), info

    @staticmethod
    def _images(obs) -> np.ndarray:
        return _to_numpy(obs["sensor_data"][CAMERA]["rgb"]).astype(np.uint8)

    def close(self) -> None:
        self.env.close()


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
