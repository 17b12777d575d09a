"""``eval.policies`` without OpenVLA-OFT's code: settings, statistics and un-normalisation keys, the checkpoint's
component files and sidecar, the proprio formulas, the OpenVLA policy's construction. The comparisons with OFT's own
functions and model (images, proprio, every head, FiLM) are in ``test_oft_libero_policy.py``; its settings' defaults
are checked here against OFT's ``GenerateConfig`` source in the shared upstream folder."""

from __future__ import annotations

import ast
import json
import os
import re
import sys
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pytest
import torch

from openvla_align.eval.policies import (
    OFTPolicy,
    OpenVLALiberoPolicy,
    PolicySettings,
    check_checkpoint,
    find_component,
    load_component,
    make_policy,
    normalize_proprio,
    prepare_image,
    read_norm_stats,
    resolve_unnorm_key,
    sidecar_num_images,
    unnormalize_actions,
)

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = Path(os.environ.get("OPENVLA_UPSTREAM") or REPO.parent / "shared" / "upstream")
LIBERO_EVAL = UPSTREAM / "openvla-oft" / "experiments" / "robot" / "libero" / "run_libero_eval.py"
ACTION = {"q01": [-0.5] * 6 + [0.0], "q99": [0.5] * 6 + [1.0], "mask": [True] * 6 + [False]}


def generate_config_defaults(path: Path) -> dict:
    """``GenerateConfig``'s field defaults, read from OFT's source (importing it needs LIBERO)."""
    tree = ast.parse(path.read_text())
    (cls,) = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "GenerateConfig"]
    defaults = {}
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.Constant):
            defaults[node.target.id] = node.value.value
    return defaults


@pytest.mark.skipif(not LIBERO_EVAL.is_file(), reason=f"OFT's LIBERO evaluation is not at {LIBERO_EVAL}")
def test_settings_are_ofts_generate_config_fields_and_defaults():
    oft = generate_config_defaults(LIBERO_EVAL)
    ours = asdict(PolicySettings())
    assert {k: oft[k] for k in ours} == ours


def test_settings_errors_name_the_setting_and_the_fix():
    known = [f.name for f in fields(PolicySettings)]
    for data, match in [
        ({"use_l1": True}, rf"^policy: unknown policy settings \['use_l1'\]; known: {re.escape(str(known))}$"),
        ({"use_proprio": "yes"}, r"^policy setting use_proprio: expected true or false, got 'yes'$"),
        ({"num_images_in_input": 0}, r"^policy setting num_images_in_input: expected an integer >= 1, got 0$"),
        ({"lora_rank": True}, r"^policy setting lora_rank: expected an integer >= 1, got True$"),
        ({"use_diffusion": True}, r"^policy settings: use_l1_regression and use_diffusion are both true; choose one"),
        ({"use_l1_regression": False, "use_diffusion": True, "num_diffusion_steps_inference": 60},
         r"num_diffusion_steps_inference: 60 DDIM steps, more than the head's 50 training steps; set at most that"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            PolicySettings.from_dict(data)
    assert PolicySettings.from_dict(None) == PolicySettings()
    assert PolicySettings.from_dict({"num_open_loop_steps": 4}).num_open_loop_steps == 4
    openvla = PolicySettings.for_openvla()
    assert (openvla.use_l1_regression, openvla.num_images_in_input, openvla.use_proprio) == (False, 1, False)
    assert (openvla.num_open_loop_steps, openvla.center_crop) == (1, True)


def test_statistics_and_the_suites_unnorm_key(tmp_path):
    """dataset_statistics.json over config.json's norm_stats (OFT's and OpenVLA's loaders); the suite's name, else
    ``<suite>_no_noops`` (OFT's check_unnorm_key)."""
    (tmp_path / "config.json").write_text(json.dumps({"norm_stats": {"libero_goal": {"action": ACTION}}}))
    assert read_norm_stats(tmp_path) == {"libero_goal": {"action": ACTION}}
    assert resolve_unnorm_key(tmp_path, "libero_goal") == "libero_goal"
    (tmp_path / "dataset_statistics.json").write_text(json.dumps({"libero_10_no_noops": {}, "libero_10": {}}))
    assert sorted(read_norm_stats(tmp_path)) == ["libero_10", "libero_10_no_noops"]
    assert resolve_unnorm_key(tmp_path, "libero_10") == "libero_10"
    assert resolve_unnorm_key({"libero_spatial_no_noops": {}}, "libero_spatial") == "libero_spatial_no_noops"
    has = r"\(has: \['libero_10', 'libero_10_no_noops'\]\); evaluate a suite"
    with pytest.raises(
        ValueError, match=rf"^unnorm key: neither 'libero_goal' nor 'libero_goal_no_noops' is in .*{has}"
    ):
        resolve_unnorm_key(tmp_path, "libero_goal")
    (tmp_path / "dataset_statistics.json").write_text("{")
    with pytest.raises(ValueError, match=r"dataset_statistics.json is not valid JSON .*; the checkpoint is damaged"):
        read_norm_stats(tmp_path)
    assert read_norm_stats(tmp_path / "nowhere") == {}


def test_proprio_and_action_formulas():
    stats = {"q01": [-1.0, 0.0, 2.0], "q99": [1.0, 4.0, 3.0], "min": [-2.0, 0.0, 0.0], "max": [2.0, 8.0, 4.0]}
    state = np.array([[0.5, 1.0, 7.0], [-3.0, 4.0, 2.5]])
    want = [
        [2 * 1.5 / (2 + 1e-8) - 1, 2 * 1 / (4 + 1e-8) - 1, 1.0],
        [-1.0, 2 * 4 / (4 + 1e-8) - 1, 2 * 0.5 / (1 + 1e-8) - 1],
    ]
    np.testing.assert_array_equal(normalize_proprio(state, stats), want)
    masked = dict(stats, mask=[True, False, True])
    assert normalize_proprio(state, masked)[:, 1].tolist() == [1.0, 1.0]  # unmasked: kept, then clipped
    np.testing.assert_allclose(normalize_proprio(state, stats, "bounds")[0], [0.25, -0.75, 1.0], atol=1e-8)
    normalized = np.array([-1.0, 0.0, 1.0])
    np.testing.assert_allclose(unnormalize_actions(normalized, masked), [-1.0, 0.0, 3.0], atol=1e-8)
    with pytest.raises(ValueError, match=r"normalisation 'normal': OFT's policies un-normalise 'bounds' or"):
        unnormalize_actions(normalized, stats, "normal")


def test_component_files_and_sidecar(tmp_path):
    from safetensors.torch import save_file

    torch.save(
        {"module.fc1.weight": torch.ones(2, 3), "fc2.bias": torch.zeros(2)}, tmp_path / "action_head--5_checkpoint.pt"
    )
    (tmp_path / "proprio_projector--5_checkpoint.pt").write_bytes(b"")
    (tmp_path / "action_head_notes.txt").write_text("not a checkpoint")
    path = find_component(tmp_path, "action_head", "use_l1_regression")
    assert path.name == "action_head--5_checkpoint.pt"
    assert sorted(load_component(path)) == ["fc1.weight", "fc2.bias"]  # DDP's "module." dropped
    assert check_checkpoint(tmp_path, PolicySettings()) == {
        "action_head": path,
        "proprio_projector": tmp_path / "proprio_projector--5_checkpoint.pt",
    }
    with pytest.raises(FileNotFoundError, match=r"has no \*noisy_action_projector\*checkpoint\* file, which "
                       r"use_diffusion=true needs"):  # fmt: skip
        check_checkpoint(tmp_path, PolicySettings(use_l1_regression=False, use_diffusion=True))
    assert check_checkpoint(tmp_path, PolicySettings(use_l1_regression=False, use_proprio=False)) == {}

    assert sidecar_num_images(tmp_path) is None
    (tmp_path / "align").mkdir()
    meta = {"openvla-align": json.dumps({"format": 1, "num_images": 2})}
    save_file({"w": torch.zeros(1)}, str(tmp_path / "align" / "projector.safetensors"), metadata=meta)
    assert sidecar_num_images(tmp_path) == 2
    with pytest.raises(ValueError, match=r"trained with 2 camera\(s\) per sample .*set num_images_in_input: 2$"):
        check_checkpoint(tmp_path, PolicySettings(num_images_in_input=1))


def test_missing_tensorflow_is_one_line_saying_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # what an environment without it imports
    with pytest.raises(ImportError) as caught:
        prepare_image(np.zeros((1, 8, 8, 3), dtype=np.uint8))
    assert "\n" not in str(caught.value) and "pip install tensorflow" in str(caught.value)


@pytest.fixture
def openvla(tmp_path, vla, tokenizer):
    """A tiny OpenVLA-layout checkpoint (the OpenVLA family) with LIBERO statistics in its config."""
    from openvla_align.tiny import save_tiny_checkpoint
    from openvla_align.vla.checkpoint import load_vla

    vla.config.norm_stats = {"libero_spatial": {"action": ACTION}}
    save_tiny_checkpoint(tmp_path / "ckpt", vla, tokenizer)
    return lambda: load_vla(tmp_path / "ckpt")


def test_openvla_policy_takes_openvlas_settings_and_its_statistics_file(openvla, tmp_path):
    loaded = openvla()
    with pytest.raises(ValueError, match=r"is an OpenVLA model \(one image, action tokens, one action per query\): "
                       r"policy settings use_l1_regression=True, num_images_in_input=2, use_proprio=True, "
                       r"num_open_loop_steps=8 need OpenVLA-OFT; set use_l1_regression: false"):  # fmt: skip
        make_policy(loaded, {}, "libero_spatial")
    with pytest.raises(ValueError, match=r"is a openvla model, not OpenVLA-OFT; use OpenVLALiberoPolicy"):
        OFTPolicy(loaded, PolicySettings.for_openvla(), "libero_spatial")
    policy = make_policy(loaded, asdict(PolicySettings.for_openvla()), "libero_spatial")
    assert isinstance(policy, OpenVLALiberoPolicy) and policy.open_loop_steps == 1
    assert policy.policy.q99.tolist() == ACTION["q99"]
    file_action = dict(ACTION, q99=[0.25] * 6 + [1.0])
    (tmp_path / "ckpt" / "dataset_statistics.json").write_text(json.dumps({"libero_spatial": {"action": file_action}}))
    assert (
        make_policy(openvla(), PolicySettings.for_openvla(), "libero_spatial").policy.q99.tolist() == file_action["q99"]
    )


def test_openvla_policy_returns_one_action_per_query(openvla):
    pytest.importorskip("tensorflow", reason="OFT's image pipeline runs in TensorFlow, not installed here")
    policy = make_policy(openvla(), PolicySettings.for_openvla(), "libero_spatial")
    rng = np.random.default_rng(0)
    obs = {"full_image": rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8), "state": np.zeros((2, 8))}
    actions = policy(obs, ["Put the bowl on the plate", "open the drawer"])
    assert actions.shape == (2, 1, 7) and np.isfinite(actions).all()
    with pytest.raises(ValueError, match=r"observation: no 'full_image'"):
        policy({"image": obs["full_image"]}, ["a", "b"])
