"""The demo: its world and splits, batches, decoding, verdict logic, its registered teacher, and every stage end to
end on a small setting (the full run, about 3 minutes, is not a test; tests/test_demo_readme.py checks its recorded
results)."""

import json

import numpy as np
import pytest
import torch

from openvla_align.cli import main
from openvla_align.demo import QUICK, DemoConfig, report, run_demo, stages
from openvla_align.demo import scenes as sc
from openvla_align.demo.code import source_fingerprint
from openvla_align.teachers import TeacherWeightsNotFound, create_teacher, teacher_spec


def test_teachers_command_lists_width_grid_and_weights(capsys):
    assert main(["teachers", "c-radio-v3-*"]) == 0
    out = capsys.readouterr().out
    assert "c-radio-v3-l" in out and "1024" in out and "16x16" in out and "nvidia/C-RADIOv3-L" in out
    assert "dinov2" not in out


# --- the world ---------------------------------------------------------------------------------------------------


def test_splits_keep_their_promises():
    train = sc.make_split("train", 200, 0)
    assert {s.target for s in train} == set(sc.TRAIN_COMBOS) and not {s.target for s in train} & set(sc.HELD_OUT)
    assert all(len(s.objects) == 1 and _table(s) in sc.TRAIN_TABLES for s in train)
    objects = sc.make_split("ood_objects", 60, 0)
    assert {s.target for s in objects} == set(sc.HELD_OUT) and all(_table(s) in sc.TRAIN_TABLES for s in objects)
    scenes = sc.make_split("ood_scenes", 60, 0)
    assert all(s.objects[1] == sc.PLATE and _table(s) in sc.OOD_TABLES for s in scenes)
    assert {s.target for s in scenes} <= set(sc.TRAIN_COMBOS)
    probe = sc.make_split("probe", 240, 0)
    assert sorted({s.label for s in probe}) == list(range(12))
    vl = sc.make_split("vl", 200, 0)
    assert {s.target for s in vl} == set(sc.COMBOS) and {_table(s) for s in vl} == set(sc.ALL_TABLES)
    assert any(sc.PLATE in s.objects for s in vl)
    again = sc.make_split("train", 200, 0)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(train, again))  # seeded
    with pytest.raises(ValueError, match="Unknown split 'test'"):
        sc.make_split("test", 1, 0)


def _table(scene):
    """The table colour a scene was drawn on (median of the table pixels, noise removed)."""
    rgb = np.median(scene.image[scene.cover == 0], axis=0) / 255
    return min(sc.ALL_TABLES, key=lambda t: np.abs(np.asarray(t) - rgb).sum())


def test_pixels_carry_the_labels():
    for scene in sc.make_split("probe", 24, 3):
        assert scene.image.dtype == np.uint8
        block = np.median(scene.image[scene.cover > 0], axis=0) / 255
        assert np.allclose(block, sc.rgb(*scene.target), atol=0.05)
        assert set(np.unique(scene.cover)) == {0, 1 + sc.COMBOS.index(scene.target)}


def test_shades_keep_the_hue_and_tell_apart():
    red = {shade: np.asarray(sc.rgb("red", shade)) for shade in sc.SHADES}
    assert np.allclose(red["bright"], sc.COLORS["red"]) and np.allclose(red["dark"], red["bright"] / 2)
    assert (red["pale"] > red["bright"]).all()  # mixed with white
    colours = [np.asarray(sc.rgb(*obj)) for obj in sc.COMBOS]
    assert min(np.abs(a - b).sum() for i, a in enumerate(colours) for b in colours[i + 1 :]) > 0.2


def test_sort_bins_round_trip():
    for obj in sc.COMBOS:
        assert sc.sorted_right(sc.sort_action(obj), obj)
        others = [o for o in sc.COMBOS if o != obj]
        assert not any(sc.sorted_right(sc.sort_action(o), obj) for o in others)


# --- batches and decoding ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from openvla_align.tiny import build_tiny_vla, build_tokenizer
    from openvla_align.vla.actions import ActionTokenizer

    tok = build_tokenizer(corpus=stages.corpus())
    batcher = stages.Batcher(tok, ActionTokenizer(len(tok)))
    vla = build_tiny_vla(seed=0, vocab_size=len(tok), image_size=112, llm_layers=4, vision_depth=2)
    return vla, batcher


def test_action_batch_labels_only_the_action_and_eos(tiny):
    _, batcher = tiny
    scenes = sc.make_split("id", 3, 0)
    batch = batcher.action(scenes)
    prompt_len = len(batcher.tok(stages.ACTION_PROMPT).input_ids)
    assert (batch["labels"][:, :prompt_len] == -100).all()
    actions = batch["labels"][:, prompt_len : prompt_len + 7].numpy()
    assert (batch["labels"][:, prompt_len + 7] == batcher.tok.eos_token_id).all()
    for row, scene in zip(actions, scenes):
        xy = batcher.act.decode(row)[:2]
        assert sc.sorted_right(xy, scene.target)
    assert batch["pixel_values"].shape == (3, 6, 112, 112)


def test_vl_questions_name_what_they_ask_about(tiny):
    _, batcher = tiny
    (scene,) = sc.make_split("probe", 1, 1)
    colour, shade = scene.target
    assert stages.vl_example(scene, "colour") == (f"What colour is the {shade} object", colour)
    assert stages.vl_example(scene, "shade") == (f"What shade is the {colour} object", shade)
    assert stages.vl_example(scene, "what") == ("What is on the table", f"{shade} {colour}")
    assert stages.vl_example(scene, "where")[1] == sc.where(int(scene.cells[0]))
    batch = batcher.vl([scene], ["what"])
    answer = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert batcher.tok.decode(answer[:-1]).strip() == f"{shade} {colour}" and answer[-1] == batcher.tok.eos_token_id


def test_greedy_decoding_matches_a_full_forward(tiny):
    vla, batcher = tiny
    scenes = sc.make_split("id", 4, 0)
    xy = stages.predict_xy(vla, batcher, scenes)
    batch = batcher.action(scenes, with_answer=False)
    first = batcher.act.vocab_size - 256
    with torch.no_grad():
        x_tok = vla(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits[:, -1, first:].argmax(-1)
        ids = torch.cat([batch["input_ids"], (x_tok + first)[:, None]], 1)
        y_tok = vla(input_ids=ids, pixel_values=batch["pixel_values"]).logits[:, -1, first:].argmax(-1)
    assert np.allclose(xy[:, 0], batcher.act.decode((x_tok + first).numpy()))
    assert np.allclose(xy[:, 1], batcher.act.decode((y_tok + first).numpy()))


def test_object_pooling_reads_only_the_object_patches():
    (scene,) = sc.make_split("probe", 1, 2)
    w = stages.object_weights([scene])
    assert w.shape == (1, 64) and 0 < (w > 0).sum() < 16
    tokens = torch.zeros(1, 64, 3)
    tokens[0, w[0] > 0] = 1.0
    pooled = stages.pool(tokens, w)
    assert torch.allclose(pooled["object"], torch.ones(1, 3)) and pooled["mean"][0, 0] < 0.25


# --- verdict -----------------------------------------------------------------------------------------------------


BASE = dict.fromkeys([k for _, k in report.METRICS], 0.45)


COEFFS = {"align": 0.2, "strong": 1.0}


def _summary(sft, align, strong=None):
    """Per-seed rows of the three arms (the strong arm as SFT unless given)."""
    rows = {
        run: [{"seed": i, **dict.fromkeys(BASE, v)} for i, v in enumerate(vals)]
        for run, vals in (("sft", sft), ("align", align), ("strong", strong or sft))
    }
    return report.summarize(BASE, rows)


def test_verdict_is_read_from_the_intervals():
    clear = _summary([0.40, 0.42, 0.41, 0.40, 0.41], [0.50, 0.51, 0.52, 0.50, 0.52])
    assert {w["align_vs_sft"] for w in report.words(clear).values()} == {"beats"}
    assert {w["sft_vs_base"] for w in report.words(clear).values()} == {"degraded"}
    assert all(
        "SFT vs base degraded" in line and "Align 0.2 vs SFT beats" in line and "Align 1.0 vs SFT no difference" in line
        for line in report.verdict(clear, COEFFS)
    )
    assert "Align 0.2 beat plain SFT on: cosine to the teacher" in report.conclusion(clear, COEFFS)
    assert {w["strong_vs_sft"] for w in report.words(clear).values()} == {"no difference shown"}
    # +0.05 on average, but seed by seed from -0.15 to +0.25: the interval crosses 0
    noisy = _summary([0.30, 0.50, 0.40, 0.45, 0.35], [0.45, 0.35, 0.65, 0.40, 0.40])
    assert {w["align_vs_sft"] for w in report.words(noisy).values()} == {"no difference shown"}
    assert {w["sft_vs_base"] for w in report.words(noisy).values()} == {"no change shown"}
    assert "Align 0.2 did NOT beat plain SFT" in report.conclusion(noisy, COEFFS)
    assert "did NOT degrade" in report.conclusion(noisy, COEFFS)
    worse = _summary([0.50, 0.51, 0.52, 0.50, 0.53], [0.30, 0.31, 0.32, 0.33, 0.30], [0.60, 0.62, 0.61, 0.60, 0.64])
    assert {w["align_vs_sft"] for w in report.words(worse).values()} == {"worse"}
    assert {w["strong_vs_sft"] for w in report.words(worse).values()} == {"beats"}
    assert "Align 0.2 was worse than plain SFT on" in report.conclusion(worse, COEFFS)
    assert "Align 1.0 beat plain SFT on" in report.conclusion(worse, COEFFS)
    table = report.table({}, BASE, worse, (0, 1, 2, 3, 4), COEFFS)
    assert "Align 0.2 - SFT" in table and "Align 1.0 - SFT" in table and "0.614 ± 0.017" in table
    # the interval of Align - SFT is the paired one: the per-seed spread of each arm does not count
    paired = _summary([0.30, 0.40, 0.50, 0.60, 0.70], [0.32, 0.41, 0.52, 0.61, 0.72])
    row = paired["probe"]["align_vs_sft"]
    assert row["low"] > 0 and row["p"] < 0.01 and report.words(paired)["probe"]["align_vs_sft"] == "beats"


def test_an_interval_ending_near_zero_is_called_borderline():
    near = _summary([0.40, 0.41, 0.40, 0.42, 0.41], [0.40, 0.43, 0.41, 0.42, 0.43])  # Align - SFT: +0.01 +- ~0.01
    iv = near["probe"]["align_vs_sft"]
    assert abs(iv["low"]) < report.BORDER
    assert all("(borderline)" in line for line in report.verdict(near, COEFFS))
    assert "Borderline (an interval ends within 0.005 of 0" in report.conclusion(near, COEFFS)
    far = _summary([0.40, 0.42, 0.41, 0.40, 0.41], [0.50, 0.51, 0.52, 0.50, 0.52])
    assert not any("borderline" in line for line in report.verdict(far, COEFFS))
    assert "Borderline" not in report.conclusion(far, COEFFS)


def test_summary_refuses_arms_with_different_seeds():
    rows = {run: [{"seed": s, **BASE} for s in (0, 1)] for run in report.RUNS}
    rows["strong"] = rows["strong"][::-1]
    with pytest.raises(ValueError, match="same seeds in the same order"):
        report.summarize(BASE, rows)


# --- its teacher, through the registry ---------------------------------------------------------------------------


def test_demo_teacher_needs_its_weights_and_says_where_they_come_from(tmp_path):
    with pytest.raises(TeacherWeightsNotFound, match="openvla-align demo"):
        create_teacher("demo-scenes", grid=(8, 8))
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="does not hold its weights.*openvla-align demo"):
        create_teacher("demo-scenes", path=str(bad), grid=(8, 8))
    assert teacher_spec("demo-scenes").width == 32


# --- every stage, small ------------------------------------------------------------------------------------------


def test_demo_stages_on_a_small_setting(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    cfg = DemoConfig(out_dir=str(out_dir), **QUICK)
    summary = run_demo(cfg)
    printed = capsys.readouterr().out
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["summary"] == json.loads(json.dumps(summary["summary"]))
    chance = 1 / 12
    assert metrics["teacher_probe"]["probe"] > 2 * chance  # the teacher learned the concepts
    assert metrics["base"]["probe"] > 2 * chance  # the VL-pretrained VLA's aligned layer carries them
    keys = {k for _, k in report.METRICS}
    assert set(metrics["base"]) == keys
    assert set(metrics["summary"]) == keys and set(metrics["words"]) == keys
    for run in ("sft", "align", "strong"):
        assert [row["seed"] for row in metrics["per_seed"][run]] == [0, 1]
        for row in metrics["per_seed"][run]:
            assert set(row) == keys | {"seed"} and all(-1 <= row[k] <= 1 for k in keys)
        assert (out_dir / run / "seed1" / "adapter" / "adapter_config.json").is_file()
        assert len(metrics["history"][run][0]) == 3
    for run, coeff in (("align", 0.2), ("strong", 1.0)):  # the loss is the coefficient times the cosine loss
        last = metrics["history"][run][0][-1]
        assert "align/cos_layer4" in last and np.isclose(last["align/loss"], -coeff * last["align/cos_layer4"])

    assert metrics["config"]["coeff"] == 0.2 and metrics["config"]["strong_coeff"] == 1.0
    assert (out_dir / "align" / "seed0" / "adapter" / "align" / "projector.safetensors").is_file()
    assert not (out_dir / "sft" / "seed0" / "adapter" / "align").exists()
    assert (out_dir / "teacher" / "model.safetensors").is_file() and (out_dir / "base" / "config.json").is_file()
    assert metrics["reload_max_abs_logit_diff"] < 1e-4
    assert set(metrics["seconds"]) >= {"data", "teacher", "base", "fine-tuning + evaluation", "report", "total"}
    assert "time per stage: data" in printed
    assert len(metrics["verdict"]) == len(report.METRICS) and metrics["conclusion"] in printed
    assert metrics["table"] in printed and "Align 0.2" in metrics["table"] and "Align 1.0 - SFT" in metrics["table"]
    code = metrics["code"]
    assert "demo/run.py" in code["files"] and "stats.py" in code["files"]
    assert code["fingerprint"] == source_fingerprint(code["files"])
    assert torch.__version__.startswith(code["versions"]["torch"])
    assert (out_dir / "demo.png").stat().st_size > 10_000
    last = printed.strip().splitlines()[-1]
    assert str(out_dir) in last and "openvla-align probe linear" in last and "openvla-align eval" in last


def test_vlthink_tells_the_demo_runs_apart_by_run_and_seed():
    from openvla_align.probe.vlthink import _labels

    specs = [("out/base", None), ("out/base", "out/sft/seed0/adapter"), ("out/base", "out/align/seed0/adapter")]
    assert _labels(specs) == ["base", "base+sft/seed0", "base+align/seed0"]
    assert _labels([("m", "runs/align/adapter"), ("m", "x/lora")]) == ["m+align", "m+lora"]
