"""A STAND-IN simulator for `eval run`'s command-line tests (recipe ``simulator: standin_sim:StandInSim``).

It follows the contract of ``openvla_align.eval.simpler.SimplerEnv`` (constructor arguments, ``reset(obj_set)``,
``step(actions)`` with ``info["success"]``, ``close()``, the two cheap checks), which is what `eval run` drives; it
is not ManiSkill. Success: an episode succeeds once its gripper action (dim 6) exceeds 0.5.

For the sharding tests, through the environment (torchrun's ranks are separate processes):
- ``STANDIN_LOG``: a file each constructed environment appends ``{"env", "seed", "rank"}`` to (one JSON line);
- ``STANDIN_CRASH=R:K``: rank R dies (``os._exit(3)``, as a killed process: no clean-up) when it builds its K-th
  environment;
- ``STANDIN_STEP_S``: seconds each step sleeps (to keep ranks busy while another dies).
"""

import json
import os
import time

import numpy as np

from openvla_align.eval.results import ENV_PATTERN

_built = 0


class StandInSim:
    def __init__(self, env_id, seed, num_envs, episode_len, *, sim_backend="gpu", render_backend="gpu"):
        global _built
        _built += 1
        rank = int(os.environ.get("RANK", "0"))
        crash = os.environ.get("STANDIN_CRASH")
        if crash and crash == f"{rank}:{_built}":
            os._exit(3)
        if os.environ.get("STANDIN_LOG"):
            with open(os.environ["STANDIN_LOG"], "a") as f:
                f.write(json.dumps({"env": env_id, "seed": seed, "rank": rank}) + "\n")
        self.rng = np.random.default_rng(seed)
        self.num_envs, self.env_id = num_envs, env_id
        self.pause = float(os.environ.get("STANDIN_STEP_S", "0"))

    @staticmethod
    def check_settings(num_envs, sim_backend, render_backend):
        if num_envs > 8:
            raise ValueError(f"the stand-in simulator runs at most 8 environments, not {num_envs}")

    @staticmethod
    def check_env_ids(env_ids):
        bad = [e for e in env_ids if not ENV_PATTERN.match(e)]
        if bad:
            raise ValueError(f"not environment ids: {bad}")

    def _images(self):
        return self.rng.integers(0, 256, (self.num_envs, 64, 64, 3), dtype=np.uint8)

    def reset(self, obj_set):
        return self._images(), [f"put the carrot on the plate {i}" for i in range(self.num_envs)], {}

    def step(self, actions):
        actions = np.asarray(actions)
        assert actions.shape == (self.num_envs, 7) and np.isfinite(actions).all()
        time.sleep(self.pause)
        return self._images(), None, np.zeros(self.num_envs, bool), {"success": actions[:, 6] > 0.5}

    def close(self):
        pass
