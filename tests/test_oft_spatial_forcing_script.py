"""Spatial Forcing's recipe (VGGT at layer 24 through a trainable projector) and two alignment terms at once, on
OpenVLA-OFT's real ``vla-scripts/finetune.py`` patched by ``openvla-align patch``, on CPU (one process and two under
torchrun). Its own file so that pytest-xdist runs it beside ``tests/test_oft_finetune.py``, whose world and helpers
it shares (see that file for what is real and what the CPU shim stands in for)."""

import os
import re
from pathlib import Path
from types import SimpleNamespace

import oft_assets as A
import pytest
import test_oft_finetune as oft
from test_oft_finetune import STEPS, checkpoint_dir, files, optimizer_steps, run

world = oft.world  # the fixture: a patched OFT checkout, a tiny OFT checkpoint, its data and a C-RADIO teacher
pytestmark = oft.pytestmark

RECIPE_SF = Path(__file__).resolve().parents[1] / "recipes" / "oft" / "libero-spatial-forcing.yaml"


@pytest.fixture(scope="module")
def sf_world(world):
    """A 25-layer tiny OFT checkpoint (layer 24 exists) and ``tiny-vggt``, VGGT's aggregator at tiny width with its
    weights in a ``model.pt`` laid out as VGGT-1B's, registered by a third-party entry point."""
    from assets import write_vggt_plugin

    site, weights = write_vggt_plugin(world.root)
    env = dict(world.env, PYTHONPATH=os.pathsep.join([str(site), world.env["PYTHONPATH"]]))
    ckpt = A.build_tiny_oft_checkpoint(world.root / "tiny-oft-25", seed=0, num_layers=25)
    return SimpleNamespace(**{**vars(world), "env": env, "ckpt": ckpt, "vggt": weights})


def sf_run(world, name, *args, **kw):
    """The patched script with ``--config_path recipes/oft/libero-spatial-forcing.yaml``: the recipe's settings, the
    tiny data and model, two steps, the tiny VGGT."""
    sf = ["--config_path", str(RECIPE_SF), "--align.teacher", "tiny-vggt", "--align.teacher_path", str(world.vggt)]
    return run(world, name, *sf, *args, **kw)


@pytest.mark.parametrize("nproc", [1, 2])
def test_spatial_forcing_recipe_trains_and_resumes_on_ofts_script(sf_world, nproc):
    """libero-spatial-forcing.yaml on the patched stock script (L1 head, 2 cameras through VGGT together, proprio,
    layer 24, trainable projector): on 1 process, and on 2 under torchrun; the checkpoint loads with OFT's own code;
    OFT-style resume restores the projector and its AdamW state (OFT saves no optimizer state of its own)."""
    from openvla_align.aligner import Aligner
    from openvla_align.openvla.plugins.align import OPTIMIZER_NAME

    proc, metrics, runs = sf_run(sf_world, f"sf-{nproc}", *STEPS, nproc=nproc)
    logged = [m for m in metrics if "align/loss" in m]
    assert len(logged) == 2 and all(0 < m["align/loss"] <= 1.0 for m in logged), metrics  # 0.5 x (1 - cos)
    assert "[openvla-align] WARNING" not in proc.stdout and "NUM_ACTIONS_CHUNK: 8" in proc.stdout  # LIBERO constants
    ckpt = checkpoint_dir(runs)
    saved = Aligner.load(ckpt / "align", target_width=64)  # tiny VGGT: 2 x 32
    assert saved.config.layers == (24,) and saved.saved_num_images == 2 and not saved.config.freeze_projector
    assert optimizer_steps(ckpt) == {2.0}  # two optimizer steps (micro-batches 0 and 1), state of every tensor
    assert (ckpt / "align" / OPTIMIZER_NAME).is_file()

    A.oft_src()
    from experiments.robot import openvla_utils as U

    cfg = SimpleNamespace(
        pretrained_checkpoint=str(ckpt), load_in_8bit=False, load_in_4bit=False, use_film=False, num_images_in_input=2,
        lora_rank=4, use_l1_regression=True, use_diffusion=False, num_diffusion_steps_train=2,
        num_diffusion_steps_inference=2,
    )  # fmt: skip
    vla = U.get_vla(cfg)
    assert vla.vision_backbone.get_num_images_in_input() == 2 and A.LIBERO_DATASET in vla.norm_stats
    assert U.get_action_head(cfg, vla.llm_dim) is not None
    assert U.get_proprio_projector(cfg, vla.llm_dim, A.LIBERO_PROPRIO_DIM) is not None
    if nproc == 2:
        return

    resumed = ["--resume", "true", "--resume_step", "1", "--max_steps", "2", "--save_freq", "2"]
    _, metrics, runs2 = sf_run(sf_world, "sf-resumed", *resumed, "--merge_lora_during_training", "false", vla_path=ckpt)
    later = checkpoint_dir(runs2, 2)
    assert any("align/loss" in m for m in metrics)
    assert optimizer_steps(later) == {4.0}  # 2 restored + 2 more: the AdamW state came back (fresh would be 2)
    assert Aligner.load(later / "align", target_width=64).fingerprint() != saved.fingerprint()  # and it trained on

    # Bad input stops before anything is written: a frozen-projector config on this trainable projector's sidecar,
    # VGGT-1B's weights missing offline, layer 24 on the 18-layer model
    sf = ["--config_path", str(RECIPE_SF)]
    tiny_vggt = ["--align.teacher", "tiny-vggt", "--align.teacher_path", str(sf_world.vggt)]
    resume = ["--resume", "true", "--resume_step", "1"]
    for name, args, vla_path, match in [
        ("frozen", [*sf, *tiny_vggt, *STEPS, *resume, "--align.freeze_projector", "true"], ckpt,
         r"freeze_projector: saved False, now True"),
        ("no-weights", [*sf, *STEPS], None, r"model\.pt.*facebook/VGGT-1B"),  # the recipe's vggt-1b, no weights here
        ("depth", [*sf, *tiny_vggt, *STEPS], sf_world.root / "tiny-oft",  # 18 layers
         r"Layer\(s\) \[24\] out of range: this LLM has 18"),
    ]:  # fmt: skip
        before = files(ckpt)
        proc, _, runs3 = run(sf_world, f"sf-bad-{name}", *args, vla_path=vla_path, check=False)
        assert proc.returncode != 0 and re.search(match, proc.stderr), (name, proc.stderr[-2000:])
        assert not runs3.exists() and files(ckpt) == before


def test_two_teachers_at_once_on_ofts_script(sf_world):
    """libero-radio-vggt.yaml: BlindVLA's term (``align``: C-RADIO at 16, frozen MLP) and Spatial Forcing's
    (``align2``: VGGT at 24, trainable projector) in one run of OFT's script, each with its own sidecar."""
    from openvla_align.aligner import Aligner

    recipe = RECIPE_SF.with_name("libero-radio-vggt.yaml")
    args = ["--config_path", str(recipe), *STEPS, "--align.teacher", "tiny-c-radio", "--align.projector_dim", "32"]
    args += ["--align2.teacher", "tiny-vggt", "--align2.teacher_path", str(sf_world.vggt)]
    _, metrics, runs = run(sf_world, "radio-vggt", *args)
    both = [m for m in metrics if "align/loss" in m and "align2/loss" in m]
    assert len(both) == 2 and all(-0.2 <= m["align/loss"] <= 0.2 < 1.0 and 0 < m["align2/loss"] <= 1 for m in both)
    ckpt = checkpoint_dir(runs)
    assert Aligner.load(ckpt / "align", target_width=32).config.layers == (16,)
    assert Aligner.load(ckpt / "align2", target_width=64).config.layers == (24,)
    assert (ckpt / "align2" / "projector_optimizer.safetensors").is_file()
    assert not (ckpt / "align" / "projector_optimizer.safetensors").exists()  # frozen: nothing to keep
