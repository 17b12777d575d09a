"""`openvla-align bench` at the smoke scale: every mode runs, the figures are reported, the reference mode computes
the same loss as the hook. (The bench measures speed and memory; these tests check what it computes, not how fast.)"""

import json

import pytest
import torch

from openvla_align import bench
from openvla_align.cli import main


def test_the_four_modes_compute_the_same_alignment_loss(tmp_path):
    from openvla_align.cache.store import TeacherCache

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
    from openvla_align.cache.store import TeacherCache
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


@pytest.mark.parametrize("family", ["openvla", "openvla-oft"])
def test_cli_prints_the_table_and_writes_json(tmp_path, capsys, family):
    out = tmp_path / "bench.json"
    args = ["bench", "--scale", "smoke", "--rounds", "1", "--steps", "1", "--device", "cpu", "--out", str(out)]
    memory = [] if family == "openvla" else ["--no-memory"]  # one family's memory processes are enough (~1 min)
    assert main([*args, "--family", family, *memory]) == 0
    printed = capsys.readouterr().out
    tokens = {
        "openvla": "1 image(s) = 256 visual tokens, 7 action",
        "openvla-oft": "2 image(s) = 512 visual tokens, 56 action",
    }
    assert tokens[family] in printed
    for mode in bench.MODES:
        assert f"\n{mode} " in printed
    assert "cache builder:" in printed and "frames/s" in printed
    result = json.loads(out.read_text())
    assert set(result["time"]["median_s"]) == set(bench.MODES) and result["time"]["steps"]["sft"] == 1
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


def test_policy_throughput_reports_both_decoding_paths(tmp_path, capsys):
    """`bench --policy`: both decoding paths run on the same frames and the figures are printed and saved (their
    values are the benchmark's business, not this test's)."""
    assert (
        main(
            [
                "bench",
                "--policy",
                "--scale",
                "smoke",
                "--rounds",
                "1",
                "--policy-batch",
                "3",
                "--out",
                str(tmp_path / "p.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "eval policy at batch 3 (smoke scale): KV cache" in out and "full re-forward per token" in out
    result = json.loads((tmp_path / "p.json").read_text())
    assert set(result["actions_per_s"]) == {"kv_cache", "full_forward"} and result["batch"] == 3
    assert result["speedup"] == pytest.approx(
        result["actions_per_s"]["kv_cache"] / result["actions_per_s"]["full_forward"], rel=0.02
    )
