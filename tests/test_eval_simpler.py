"""The environment layer: the reference's action transform and seeds, worked out by hand from its code, and (opt-in)
`eval run` against the real ManiSkill/SimplerEnv forks.

The opt-in test needs the CPU build of the forks (`../shared/simpler/setup-cpu-simpler.sh OUT PROJECT`): source
`OUT/env.sh` and set `SIMPLER_PYTHON=OUT/venv/bin/python`.
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from openvla_align.eval.envs import short_name
from openvla_align.eval.simpler import ENV_SETTINGS, check_backends, env_action, env_seeds
from openvla_align.vla.actions import unnormalize_tokens

Q01 = [-0.02, -0.03, -0.04, -0.1, -0.2, -0.3, 0.0]
Q99 = [0.02, 0.03, 0.04, 0.1, 0.2, 0.3, 1.0]
MASK = [True] * 6 + [False]


def test_tokens_to_environment_actions_as_the_reference_wrapper():
    """RL4VLA's SimlerWrapper._process_action for these tokens, by hand: dact = clip(32000 - id - 1, 0, 254), centre
    c(k) = -1 + (2k + 1) / 255, masked dims 0.5 (c + 1)(q99 - q01) + q01, gripper 2 * (c > 0.5) - 1."""
    tokens = np.array(
        [[31999, 31744, 31872, 31900, 31800, 31850, 31745], [32000, 31000, 31872, 31872, 31872, 31872, 31900]]
    )
    # row 0: k = 0, 254, 127, 99, 199, 149, 254
    c = {k: -1 + (2 * k + 1) / 255 for k in (0, 254, 127, 99, 199, 149)}
    row0 = [
        -0.02 + 0.5 * (c[0] + 1) * 0.04,
        -0.03 + 0.5 * (c[254] + 1) * 0.06,
        -0.04 + 0.5 * (c[127] + 1) * 0.08,  # c(127) = 0: the middle
        -0.1 + 0.5 * (c[99] + 1) * 0.2,
        -0.2 + 0.5 * (c[199] + 1) * 0.4,
        -0.3 + 0.5 * (c[149] + 1) * 0.6,
        1.0,  # c(254) = 0.996 > 0.5: open
    ]
    # row 1: 32000 - 32000 - 1 = -1 -> clipped to bin 0; 32000 - 31000 - 1 = 999 -> clipped to bin 254; gripper bin 99
    row1 = [-0.02 + 0.5 * (c[0] + 1) * 0.04, -0.03 + 0.5 * (c[254] + 1) * 0.06, 0.0, 0.0, 0.0, 0.0, -1.0]
    got = env_action(unnormalize_tokens(tokens, 32000, Q01, Q99, MASK))
    np.testing.assert_allclose(got, [row0, row1], rtol=0, atol=1e-12)
    assert c[127] == 0.0 and got[0, 2] == pytest.approx(0.0, abs=1e-15)


def test_gripper_threshold_and_shapes():
    acts = np.zeros((3, 7))
    acts[:, 6] = [0.5, 0.5000001, 0.0]
    assert env_action(acts)[:, 6].tolist() == [-1.0, 1.0, -1.0]  # strictly greater than 0.5 opens
    with pytest.raises(ValueError, match=r"shape \(B, 7\)"):
        env_action(np.zeros((2, 6)))


def test_seeds_and_settings_are_the_references():
    assert env_seeds(3, 4) == [3000, 3001, 3002, 3003]
    assert ENV_SETTINGS == {
        "obs_mode": "rgb+segmentation",
        "control_mode": "arm_pd_ee_target_delta_pose_align2_gripper_pd_joint_pos",
        "sim_config": {"sim_freq": 500, "control_freq": 5},
        "sensor_configs": {"shader_pack": "default"},
    }
    check_backends("gpu", "gpu", 128)
    check_backends("cpu", "cpu", 1)
    with pytest.raises(ValueError, match="pass --num-envs 1"):
        check_backends("cpu", "gpu", 2)
    with pytest.raises(ValueError, match="--render-backend 'vulkan'"):
        check_backends("gpu", "vulkan", 1)


class FakeManiSkillEnv:
    """What the forks' `gym.make(...)` returns, as the reference uses it (written from RL4VLA's simpler_wrapper.py and
    ManiSkill's BaseEnv): `reset(seed=[...])` once, then `reset(options={"obj_set": ...})`; observations
    `obs["sensor_data"]["3rd_view_camera"]["rgb"]` uint8 (B, 480, 640, 3) tensors;
    `unwrapped.get_language_instruction()` a list of B strings; `step(action (B, 7))` -> (obs, reward, terminated,
    truncated (B,), info) with `info["success"]` (B,) bool. It succeeds once the world vector's x exceeds 0.01."""

    def __init__(self, made):
        self.made, self.calls, self.unwrapped = made, [], self
        self.num_envs = made["num_envs"]

    def _obs(self):
        import torch

        return {
            "sensor_data": {"3rd_view_camera": {"rgb": torch.full((self.num_envs, 480, 640, 3), 7, dtype=torch.uint8)}}
        }

    def reset(self, seed=None, options=None):
        self.calls.append(("reset", seed, options))
        return self._obs(), {}

    def get_language_instruction(self):
        return [f"put the carrot on the plate {i}" for i in range(self.num_envs)]

    def step(self, action):
        import torch

        assert isinstance(action, torch.Tensor) and action.shape == (self.num_envs, 7)
        assert set(action[:, 6].tolist()) <= {-1.0, 1.0}
        self.calls.append(("step", action.clone()))
        success = action[:, 0] > 0.01
        none = torch.zeros(self.num_envs, dtype=torch.bool)
        return self._obs(), torch.zeros(self.num_envs), none, none, {"success": success}

    def close(self):
        self.calls.append(("close",))


@pytest.fixture
def fake_simulator(monkeypatch):
    import types

    made = []

    def make(env_id, **kwargs):
        made.append(FakeManiSkillEnv({"id": env_id, **kwargs}))
        return made[-1]

    gym = types.SimpleNamespace(make=make, envs=types.SimpleNamespace(registry={"PutOnPlateInScene25Carrot-v1": None}))
    monkeypatch.setattr("openvla_align.eval.simpler.import_simulator", lambda: gym)
    return made


def test_simpler_env_builds_seeds_and_steps_as_the_reference(fake_simulator):
    from openvla_align.eval.simpler import SimplerEnv, check_env_ids

    env = SimplerEnv("PutOnPlateInScene25Carrot-v1", 2, num_envs=3, episode_len=80)
    (fake,) = fake_simulator
    assert fake.made == {
        "id": "PutOnPlateInScene25Carrot-v1",
        "num_envs": 3,
        "sim_backend": "gpu",
        "render_backend": "gpu",
        "max_episode_steps": 80,
        **ENV_SETTINGS,
    }
    images, instructions, _ = env.reset("test")
    assert fake.calls == [("reset", [2000, 2001, 2002], None), ("reset", None, {"obj_set": "test"})]
    assert images.shape == (3, 480, 640, 3) and images.dtype == np.uint8 and len(instructions) == 3
    acts = np.array([[0.02, 0, 0, 0.1, 0, 0, 0.9], [0, 0, 0, 0, 0, 0, 0.1], [0.005, 0, 0, 0, 0, 0, 0.6]])
    _, _, done, info = env.step(acts)
    sent = fake.calls[-1][1].numpy()
    np.testing.assert_allclose(sent[:, :6], acts[:, :6], atol=1e-7)
    assert sent[:, 6].tolist() == [1.0, -1.0, 1.0] and info["success"].tolist() == [True, False, False]
    assert done.shape == (3,)
    with pytest.raises(ValueError, match=r"unknown environment id\(s\) \['Nope-v1'\]; .*PutOnPlateInScene25Carrot-v1"):
        check_env_ids(["Nope-v1"])


def test_rollout_records_episodes_and_writes_videos(fake_simulator, tmp_path):
    from PIL import Image

    from openvla_align.eval.run import EvalRecipe, run_recipe
    from openvla_align.eval.simpler import SimplerEnv

    recipe = EvalRecipe(suite="ood", envs=["PutOnPlateInScene25Carrot-v1"], seeds=[4], num_envs=2, episode_len=3)
    moves = iter([[0.0, 0.02], [0.02, 0.0], [0.0, 0.0]])  # env 1 succeeds at step 1, env 0 at step 2

    def policy(images, instructions):
        x = next(moves)
        acts = np.zeros((len(instructions), 7))
        acts[:, 0] = x
        return acts

    make = lambda env_id, seed: SimplerEnv(env_id, seed, 2, 3)  # noqa: E731
    run_recipe(recipe, policy, make, tmp_path, progress=False, video=1)
    where = tmp_path / "PutOnPlateInScene25Carrot-v1" / "test" / "4"
    result = json.loads((where / "result.json").read_text())
    assert result["episodes"] == [
        {"success": True, "instruction": "put the carrot on the plate 0", "first_success_step": 2, "env_seed": 4000}
        | {"steps": 3},  # Simpler runs every episode to the step limit: "success once"
        {"success": True, "instruction": "put the carrot on the plate 1", "first_success_step": 1, "env_seed": 4001}
        | {"steps": 3},
    ]
    assert fake_simulator[0].calls[-1] == ("close",)
    gif = Image.open(where / "episode_0.gif")
    assert gif.n_frames == 4 and gif.size == (640, 480)  # reset + 3 steps
    assert not (where / "episode_1.gif").exists()


def test_episode_gif_text_is_legible(tmp_path):
    """The instruction in a scalable font sized to the frame, on a dark band, words apart, wrapped when long."""
    from PIL import Image

    from openvla_align.eval.video import write_episode_gif

    def text_rows_and_gaps(path, frame):
        gif = Image.open(path)
        gif.seek(frame)
        im = np.asarray(gif.convert("RGB")).astype(int)
        bright = im.min(axis=2) > 200  # white text (the frame is mid-grey, the band dark)
        rows = np.flatnonzero(bright.any(axis=1))
        first = rows[: np.argmax(np.diff(np.append(rows, rows[-1] + 99)) > 1) + 1]  # the first line's rows
        cols = np.flatnonzero(bright[first].any(axis=0))
        gaps = np.diff(cols) - 1
        return im, first, int((gaps >= 4).sum())

    grey = [np.full((480, 640, 3), 128, np.uint8)] * 2
    instruction = "put carrot on steep upwards sign"
    write_episode_gif(tmp_path / "e.gif", grey, instruction, success_step=1)
    im, first, word_gaps = text_rows_and_gaps(tmp_path / "e.gif", 1)
    assert len(first) >= 12  # glyphs at least 12 px tall on a 480-px frame (PIL's bitmap font: ~8 px)
    assert word_gaps >= len(instruction.split()) - 1  # a visible space between every two words
    assert im[1, 320].mean() < 80 and abs(im[470, 320].mean() - 128) < 3  # the band, then the frame untouched
    yellow = (im[..., 0] > 200) & (im[..., 1] > 180) & (im[..., 2] < 80)
    assert yellow.any()  # "success at step 1" from the success step on

    narrow = [np.full((240, 200, 3), 128, np.uint8)]
    write_episode_gif(tmp_path / "n.gif", narrow, instruction, success_step=None)
    im = np.asarray(Image.open(tmp_path / "n.gif").convert("RGB")).astype(int)
    lines = np.diff(np.flatnonzero((im.min(axis=2) > 200).any(axis=1))) > 1
    assert lines.sum() >= 1  # wrapped: the instruction spans two lines or more on a 200-px frame
    assert not (im.min(axis=2) > 200)[:, -2:].any()  # and nothing runs off the right edge


SIMPLER_PYTHON = os.environ.get("SIMPLER_PYTHON")
needs_simulator = pytest.mark.skipif(
    not SIMPLER_PYTHON,
    reason="SIMPLER_PYTHON is unset: build the CPU simulator with ../shared/simpler/setup-cpu-simpler.sh OUT "
    "PROJECT, source OUT/env.sh and set SIMPLER_PYTHON=OUT/venv/bin/python",
)
# one environment of each OOD axis and one VL-Think environment
REAL_ENVS = [
    "PutOnPlateInScene25Carrot-v1",
    "PutOnPlateInScene25VisionImage-v1",
    "PutOnPlateInScene25Position-v1",
    "PutOnColorInSceneMulti-v1",
]


@needs_simulator
def test_eval_run_in_the_real_simulator(tmp_path, vla, tokenizer):
    """`eval run` on the real forks (CPU physics and software rendering, one env per process) for a few steps per
    environment, with a tiny checkpoint, under torchrun with 2 ranks (2 environments each); a re-run finds every pair
    done; `eval report` reads what it wrote."""
    from openvla_align.tiny import save_tiny_checkpoint

    stats = {"action": {"q01": Q01, "q99": Q99, "mask": MASK}}
    vla.config.norm_stats = {"sft": stats}
    save_tiny_checkpoint(tmp_path / "ckpt", vla, tokenizer)
    recipe = tmp_path / "smoke.yaml"
    envs = "".join(f"  - {e}\n" for e in REAL_ENVS)
    recipe.write_text(f"suite: smoke\nenvs:\n{envs}seeds: [0]\nnum_envs: 1\nepisode_len: 3\nunnorm_key: sft\n")
    out = tmp_path / "eval"
    cmd = [SIMPLER_PYTHON, "-m", "openvla_align.cli", "eval", "run", str(recipe), "--vla-path", str(tmp_path / "ckpt")]
    cmd += ["--out", str(out), "--device", "cpu", "--dtype", "float32", "--sim-backend", "cpu"]
    cmd += ["--render-backend", "cpu", "--video", "1"]
    torchrun = [SIMPLER_PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *cmd[1:]]
    proc = subprocess.run(
        torchrun, capture_output=True, text=True, timeout=1800, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0/2: 2 evaluated" in proc.stdout and "rank 1/2: 2 evaluated" in proc.stdout, proc.stdout
    assert "4 evaluated by 2 ranks, 0 already there, 0 missing" in proc.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "all 4 (env, seed) pairs already evaluated" in again.stdout, again.stderr[-3000:]
    from PIL import Image

    for env_id in REAL_ENVS:
        where = out / env_id / "test" / "0"
        result = json.loads((where / "result.json").read_text())
        (episode,) = result["episodes"]
        assert result["episode_len"] == 3 and episode["env_seed"] == 0 and episode["instruction"]
        assert set(episode) == {"success", "instruction", "first_success_step", "env_seed"}
        made_by = result["identity"]
        assert (made_by["simulator"], made_by["sim_backend"], made_by["num_envs"]) == ("simpler", "cpu", 1)
        gif = Image.open(where / "episode_0.gif")  # --video 1: reset + 3 steps of the real renderer's frames
        assert gif.n_frames == 4 and gif.size == (640, 480)
    report = subprocess.run(
        [SIMPLER_PYTHON, "-m", "openvla_align.cli", "eval", "report", str(out), "--out", str(tmp_path / "tables")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    assert all(short_name(e) in report.stdout for e in REAL_ENVS)

    bad = subprocess.run(
        [
            *cmd[:5],
            str(_write(tmp_path / "bad.yaml", "suite: x\nenvs: [PutOnPlateInScene99-v1]\nnum_envs: 1\n")),
            *cmd[6:],
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 1 and "unknown environment id(s) ['PutOnPlateInScene99-v1']" in bad.stderr
    assert "PutOnPlateInScene25Carrot-v1" in bad.stderr  # the known ones are listed


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
