"""OpenVLA-OFT's real ``vla-scripts/finetune.py``, patched by ``openvla-align patch``, trained with
``--align.enabled true`` on CPU in OFT's modes, and what it writes read back by OFT's own loading code.

Opt-in like the other OFT tests (``scripts/test.sh`` runs them in its OFT phase): ``OPENVLA_OFT_SRC``, OFT's
transformers fork (hash-checked) and OFT's stack with this package pip-installed. Everything is real except the
CUDA-only calls, which ``_cpu_shim`` maps to CPU/gloo: OFT's model class at tiny size, OFT's RLDS pipeline over a
generated LIBERO-schema build (two cameras, proprio), PEFT LoRA, OFT's action heads, FiLM and merge, and a teacher
installed by a third-party entry point (C-RADIOv3's architecture at tiny width, weights from a file).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import oft_assets as A
import pytest
import torch


def _ready():
    if A.oft_unavailable():
        return False, A.oft_unavailable()
    code = "import importlib.metadata as m; print([e.name for e in m.entry_points(group='openvla.finetune_plugins')])"
    if "'align'" not in subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True).stdout:
        return (
            False,
            "openvla-align is not pip-installed here (its `openvla.finetune_plugins` entry points are missing)",
        )
    return True, ""


pytestmark = pytest.mark.skipif(not _ready()[0], reason=_ready()[1])
STEPS = ["--max_steps", "1", "--save_freq", "1"]  # two micro-batches; the checkpoint of step 1
L1_2IMG = ["--use_l1_regression", "true", "--num_images_in_input", "2", "--use_proprio", "true"]
ALIGN = ["--align.enabled", "true", "--align.teacher", "tiny-c-radio", "--align.projector_dim", "32"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A patched copy of OFT, a tiny OFT checkpoint, a tiny LIBERO-schema build and a teacher plugin with weights."""
    from assets import write_teacher_plugin

    from openvla_align.cli import main as cli

    root = tmp_path_factory.mktemp("oft-e2e")
    source = A.oft_src()
    checkout = root / "openvla-oft"
    shutil.copytree(source, checkout, ignore=shutil.ignore_patterns(".git", "*.orig"))
    stock = root / "openvla-oft-stock"
    shutil.copytree(source, stock, ignore=shutil.ignore_patterns(".git", "*.orig"))
    assert cli(["patch", str(checkout)]) == 0
    ckpt = A.build_tiny_oft_checkpoint(root / "tiny-oft", seed=0)
    data = root / "data"
    A.write_tiny_libero_rlds(data, episodes=4, steps=10, seed=0)

    site, teacher = write_teacher_plugin(root)
    env = A.oft_env(root / "home")
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return SimpleNamespace(root=root, checkout=checkout, stock=stock, ckpt=ckpt, data=data, teacher=teacher, env=env)


def run(world, name, *args, script=None, nproc=1, check=True, vla_path=None, kill_at=None):
    """The patched (or ``script``) finetune.py in ``root/name``; returns (process, metrics, run dir root)."""
    runs = world.root / name / "runs"
    argv = ["--vla_path", str(vla_path or world.ckpt), "--data_root_dir", str(world.data)]
    argv += ["--dataset_name", A.LIBERO_DATASET, "--run_root_dir", str(runs), "--batch_size", "2", "--lora_rank", "4"]
    argv += ["--shuffle_buffer_size", "16", "--image_aug", "false", "--wandb_log_freq", "1", *args]
    if "tiny-c-radio" in args:
        argv += ["--align.teacher_path", str(world.teacher)]
    proc, metrics = A.stock_finetune(
        script or world.checkout, world.root / name, argv, env=world.env, nproc=nproc, check=check, kill_at=kill_at
    )
    return proc, metrics, runs


def checkpoint_dir(runs: Path, step: int = 1) -> Path:
    (found,) = [p for p in runs.iterdir() if p.name.endswith(f"--{step}_chkpt")]
    return found


def files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def stock_run(world):
    """The unpatched script: L1 head, 2 images, proprio, saved and merged at step 1."""
    return run(world, "stock", *L1_2IMG, *STEPS, script=world.stock)


def test_stock_script_writes_ofts_checkpoint_layout(world, stock_run):
    """What OFT's script itself writes, as the plugin relies on it (the contract of the stand-in-free runs below)."""
    proc, metrics, runs = stock_run
    assert "Max step 1 reached" in proc.stdout and "NUM_ACTIONS_CHUNK: 8" in proc.stdout
    (run_dir,) = [p for p in runs.iterdir() if not p.name.endswith("_chkpt")]
    assert run_dir.name == f"tiny-oft+{A.LIBERO_DATASET}+b2+lr-0.0005+lora-r4+dropout-0.0"
    ckpt = checkpoint_dir(runs)
    names = {p.name for p in ckpt.iterdir()}
    expected = {"lora_adapter", "action_head--1_checkpoint.pt", "proprio_projector--1_checkpoint.pt"}
    assert expected | {"dataset_statistics.json", "model.safetensors", "config.json"} <= names, sorted(names)
    head = torch.load(ckpt / "action_head--1_checkpoint.pt", weights_only=True)
    assert all(k.startswith("module.") for k in head)  # DDP-wrapped state dicts, as on GPUs
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as merged:
        assert merged.get_tensor("projector.fc1.weight").dtype == torch.bfloat16  # loaded and merged in bf16
    assert {"VLA Train/Curr Action L1 Loss", "VLA Train/Next Actions L1 Loss"} <= set(metrics[0])


def weights_layout(path: Path) -> dict:
    """Tensor names and shapes of a ``.pt`` or ``.safetensors`` file."""
    if path.suffix == ".pt":
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        from safetensors.torch import load_file

        state = load_file(str(path))
    return {k: tuple(v.shape) for k, v in state.items()}


def test_no_plugin_enabled_writes_what_the_stock_script_writes(world, stock_run):
    """Plugins installed but none enabled (and norm_stats' folding off): the files the unpatched script writes, the
    same bytes except the trained weights (OFT's tf.data pipeline shuffles without a seed, so two runs of the stock
    script itself see other batches), whose tensors must have the same names and shapes; the same metric names. The
    patched script's one addition is each checkpoint's completeness marker, `checkpoint.json` (issue 32)."""
    _, stock_metrics, stock_runs = stock_run
    _, metrics, runs = run(world, "patched-off", *L1_2IMG, *STEPS, "--norm_stats.fold", "false")
    ours, stock = files(runs), files(stock_runs)
    marker = f"{checkpoint_dir(runs).name}/checkpoint.json"
    assert json.loads(ours.pop(marker))["step"] == 1
    assert sorted(ours) == sorted(stock) and len(ours) >= 10, sorted(set(ours) ^ set(stock))
    weights = [name for name in ours if name.endswith((".pt", ".safetensors"))]
    assert len(weights) == 4  # LoRA adapter, action head, proprio projector, merged model
    assert {n: b for n, b in ours.items() if n not in weights} == {n: b for n, b in stock.items() if n not in weights}
    for name in weights:
        assert weights_layout(runs / name) == weights_layout(stock_runs / name), name
    assert [sorted(m) for m in metrics] == [sorted(m) for m in stock_metrics]
    assert not any(k.startswith("align/") for m in metrics for k in m)


MODES = {
    "discrete-film-1img": [*STEPS, "--use_l1_regression", "false", "--use_film", "true"],
    "l1-2img-proprio": [*STEPS, *L1_2IMG],
    "diffusion-2img-proprio": [*STEPS, "--use_l1_regression", "false", "--use_diffusion", "true",
                               "--num_diffusion_steps_train", "2", "--diffusion_sample_freq", "2",
                               "--num_images_in_input", "2", "--use_proprio", "true"],
}  # fmt: skip


@pytest.mark.parametrize("mode", list(MODES))
def test_aligned_run_in_every_mode_loads_with_ofts_own_code(world, mode):
    """Each mode trains with alignment (the L1 run on 2 processes under torchrun, gloo) and writes a checkpoint that
    OFT's deploy-time loaders, the stock auto class and our sidecar loader read."""
    from transformers import AutoModelForVision2Seq

    from openvla_align.aligner import Aligner

    nproc = 2 if mode == "l1-2img-proprio" else 1
    proc, metrics, runs = run(world, f"align-{mode}", *MODES[mode], *ALIGN, nproc=nproc)
    logged = [m for m in metrics if "align/loss" in m]
    assert logged and all(0 < abs(m["align/loss"]) <= 0.2 for m in logged), metrics  # -0.2 x cos, cos in [-1, 1]
    assert "[openvla-align] WARNING" not in proc.stdout  # the fork's attention is installed
    ckpt = checkpoint_dir(runs)
    sidecar = Aligner.load(ckpt / "align", target_width=32)
    num_images = 1 if "1img" in mode else 2
    assert sidecar.saved_num_images == num_images and sidecar.config.layers == (16,)

    # OFT's deploy-time loaders read the checkpoint as the script wrote it (FiLM, heads, proprio, statistics)
    A.oft_src()
    from experiments.robot import openvla_utils as U

    cfg = SimpleNamespace(
        pretrained_checkpoint=str(ckpt), load_in_8bit=False, load_in_4bit=False, use_film="film" in mode,
        num_images_in_input=num_images, lora_rank=4, use_l1_regression=mode.startswith("l1"),
        use_diffusion=mode.startswith("diffusion"), num_diffusion_steps_train=2, num_diffusion_steps_inference=2,
    )  # fmt: skip
    vla = U.get_vla(cfg)
    assert A.LIBERO_DATASET in vla.norm_stats and vla.vision_backbone.get_num_images_in_input() == num_images
    if cfg.use_l1_regression or cfg.use_diffusion:
        assert U.get_action_head(cfg, vla.llm_dim) is not None
    if "proprio" in mode:
        assert U.get_proprio_projector(cfg, vla.llm_dim, A.LIBERO_PROPRIO_DIM) is not None
    merged = AutoModelForVision2Seq.from_pretrained(ckpt, trust_remote_code=True, torch_dtype=torch.float32)
    assert A.LIBERO_DATASET in merged.config.norm_stats  # norm_stats folded: stock auto class + unnorm_key work


def test_resume_and_bad_input(world):
    """Resuming OFT's way (``--resume true --resume_step 1``, ``vla_path`` the checkpoint) restores the sidecar's
    projector; a 2-image run's sidecar resumed with one image and a dataset OFT's registries lack (the ``datasets``
    plugin's check, in OFT's own registries) stop before anything is written (a layer beyond the LLM's depth is
    checked the same way, host-independently, in the OpenVLA end-to-end tests)."""
    from openvla_align.aligner import Aligner

    runs = world.root / "align-l1-2img-proprio" / "runs"  # the 2-process L1 run's, when it ran before this test
    if not runs.exists():
        run(world, "align-l1-2img-proprio", *MODES["l1-2img-proprio"], *ALIGN, nproc=2)
    ckpt = checkpoint_dir(runs)
    saved = Aligner.load(ckpt / "align", target_width=32)
    resumed = [*L1_2IMG, *ALIGN, "--resume", "true", "--resume_step", "1", "--max_steps", "2", "--save_freq", "2"]
    _, metrics, runs = run(world, "resumed", *resumed, "--merge_lora_during_training", "false", vla_path=ckpt)
    assert any("align/loss" in m for m in metrics)
    later = Aligner.load(checkpoint_dir(runs, 2) / "align", target_width=32)
    assert later.fingerprint() == saved.fingerprint()  # the frozen projector restored, not re-drawn

    for name, args, match in [
        ("one-image", [*STEPS, *ALIGN, "--resume", "true", "--resume_step", "1", "--use_l1_regression", "true"],
         r"images per sample: saved 2, now 1"),
        ("no-dataset", [*STEPS, *L1_2IMG, "--dataset_name", "libero_nope"], r"neither a registered dataset"),
    ]:  # fmt: skip
        before = files(ckpt)
        proc, _, runs3 = run(world, f"bad-{name}", *args, vla_path=ckpt if "--resume" in args else None, check=False)
        assert proc.returncode != 0 and re.search(match, proc.stderr), proc.stderr[-2000:]
        assert not runs3.exists() and files(ckpt) == before  # nothing written, the checkpoint untouched


def test_patch_recognises_ofts_script_and_reverts_byte_exact(world, tmp_path, capsys):
    from openvla_align.cli import main as cli

    copy = tmp_path / "oft"
    shutil.copytree(world.stock / "vla-scripts", copy / "vla-scripts")
    target = copy / "vla-scripts" / "finetune.py"
    original = target.read_bytes()
    assert cli(["patch", "--check", str(copy)]) == 0
    assert "OpenVLA-OFT's vla-scripts/finetune.py (moojink/openvla-oft@213c5ff8d6e9)" in capsys.readouterr().out
    assert (
        cli(["patch", str(copy)]) == 0
        and target.read_bytes() == (world.checkout / "vla-scripts/finetune.py").read_bytes()
    )
    assert cli(["patch", "--revert", str(copy)]) == 0 and target.read_bytes() == original
    edited = original.replace(b"batch_size: int = 8 ", b"batch_size: int = 4 ")
    assert edited != original
    target.write_bytes(edited)
    capsys.readouterr()
    assert cli(["patch", str(copy)]) == 1
    out, err = capsys.readouterr()
    assert not out and err.startswith("openvla-align patch: unknown:") and len(err.splitlines()) == 1
    assert "moojink/openvla-oft@213c5ff8d6e9" in err and target.read_bytes() == edited


def optimizer_steps(ckpt: Path) -> set:
    from safetensors.torch import load_file

    state = load_file(str(ckpt / "align" / "projector_optimizer.safetensors"))
    return {v.item() for k, v in state.items() if k.endswith("/step")}


def test_a_script_patched_by_the_previous_release_is_updated(world, tmp_path, capsys, monkeypatch):
    """OFT's script as an earlier openvla-align patched it: `patch --check` says so, `patch` updates it from the kept
    original, `--revert` restores the upstream file, and without the original it is refused. The earlier file here
    is today's without its `on_optimizer` lines, its hash listed as an earlier release's (the manifest's real list
    holds the hashes of files no test can rebuild without the old patches; each upgrade was checked by hand)."""
    import dataclasses
    import hashlib

    from openvla_align.cli import main as cli
    from openvla_align.openvla import patch as P

    (oft_patch,) = [p for p in P.load_patches() if p.name == "openvla-oft"]
    assert oft_patch.previous_sha256 and oft_patch.patched_sha256 not in oft_patch.previous_sha256
    copy = tmp_path / "oft"
    shutil.copytree(world.stock / "vla-scripts", copy / "vla-scripts")
    target = copy / "vla-scripts" / "finetune.py"
    original = target.read_bytes()
    assert cli(["patch", str(copy)]) == 0
    current = target.read_text()
    old = "".join(line for line in current.splitlines(keepends=True) if "on_optimizer" not in line)
    assert old != current
    earlier = hashlib.sha256(old.encode()).hexdigest()
    real_load_patches = P.load_patches

    def load_patches(root=None):
        return [
            dataclasses.replace(p, previous_sha256=(*p.previous_sha256, earlier)) if p.name == "openvla-oft" else p
            for p in real_load_patches(root)
        ]

    monkeypatch.setattr(P, "load_patches", load_patches)
    target.write_text(old)
    capsys.readouterr()
    assert cli(["patch", "--check", str(copy)]) == 1
    assert capsys.readouterr().out.startswith("outdated:")
    assert cli(["patch", str(copy)]) == 0 and target.read_text() == current
    assert capsys.readouterr().out.startswith("updated:")
    target.write_text(old)
    assert cli(["patch", "--revert", str(copy)]) == 0 and target.read_bytes() == original
    target.write_text(old)  # no original kept: refused, nothing changed
    (copy / "vla-scripts" / "finetune.py.orig").unlink(missing_ok=True)
    capsys.readouterr()
    assert cli(["patch", str(copy)]) == 1 and target.read_text() == old
    assert "earlier openvla-align" in capsys.readouterr().err
