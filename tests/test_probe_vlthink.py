import argparse
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from openvla_align.probe import vlthink, vlthink_synth
from openvla_align.probe.vlthink import (
    VLThinkDataError,
    VLThinkItem,
    greedy_answer,
    greedy_decode,
    load_items,
    make_synthetic_vlthink,
    next_token_logits,
    parse_answer,
    score_answers,
    summarize,
)
from openvla_align.tiny import build_tiny_vla, build_tokenizer, save_tiny_checkpoint
from openvla_align.vla.checkpoint import LoadedVLA, load_image, load_vla, vqa_prompt

IMAGE_SIZE = 56  # 4x4 patches: fast, same code paths as 224


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("vlthink_ckpt") / "tiny"
    save_tiny_checkpoint(path, build_tiny_vla(seed=1, vocab_size=len(tok), image_size=IMAGE_SIZE), tok)
    return path


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)) for _ in range(4)]


def _write_image(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((IMAGE_SIZE, IMAGE_SIZE, 3), value, np.uint8)).save(path)


def _cli(argv):
    parser = argparse.ArgumentParser()
    vlthink.add_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["vlthink"] + argv)
    return args.func(args)


# --- parsing and scoring --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes, on the left.", (True, "left")),
        ("yes left", (True, "left")),
        ("YES. RIGHT!", (True, "right")),
        ("Yes - it's in the middle", (True, "center")),
        ("yes, centre", (True, "center")),
        ("Yes.", (True, None)),
        ("no", (False, None)),
        ("No.", (False, None)),
        ("No, it is not on the left.", (False, None)),
        ("I do not see it.", (False, None)),
        ("I don't see it", (False, None)),
        ("nope", (False, None)),
        ("middle", (True, "center")),
        ("right", (True, "right")),
        ("on the leftmost board", (True, "left")),
        ("", (None, None)),
        (None, (None, None)),
        ("onto onto onto", (None, None)),
        ("<act3> nothing eyes knowledge", (None, None)),  # no/yes only as whole words
        ("square red board", (None, None)),
    ],
)
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


def _item(domain, board, present, position, **kw):
    return VLThinkItem(image=None, board=board, present=present, position=position, domain=domain, **kw)


def test_scoring_hand_computed_table():
    items = [
        _item("color", "red", True, "left"),  # "yes, left"     -> correct
        _item("color", "blue", True, "right"),  # "yes, left"   -> presence ok, position wrong
        _item("color", "green", False, None),  # "no"           -> correct
        _item("color", "black", False, None),  # "yes, center"  -> wrong
        _item("shape", "circle", True, "center"),  # "middle"   -> correct (presence inferred)
        _item("shape", "star", True, "left"),  # "no"           -> wrong, position wrong
        _item("shape", "heart", False, None),  # "gibberish"    -> wrong, unparsed
    ]
    answers = ["yes, left", "Yes, on the left.", "no", "yes, center", "middle", "no", "gibberish"]
    rows = score_answers(items, answers)
    assert [r["correct"] for r in rows] == [True, False, True, False, True, False, False]
    assert [r["presence_correct"] for r in rows] == [True, True, True, False, True, False, False]
    assert [r["position_correct"] for r in rows] == [True, False, None, None, True, False, None]
    s = summarize(rows)
    assert list(s["domains"]) == ["shape", "color"]  # paper order
    color, shape, overall = s["domains"]["color"], s["domains"]["shape"], s["overall"]
    assert color == {
        "n": 4,
        "n_present": 2,
        "accuracy": 2 / 4,
        "presence_accuracy": 3 / 4,
        "position_accuracy": 1 / 2,
        "unparsed": 0.0,
    }
    assert shape == {
        "n": 3,
        "n_present": 2,
        "accuracy": 1 / 3,
        "presence_accuracy": 1 / 3,
        "position_accuracy": 1 / 2,
        "unparsed": 1 / 3,
    }
    assert overall["n"] == 7 and overall["accuracy"] == pytest.approx(3 / 7)
    assert overall["presence_accuracy"] == pytest.approx(4 / 7)
    assert overall["position_accuracy"] == pytest.approx(2 / 4)
    assert overall["macro_accuracy"] == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_absent_board_correct_whatever_position_words_follow_no():
    rows = score_answers([_item("arrow", "up arrow", False, None)], ["no, left"])
    assert rows[0]["correct"] and rows[0]["pred_position"] is None


# --- greedy decoding ------------------------------------------------------------------------------------------


def _naive_greedy(loaded, prompt, image, max_new_tokens):
    """Reference: one sequence at a time, no padding, no attention-mask tricks."""
    pv = loaded.pixel_values([image])
    ids = loaded.tokenizer(prompt).input_ids
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            x = torch.tensor([ids + out])
            logits = loaded.model(input_ids=x, attention_mask=torch.ones_like(x), pixel_values=pv).logits
            t = int(logits[0, -1].argmax())
            out.append(t)
            if t == loaded.tokenizer.eos_token_id or "\n" in loaded.tokenizer.decode(out, skip_special_tokens=True):
                break
    return out


def test_batched_greedy_equals_one_by_one(ckpt, images):
    loaded = load_vla(ckpt)
    boards = ["the red board", "a stop sign with a very long name indeed", "it", "the blue circle on a yellow square"]
    prompts = [vqa_prompt(vlthink.QUESTION_TEMPLATE.format(board=b)) for b in boards]
    lengths = {len(loaded.tokenizer(p).input_ids) for p in prompts}
    assert len(lengths) == 4  # rows really are right-padded to different lengths
    batched = greedy_decode(loaded, prompts, images, max_new_tokens=6)
    naive = [_naive_greedy(loaded, p, im, 6) for p, im in zip(prompts, images)]
    assert batched == naive
    assert all(1 <= len(g) <= 6 for g in batched)
    assert len({tuple(g) for g in batched}) > 1  # the answers depend on the rows (a row mix-up would show)
    texts = greedy_answer(loaded, prompts, images, max_new_tokens=6)
    assert texts == [vlthink.decode_answer(loaded.tokenizer, g) for g in naive]


def test_next_token_logits_read_at_each_rows_last_real_token(ckpt, images):
    loaded = load_vla(ckpt)
    rows = [loaded.tokenizer(vqa_prompt(q)).input_ids for q in ("Do you see a cup?", "Is it there, on the table?")]
    rows = [rows[0] + [400, 401, 402], rows[1], rows[0][:3]]  # three different lengths, one far shorter
    pv = loaded.pixel_values(images[:3])
    batched = next_token_logits(loaded, rows, pv)
    with torch.no_grad():
        single = [
            loaded.model(
                input_ids=torch.tensor([r]), attention_mask=torch.ones(1, len(r)), pixel_values=pv[i : i + 1]
            ).logits[0, -1]
            for i, r in enumerate(rows)
        ]
    assert batched.shape == (3, loaded.model.config.vocab_size)
    torch.testing.assert_close(batched, torch.stack(single), atol=1e-4, rtol=1e-4)


class ScriptedVLA(nn.Module):
    """Runs the tiny VLA (so sequence shapes and the visual-token offset are real), then replaces its logits so that
    at text position j of a row the favoured token is script[j - (len(prompt) - 1)]: only reading each row's logits
    at its last real token reproduces the script. Elsewhere a junk token wins. ``answers`` maps a prompt to its
    scripted answer; other prompts get ``answer``."""

    def __init__(self, inner, tokenizer, prompts, answer="yes left", answers=None, eos=True):
        super().__init__()
        self.inner = inner
        self.tokenizer = tokenizer
        self.prompt_ids = [tokenizer(p).input_ids for p in prompts]
        answers = answers or {}
        tail = [tokenizer.eos_token_id] if eos else []
        self.scripts = [
            tokenizer(" " + answers.get(p, answer), add_special_tokens=False).input_ids + tail for p in prompts
        ]
        self.junk = tokenizer(" onto", add_special_tokens=False).input_ids[0]
        self.calls = []

    def _script(self, row):
        hits = [i for i, p in enumerate(self.prompt_ids) if row[: len(p)] == p]
        best = max(hits, key=lambda i: len(self.prompt_ids[i]))
        return len(self.prompt_ids[best]), self.scripts[best]

    def forward(self, input_ids, attention_mask=None, pixel_values=None, **kwargs):
        self.calls.append(tuple(input_ids.shape))
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
        logits = torch.zeros_like(out.logits)
        logits[..., self.junk] = 5.0
        offset = logits.shape[1] - input_ids.shape[1]
        for b in range(input_ids.shape[0]):
            row = input_ids[b, : int(attention_mask[b].sum())].tolist()
            n_prompt, script = self._script(row)
            for j in range(n_prompt - 1, input_ids.shape[1]):
                k = j - (n_prompt - 1)
                if k < len(script):
                    logits[b, j + offset] = 0.0
                    logits[b, j + offset, script[k]] = 10.0
        return SimpleNamespace(logits=logits)


def _scripted(ckpt, prompts, **kw):
    base = load_vla(ckpt)
    return LoadedVLA(ScriptedVLA(base.model, base.tokenizer, prompts, **kw), base.tokenizer, base.image_size, str(ckpt))


def test_greedy_stops_at_eos_and_newline_and_drops_finished_rows(ckpt, images):
    prompts = [vqa_prompt(q) for q in ("Do you see a cup?", "Do you see the red board over there?", "Do you see it?")]
    answers = {prompts[0]: "yes, left", prompts[1]: "no\nand more words after", prompts[2]: "yes"}
    loaded = _scripted(ckpt, prompts, answers=answers)
    tok = loaded.tokenizer
    ids = greedy_decode(loaded, prompts, images[:3], max_new_tokens=12)
    assert ids[0] == tok(" yes, left", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert ids[2] == tok(" yes", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert ids[1] == tok(" no\nand more words after", add_special_tokens=False).input_ids[: len(ids[1])]
    assert "\n" in tok.decode(ids[1]) and not tok.decode(ids[1][:-1]).count("\n")  # stopped right at the newline
    batch_sizes = [c[0] for c in loaded.model.calls]
    assert batch_sizes[0] == 3 and batch_sizes[-1] < 3 and batch_sizes == sorted(batch_sizes, reverse=True)
    assert len(batch_sizes) == max(len(g) for g in ids)
    assert greedy_answer(loaded, prompts, images[:3]) == ["yes, left", "no", "yes"]


def test_greedy_respects_max_new_tokens_without_eos(ckpt, images):
    prompts = [vqa_prompt("Do you see a cup?")]
    loaded = _scripted(ckpt, prompts, answers={prompts[0]: "yes left right center left right"}, eos=False)
    ids = greedy_decode(loaded, prompts, images[:1], max_new_tokens=3)
    assert len(ids[0]) == 3 and len(loaded.model.calls) == 3
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_decode(loaded, prompts, images[:1], max_new_tokens=0)


# --- end to end through the CLI --------------------------------------------------------------------------------


def _dataset(root):
    for name, value in (("a.png", 40), ("b.png", 120), ("c.png", 200)):
        _write_image(root / "img" / name, value)
    items = [  # under an always-"yes left" model:
        {"image": "img/a.png", "board": "the red board", "present": True, "position": "left", "domain": "color"},  # ok
        {"image": "img/b.png", "board": "the blue board", "present": True, "position": "right", "domain": "color"},
        {"image": "img/c.png", "board": "the pink board", "present": False, "position": None, "domain": "color"},
        {"image": "img/a.png", "board": "a stop sign", "present": True, "position": "left", "domain": "traffic"},  # ok
        {"image": "img/b.png", "board": "a yield sign", "present": True, "position": "left", "domain": "traffic"},  # ok
        {"image": "img/c.png", "board": "a roundabout", "present": True, "position": "center", "domain": "traffic"},
        {"image": "img/a.png", "board": "a taxi sign", "present": False, "domain": "traffic"},
        {"image": "img/b.png", "board": "a circle", "present": True, "position": "left", "domain": "shape"},  # ok
    ]
    path = root / "gt.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path


def test_cli_scores_a_forced_yes_left_model_end_to_end(ckpt, tmp_path, monkeypatch, capsys):
    data = _dataset(tmp_path / "data")
    prompts = [it.prompt() for it in load_items(data)]
    monkeypatch.setattr(vlthink, "load_vla", lambda path, adapter=None, **kw: _scripted(ckpt, prompts))
    out = tmp_path / "out"
    assert _cli(["--model", str(ckpt), "--data", str(data), "--out", str(out), "--batch-size", "3"]) == 0
    report = json.loads((out / "vlthink.json").read_text())
    (model,) = report["models"]
    assert all(a["answer"] == "yes left" for a in model["answers"])
    assert [a["correct"] for a in model["answers"]] == [True, False, False, True, True, False, False, True]
    doms = model["summary"]["domains"]
    assert list(doms) == ["shape", "color", "traffic"]
    assert doms["color"]["accuracy"] == pytest.approx(1 / 3)
    assert doms["color"]["presence_accuracy"] == pytest.approx(2 / 3)
    assert doms["color"]["position_accuracy"] == pytest.approx(1 / 2)
    assert doms["traffic"]["accuracy"] == pytest.approx(2 / 4)
    assert doms["traffic"]["presence_accuracy"] == pytest.approx(3 / 4)
    assert doms["traffic"]["position_accuracy"] == pytest.approx(2 / 3)
    assert doms["shape"]["accuracy"] == 1.0
    assert model["summary"]["overall"]["accuracy"] == pytest.approx(4 / 8)
    md = (out / "vlthink.md").read_text()
    assert "| color | 3 | 33.3 |" in md and "| traffic | 4 | 50.0 |" in md and "| shape | 1 | 100.0 |" in md
    assert "| **overall** | 8 | **50.0** |" in md
    assert "| color | 3 | 33.3 | 66.7 | 50.0 | 0.0 |" in md  # detailed table: acc, presence, position, unparsed
    assert "**50.0**" in capsys.readouterr().out


def test_cli_side_by_side_with_lora_adapter(ckpt, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    base = load_vla(ckpt).model
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))  # B=0: same outputs
    peft_model.save_pretrained(tmp_path / "adapter")
    data = make_synthetic_vlthink(tmp_path / "syn", n_scenes=2, size=IMAGE_SIZE)
    out = tmp_path / "out"
    argv = ["--model", str(ckpt), "--model", f"{ckpt}::{tmp_path / 'adapter'}", "--data", str(data)]
    assert _cli(argv + ["--out", str(out), "--max-new-tokens", "3", "--dtype", "float32", "--device", "cpu"]) == 0
    report = json.loads((out / "vlthink.json").read_text())
    a, b = report["models"]
    # an adapter directory named `adapter` is labelled by its run directory
    assert (a["label"], b["label"]) == ("tiny", f"tiny+{tmp_path.name}") and b["adapter"] == str(tmp_path / "adapter")
    assert [r["answer"] for r in a["answers"]] == [r["answer"] for r in b["answers"]]
    md = (out / "vlthink.md").read_text()
    assert f"| Domain | n | tiny | {b['label']} |" in md and f"## {b['label']}" in md


# --- data validation ------------------------------------------------------------------------------------------


def test_load_items_jsonl_and_json_list(tmp_path):
    _write_image(tmp_path / "x.png")
    rec = {"image": "x.png", "board": "stop sign", "present": True, "position": "Left", "domain": "traffic"}
    (tmp_path / "a.jsonl").write_text(
        json.dumps(rec) + "\n\n" + json.dumps({**rec, "present": False, "position": None})
    )
    (tmp_path / "b.json").write_text(json.dumps([rec]))
    items = load_items(tmp_path / "a.jsonl")
    assert [(i.present, i.position) for i in items] == [(True, "left"), (False, None)]
    assert items[0].image == (tmp_path / "x.png").resolve() and items[0].domain == "traffic"
    assert load_items(tmp_path / "b.json")[0].prompt() == vqa_prompt(
        "Do you see stop sign? Answer yes or no. If yes, specify where: left, center, or right."
    )
    own = VLThinkItem(None, "even number", True, "left", "parity", question="Do you see an even number?")
    assert own.prompt() == "In: Do you see an even number?\nOut:"


@pytest.mark.parametrize(
    "record, message",
    [
        ({"image": "missing.png", "board": "b", "present": False}, r"gt.jsonl:2: image .*missing.png does not exist"),
        ({"image": "x.png", "board": "b", "present": True, "position": "top"}, r"gt.jsonl:2: position 'top'"),
        ({"image": "x.png", "board": "b", "present": True}, r"present, so position must be one of"),
        ({"image": "x.png", "board": "b", "present": False, "position": "left"}, r"absent .* use null"),
        ({"image": "x.png", "board": "b", "present": "yes", "position": "left"}, r"present must be true or false"),
        ({"image": "x.png", "present": True, "position": "left"}, r"missing required key\(s\) \['board'\]"),
        ("just a string", r"must be a JSON object"),
    ],
)
def test_bad_items_are_rejected_with_location(tmp_path, record, message):
    _write_image(tmp_path / "x.png")
    good = {"image": "x.png", "board": "a", "present": False}
    (tmp_path / "gt.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(VLThinkDataError, match=message):
        load_items(tmp_path / "gt.jsonl")


def test_unknown_keys_warn(tmp_path):
    _write_image(tmp_path / "x.png")
    (tmp_path / "gt.jsonl").write_text(json.dumps({"image": "x.png", "board": "a", "present": False, "colour": 1}))
    with pytest.warns(UserWarning, match=r"unknown key\(s\) \['colour'\]"):
        assert len(load_items(tmp_path / "gt.jsonl")) == 1


@pytest.mark.parametrize("content", ["", "\n  \n", "# only a comment\n", "[]"])
def test_empty_data_file(tmp_path, content):
    (tmp_path / "gt.jsonl").write_text(content)
    with pytest.raises(VLThinkDataError, match="empty|no items"):
        load_items(tmp_path / "gt.jsonl")


def test_bad_json_line_and_unreadable_image(tmp_path):
    (tmp_path / "gt.jsonl").write_text('{"image": "x.png", "board": "a", "present": false}\n{oops\n')
    with pytest.raises(VLThinkDataError, match=r"gt.jsonl:2 is not valid JSON"):
        load_items(tmp_path / "gt.jsonl")
    (tmp_path / "x.png").write_text("not an image")
    (tmp_path / "gt.jsonl").write_text('{"image": "x.png", "board": "a", "present": false}\n')
    with pytest.raises(VLThinkDataError, match="cannot read image"):
        load_items(tmp_path / "gt.jsonl")


def test_cli_reports_bad_input_without_traceback(ckpt, tmp_path, capsys):
    from openvla_align.cli import main

    gt = str(tmp_path / "gt.jsonl")
    (tmp_path / "gt.jsonl").write_text(json.dumps({"image": "nope.png", "board": "a", "present": False}) + "\n")
    cases = [
        (["--model", str(ckpt), "--data", gt, "--out", str(tmp_path / "o")], "nope.png does not exist"),
        (["--data", gt], "give at least one --model DIR[::ADAPTER]."),
        (["--model", f"{ckpt}::", "--data", gt], "write DIR or DIR::ADAPTER"),
        (["--model", "a", "--model", "b", "--adapter", "c", "--data", gt], "write each model as DIR::ADAPTER"),
    ]
    for argv, message in cases:
        assert main(["probe", "vlthink", *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("openvla-align probe vlthink: ") and message in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


# --- synthetic set --------------------------------------------------------------------------------------------


def test_synthetic_set_matches_its_ground_truth(tmp_path):
    path = make_synthetic_vlthink(tmp_path / "syn", n_scenes=6, size=112)
    items = load_items(path)
    assert len(items) == 12 and {i.domain for i in items} == {"color", "shape"}
    assert sum(i.present for i in items) == 6
    slot_x = {"left": 112 // 6, "center": 112 // 2, "right": 5 * 112 // 6}
    for it in items:
        if it.present and it.domain == "color":
            colour = it.board.split()[1]
            px = np.asarray(load_image(it.image))[:, slot_x[it.position]].astype(int)
            dist = np.abs(px - np.array(vlthink_synth.SYNTH_COLORS[colour])).sum(1)
            assert (dist < 40).sum() > 10  # a band of the board's colour crosses that slot's column
