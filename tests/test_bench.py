"""`openvla-align bench` at the smoke scale: every mode runs, the figures are reported, the reference mode computes
the same loss as the hook. (The bench measures speed and memory; these tests check what it computes, not how fast.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from openvla_align import bench
from openvla_align.cli import main

from conftest import cli_fails


def test_the_four_modes_compute_the_same_alignment_loss(tmp_path):
    from openvla_align.targets.cache import TeacherCache

    scale = bench.SMOKE_SCALE
    vla, teacher = bench.build(scale)
    vla.eval()  # no LoRA dropout either way; identical forward passes
    bench.build_bench_cache(teacher, tmp_path / "c")
    cache = TeacherCache(tmp_path / "c")
    batch = next(bench.batches(scale, 2))
    losses = {}
    for mode in bench.MODES:
        with bench.Runner(mode, vla, teacher, cache, scale, "cpu") as runner:
            with torch.no_grad():
                losses[mode] = runner.loss(batch).item()
    assert losses["live"] == pytest.approx(losses["reference"], rel=1e-5)  # hook == output_hidden_states[L]
    assert losses["cache"] == pytest.approx(losses["live"], rel=1e-3)  # bf16 storage of the targets
    assert losses["live"] != pytest.approx(losses["sft"], rel=1e-6)


def test_oft_step_aligns_every_camera_and_trains_the_action_head(tmp_path):
    """--family openvla-oft: OFT's LIBERO step on the tiny model (2 cameras, proprio token, 8x7 action chunk, L1 head).
    The hook's tokens are exactly output_hidden_states[L][:, 1 : 1 + 512] (the proprio token after them is not
    aligned), each camera gets its own teacher targets, and the action head and proprio projector are trained."""
    from openvla_align.targets.cache import TeacherCache
    from openvla_align.vla import layout

    scale = bench.SCALES["oft-smoke"]
    assert (scale.visual_tokens, scale.chunk * 7, scale.llm.tokens) == (512, 56, 1 + 512 + 1 + 26 + 56 + 1)
    vla, teacher = bench.build(scale)
    heads = bench.build_heads(scale)
    assert layout.family(vla).name == "openvla-oft" and layout.num_images(vla) == 2
    vla.eval()
    bench.build_bench_cache(teacher, tmp_path / "c")
    cache = TeacherCache(tmp_path / "c")
    batch = next(bench.batches(scale, 2))
    assert batch["pixel_values"].shape == (2, 12, 224, 224) and batch["actions"].shape == (2, 8, 7)
    assert not torch.equal(batch["pixel_values"][:, :6], batch["pixel_values"][:, 6:])  # two different cameras
    losses = {}
    for mode in bench.MODES:
        with bench.Runner(mode, vla, teacher, cache, scale, "cpu", heads) as runner:
            with torch.no_grad():
                losses[mode] = runner.loss(batch).item()
    assert losses["live"] == pytest.approx(losses["reference"], rel=1e-5)
    assert losses["cache"] == pytest.approx(losses["live"], rel=1e-3)
    assert losses["live"] != pytest.approx(losses["sft"], rel=1e-6)
    with bench.Runner("sft", vla, teacher, cache, scale, "cpu", heads) as runner:
        runner.loss(batch).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())
    with pytest.raises(ValueError, match="action head"):
        bench.Runner("sft", vla, teacher, cache, scale, "cpu")
    # the memory measurement's step, in this process (the CLI test below skips the per-mode processes for OFT)
    assert bench.peak_memory("cache", str(tmp_path / "c"), steps=1, scale="oft-smoke") > 0


def test_oft_vggt_modes_see_both_cameras_together_live_and_cached(tmp_path):
    """Spatial Forcing's rows: VGGT's aggregator (multi-view) on each sample's two cameras at once, its layer,
    trainable projector, loss, input and pooling; the cache holds one row per sample (both cameras) and gives the
    live teacher's loss; the projector is trained with the LoRA weights."""
    from openvla_align.targets.cache import TeacherCache

    scale = bench.SCALES["oft-smoke"]
    sf = bench.with_vggt(scale)
    assert (sf.teacher_name, sf.recipe, sf.layer, sf.teacher.out_width) == ("vggt-1b", "spatial-forcing", 3, 64)
    assert bench.mode_scale(scale, "cache-vggt") == sf and bench.mode_scale(scale, "cache") is scale
    assert bench.family_modes("openvla-oft") == (*bench.MODES, "live-vggt", "cache-vggt")
    assert bench.family_modes("openvla") == bench.MODES
    vla, _ = bench.build(scale, with_teacher=False)
    heads = bench.build_heads(scale)
    vla.eval()
    teacher = bench.build_bench_teacher(sf)
    assert teacher.multi_view and teacher.resolution == sf.teacher.resolution and teacher.width == 64
    samples = bench.bench_samples(scale, 2)
    assert samples == [(0, 2), (1, 3), (4, 6), (5, 7)]  # (camera 0, camera 1) frames of each sample batches feeds
    info = bench.build_bench_cache(teacher, tmp_path / "v", scale=sf, batch_size=2)
    cache = TeacherCache(tmp_path / "v")
    assert (info["rows"], cache.multi_view, cache.views, len(cache)) == ("samples", True, 2, 4)
    assert (cache.spec.teacher_input, cache.spec.pooling, cache.spec.pooling_pos_embed) == (
        "spatial-forcing",
        "bilinear-corners",
        0.1,
    )
    data = bench.batches(scale, 2)
    losses = {}
    for batch in (next(data), next(data)):  # both batches of the cycle: every sample is in the cache
        for mode in bench.VGGT_MODES:
            with bench.Runner(mode, vla, teacher, cache, sf, "cpu", heads) as runner:
                with torch.no_grad():
                    losses[mode] = runner.loss(batch).item()
        assert losses["cache-vggt"] == pytest.approx(losses["live-vggt"], rel=1e-3)
    with bench.Runner("sft", vla, teacher, cache, scale, "cpu", heads) as runner, torch.no_grad():
        assert losses["live-vggt"] != pytest.approx(runner.loss(batch).item(), rel=1e-6)
    runner = bench.Runner("cache-vggt", vla, teacher, cache, sf, "cpu", heads)
    projector = runner.aligner.trainable_parameters()
    assert projector and all(any(p is q for q in runner.params) for p in projector)  # in the optimizer
    with runner:
        runner.loss(batch).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector)
    with pytest.raises(ValueError, match="reference implementation: its recipe only"):
        bench.Runner("reference", vla, teacher, cache, sf, "cpu", heads)


def test_analytic_estimate_orders_the_modes():
    a = bench.analytic()
    assert a["time"]["sft"] == 1.0 < a["time"]["cache"] < a["time"]["live"] <= a["time"]["reference"]
    assert 1.0 < a["memory"]["cache"] < 1.01 < a["memory"]["live"] < 1.1
    assert 0.03 < bench.OPENVLA_7B.proportions()["teacher"] < 0.06  # ViT-L/16 vs Llama-2-7B at ~290 tokens
    big, cpu = bench.OPENVLA_7B.proportions(), bench.CPU_SCALE.proportions()
    for part in ("vision", "teacher"):  # the CPU model keeps the 7B proportions within 40 %
        assert 0.6 < cpu[part] / big[part] < 1.4
    o = bench.analytic(bench.OFT_7B)  # twice the images, twice the teacher, a ~2x longer sequence: similar ratios
    assert o["time"]["sft"] == 1.0 < o["time"]["cache"] < o["time"]["live"] < 1.05
    assert o["memory_gb"]["sft"] > a["memory_gb"]["sft"]
    big, cpu = bench.OFT_7B.proportions(), bench.SCALES["oft-cpu"].proportions()
    for part in ("vision", "teacher"):
        assert 0.6 < cpu[part] / big[part] < 1.4


def test_analytic_vggt_1b_at_openvla_oft_7b():
    """VGGT-1B's shape: a DINOv2-L/14 patch embedding (24 blocks of 1024) and 24 frame + 24 global blocks of 1024 at
    518 px (37 x 37 patches + 5 prefix tokens per frame), the global blocks attending over both frames' 2 x 1374
    tokens; its forward on a sample's two frames is 80 % of OpenVLA-7B's LLM forward at OFT's 597 tokens. Live, it
    costs ~37 % more step time; cached (Spatial Forcing's trainable projector and one batch of 2048-wide targets),
    within the targets: <= 1.03 x time and <= 1.05 x memory of plain OFT LoRA."""
    v = bench.VGGT_1B
    shape = (v.width, v.depth, v.embed_depth, v.mlp, v.heads, v.resolution, v.tokens)
    assert shape == (1024, 24, 24, 4096, 16, 518, 37 * 37 + 5)
    embed, frame, glob = v.towers(2)
    assert glob.tokens == 2 * 1374 and embed.tokens == frame.tokens == 1374 and v.out_width == 2048
    per_frame_block = 2 * 1374 * (12 * 1024**2 + 2 * 1374 * 1024)  # 4w^2 attention + 8w^2 MLP, scores + sum
    global_block = 2 * 2748 * (12 * 1024**2 + 2 * 2748 * 1024)
    assert v.sample_flops(2) == pytest.approx(2 * 48 * per_frame_block + 24 * global_block, rel=1e-12)
    assert v.sample_flops(2) / 1e12 == pytest.approx(6.464, abs=0.001)  # TFLOPs per sample (2 frames)
    assert v.params() / 1e9 == pytest.approx(0.906, abs=0.001)  # linear weights of the aggregator
    big = bench.OFT_7B_VGGT
    assert (big.teacher_name, big.layer, big.recipe, big.images) == ("vggt-1b", 24, "spatial-forcing", 2)
    assert big.proportions()["teacher"] == pytest.approx(0.800, abs=0.001)
    a = bench.analytic(big)
    assert a["time"]["live"] == pytest.approx(1.368, abs=0.001)
    assert a["time"]["cache"] == pytest.approx(1.0022, abs=0.0002) and a["time"]["cache"] <= 1.03
    assert a["memory"]["live"] == pytest.approx(1.037, abs=0.001)
    assert a["memory"]["cache"] == pytest.approx(1.0029, abs=0.0002) and a["memory"]["cache"] <= 1.05
    # the CPU model keeps VGGT : LLM within 15 % of the 7B proportion (widths / 8, depths / 8, 518 px)
    cpu = bench.with_vggt(bench.SCALES["oft-cpu"])
    assert cpu.teacher.resolution == 518 and (cpu.teacher.width, cpu.teacher.depth) == (128, 3)
    assert 0.85 < cpu.proportions()["teacher"] / big.proportions()["teacher"] < 1.15


@pytest.mark.parametrize("family", ["openvla", "openvla-oft"])
def test_cli_prints_the_table_and_writes_json(tmp_path, capsys, family):
    out = tmp_path / "bench.json"
    args = ["bench", "--scale", "smoke", "--rounds", "1", "--steps", "1", "--device", "cpu", "--out", str(out)]
    memory = [] if family == "openvla" else ["--no-memory"]  # one family's memory processes are enough (~1 min)
    clock = "wall" if family == "openvla" else "cpu"  # the process's CPU time instead of the wall clock
    assert main([*args, "--family", family, *memory, "--clock", clock]) == 0
    printed = capsys.readouterr().out
    tokens = {
        "openvla": "1 image(s) = 256 visual tokens, 7 action",
        "openvla-oft": "2 image(s) = 512 visual tokens, 56 action",
    }
    assert tokens[family] in printed
    modes = bench.family_modes(family)
    for mode in modes:
        assert f"\n{mode} " in printed
    assert "cache builder (c-radio-v3-l):" in printed and "frames/s" in printed
    result = json.loads(out.read_text())
    assert result["modes"] == list(modes) and result["time"]["clock"] == result["settings"]["clock"] == clock
    assert ("CPU (ms)" in printed) == (clock == "cpu") and ("step (ms)" in printed) == (clock == "wall")
    assert set(result["time"]["median_s"]) == set(modes) and result["time"]["steps"]["sft"] == 1
    assert set(result["analytic_7b"]["time"]) == set(modes) == set(result["time"]["ratio_ci95"])
    if family == "openvla-oft":
        assert "OpenVLA-OFT-7B + VGGT-1B (Spatial Forcing): both cameras through VGGT together (518 px" in printed
        assert "cache builder (vggt-1b):" in printed
        assert result["scales"]["7b-vggt"]["teacher"]["tokens"] == 1374
        assert result["analytic_7b"]["time"]["cache-vggt"] == bench.analytic(bench.OFT_7B_VGGT)["time"]["cache"]
    if memory:
        assert result["memory"] is None and "peak mem" in printed
    else:
        assert all(v > 0 for v in result["memory"]["peak_bytes"].values())
    assert result["time"]["ratio"]["sft"] == 1.0 and result["analytic_7b"]["time"]["sft"] == 1.0
    assert result["settings"]["family"] == family == result["scales"]["7b"]["family"]
    lo, hi = result["time"]["ratio_ci95"]["sft"]
    assert lo <= 1.0 <= hi and "95% CI" in printed


def test_policy_bench_is_for_openvla_decoding_only():
    with pytest.raises(SystemExit, match="one forward"):
        main(["bench", "--policy", "--family", "openvla-oft", "--scale", "smoke"])


BLINDVLA = Path(os.environ.get("OPENVLA_UPSTREAM", Path(__file__).resolve().parents[2] / "shared" / "upstream"))
BLINDVLA = BLINDVLA / "blindvla"
REFERENCE_TOO_NEW = int(transformers.__version__.split(".")[0]) >= 5  # its HF classes import transformers 4 names


@pytest.mark.skipif(
    not (BLINDVLA / "openvla" / "prismatic" / "extern" / "hf").is_dir(),
    reason=f"the reference's HF classes are not at {BLINDVLA} (../shared/upstream/blindvla, or OPENVLA_UPSTREAM)",
)
def test_policy_bench_runs_the_reference_ours_and_the_floor_on_identical_tokens(tmp_path, capsys):
    """`bench --policy`: BlindVLA's predict_action_batch, eval run's policy and the prefill floor run on one
    checkpoint; the reference and ours choose identical action tokens (the bench stops otherwise), and the figures
    are printed and saved (their values are the benchmark's business, not this test's). Under transformers 5, where
    the reference's classes do not import, the bench says so in one line."""
    argv = ["bench", "--policy", "--scale", "smoke", "--rounds", "1", "--policy-batches", "1,3"]
    if REFERENCE_TOO_NEW:
        cli_fails(capsys, [*argv, "--reference-src", str(BLINDVLA)], r"run bench --policy in an OpenVLA environment")
        return
    # the installed command, in its own process: the reference's classes are loaded as a user's run loads them
    command = Path(sys.executable).parent / "openvla-align"
    run = subprocess.run(
        [str(command), *argv, "--reference-src", str(BLINDVLA), "--out", str(tmp_path / "p.json")],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "eval policy vs the reference's predict_action_batch (smoke scale" in run.stdout
    result = json.loads((tmp_path / "p.json").read_text())
    assert set(result["batches"]) == {"1", "3"}
    for r in result["batches"].values():
        assert r["identical_tokens"] and set(r["actions_per_s"]) == {"reference", "ours", "floor"}
    assert 0 < result["analytic_7b"]["ours_extra_over_floor"] < result["analytic_7b"]["reference_extra_over_floor"]


@pytest.mark.skipif(
    not (BLINDVLA / "openvla").is_dir() or REFERENCE_TOO_NEW,
    reason="needs the reference's HF classes (../shared/upstream/blindvla) and transformers 4.x, which they import",
)
def test_policy_tokens_match_the_reference_token_for_token(tmp_path):
    """The check the bench relies on, made directly, at two batch sizes and with different frames per row."""
    from openvla_align.bench import policy
    from openvla_align.vla.actions import ActionDecoder
    from openvla_align.vla.checkpoint import load_vla

    checkpoint = policy._build(policy.reference_files(BLINDVLA), bench.SMOKE_SCALE, tmp_path / "ckpt")
    reference = policy.Reference(checkpoint, "cpu")
    ours = ActionDecoder(load_vla(checkpoint, device="cpu", dtype="float32"))
    frames = np.random.default_rng(1).integers(0, 256, (5, 224, 224, 3), dtype=np.uint8)
    pixels = policy._pixels(checkpoint, frames, "cpu")
    row = ours.rows(["open the drawer"])[0]
    for n in (1, 5):
        ids = reference(torch.tensor([row] * n), pixels[:n])
        assert ids.shape == (n, 7) and (ids >= 32000 - 256).all() and (ids < 32000).all()
        np.testing.assert_array_equal(ours.decode([row] * n, pixels[:n]), ids)
        np.testing.assert_array_equal(ours.decode([row] * n, pixels[:n], kv_cache=False), ids)
        np.testing.assert_array_equal(ours.first_tokens([row] * n, pixels[:n]), ids[:, 0])


def test_policy_bench_needs_the_reference(tmp_path):
    from openvla_align.bench.policy import reference_files

    with pytest.raises(SystemExit, match="pass --reference-src"):
        main(["bench", "--policy", "--scale", "smoke"])
    with pytest.raises(FileNotFoundError, match="holds no prismatic/extern/hf/modeling_prismatic.py"):
        reference_files(tmp_path)
    hf = tmp_path / "openvla" / "prismatic" / "extern" / "hf"
    hf.mkdir(parents=True)
    (hf / "modeling_prismatic.py").write_text(
        "class OpenVLAForActionPrediction:\n    pass\n"
    )  # OpenVLA's, not BlindVLA's
    with pytest.raises(ValueError, match="has no predict_action_batch: --reference-src must be a checkout of"):
        reference_files(tmp_path)
