import argparse
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from openvla_align.probe import features, linear
from openvla_align.probe.linear import (
    DEFAULT_PROMPT,
    ModelSpec,
    add_parser,
    comparison_table,
    extract_features,
    linear_probe,
    run_linear_probe,
    scan_imagefolder,
)
from openvla_align.tiny import build_tiny_vla, build_tokenizer, save_tiny_checkpoint
from openvla_align.tiny.model import TINY_VIT as TINY_ARCH
from openvla_align.vla.checkpoint import load_vla

from conftest import cli_fails

COLOURS = {"blue": (40, 60, 230), "green": (30, 200, 50), "red": (220, 30, 30)}
FAST = dict(epochs=60, lr=0.05, batch_size=0)  # tiny data: a few full-batch steps fit it
TINY_TEACHER = dict(allow_random=True, arch=TINY_ARCH)
LLM_LAYERS = 4


def write_square(path, rgb, rng):
    """A coloured square at a random place on a noisy grey background."""
    img = rng.integers(90, 160, (24, 24, 3)).astype(np.uint8)
    x, y = rng.integers(0, 12, 2)
    img[y : y + 12, x : x + 12] = rgb
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def make_imagefolder(root, n_train=4, n_val=2, seed=0):
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for name, rgb in COLOURS.items():
            for i in range(n):
                write_square(root / split / name / f"{i}.png", rgb, rng)
    return root


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors gain nothing from intra-op threads, and on busy CI cores the threads' spin-waits make a
    # 200-step probe take seconds instead of milliseconds.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # 4 LLM blocks and 112 px (64 visual tokens) keep extraction fast; the code path is the full-size one.
    tok = build_tokenizer()
    path = tmp_path_factory.mktemp("ckpt")
    save_tiny_checkpoint(path, build_tiny_vla(vocab_size=len(tok), llm_layers=LLM_LAYERS, image_size=112), tok)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("data"))


# --- classifier ----------------------------------------------------------------------------------------------


def test_probe_separable_is_perfect_and_shuffled_is_chance():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4000) % 3
    x = torch.rand(4000, 32, generator=g) * 2 - 1
    x[torch.arange(4000), y] += 3.0  # own-class feature >= 2, every other feature <= 1: separable by construction
    assert linear_probe(x[:3000], y[:3000], x[3000:], y[3000:]) == 1.0  # default settings
    assert linear_probe(x[:300], y[:300], x[300:600], y[300:600], batch_size=0, epochs=300, lr=0.05) == 1.0

    shuffled = y[torch.randperm(4000, generator=g)]
    acc = linear_probe(x[:3000], shuffled[:3000], x[3000:], shuffled[3000:])
    assert abs(acc - 1 / 3) < 0.06  # the std of a 1000-sample accuracy at chance is 0.015

    again = linear_probe(x[:3000], shuffled[:3000], x[3000:], shuffled[3000:])
    assert again == acc  # fixed seed


@pytest.mark.parametrize(
    "setting, message",
    [
        (dict(epochs=0), "--epochs 0 is invalid"),
        (dict(lr=0.0), "--lr 0.0 is invalid"),
        (dict(weight_decay=-1.0), "--weight-decay -1.0 is invalid"),
        (dict(batch_size=-2), "--batch-size -2 is invalid"),
    ],
)
def test_probe_rejects_bad_settings(setting, message):
    x, y = torch.zeros(4, 2), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match=message):
        linear_probe(x, y, x, y, **setting)


# --- data ----------------------------------------------------------------------------------------------------


def test_scan_imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    for rel in ("train/b/x.png", "train/a/deep/y.JPG", "train/a/z.png", "val/b/v.png"):
        write_square(tmp_path / rel, (0, 0, 0), rng)
    (tmp_path / "train/a/notes.txt").write_text("not an image")
    (tmp_path / "train/a/._z.png").write_bytes(b"macOS resource fork")
    ds = scan_imagefolder(tmp_path)
    assert ds.classes == ("a", "b")
    assert [p.relative_to(tmp_path).as_posix() for p in ds.train.paths] == [
        "train/a/z.png",
        "train/a/deep/y.JPG",
        "train/b/x.png",
    ]  # folder by folder, top-down, as torchvision's ImageFolder orders them
    assert ds.train.labels.tolist() == [0, 0, 1]
    assert ds.val.labels.tolist() == [1]  # val may cover a subset of the classes


@pytest.mark.parametrize(
    "layout, error, message",
    [
        ({}, FileNotFoundError, r"Dataset .*missing does not exist; expected an ImageFolder layout"),
        ({"train/a/1.png", "train/b/1.png"}, FileNotFoundError, r"val does not exist; expected an ImageFolder"),
        ({"train/a/1.png", "train/b/1.png", "val/a/readme.txt"}, ValueError, r"val holds no images .* in class"),
        ({"train/a/1.png", "val/a/1.png"}, ValueError, r"has only one class \('a'\); a linear probe needs at least"),
        ({"train/a/1.png", "train/b/1.png", "val/c/1.png"}, ValueError, r"Val class\(es\) \['c'\] .* not train"),
        ({"train/a/1.png", "train/b/x.txt", "val/a/1.png"}, ValueError, r"folder\(s\) \['b'\] .* hold no images"),
    ],
    ids=["missing-root", "missing-split", "split-without-images", "one-class", "val-class-not-in-train", "empty-class"],
)
def test_scan_imagefolder_errors(tmp_path, layout, error, message):
    rng = np.random.default_rng(0)
    root = tmp_path / "data" if layout else tmp_path / "missing"
    for rel in layout:
        if rel.endswith(".png"):
            write_square(root / rel, (0, 0, 0), rng)
        else:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text("x")
    with pytest.raises(error, match=message):
        scan_imagefolder(root)


def test_model_spec_parsing():
    assert ModelSpec.parse("ckpt") == ModelSpec(path="ckpt")
    assert ModelSpec.parse("ckpt::lora") == ModelSpec(path="ckpt", adapter="lora")
    assert ModelSpec.parse("teacher:c-radio-v3-l") == ModelSpec(teacher="c-radio-v3-l")
    assert ModelSpec.parse("teacher:dinov2-vitl14::w.pth").teacher_path == "w.pth"
    with pytest.raises(ValueError, match="names no teacher"):
        ModelSpec.parse("teacher:")
    with pytest.raises(ValueError, match="write DIR or DIR::ADAPTER"):
        ModelSpec.parse("::lora")


# --- features ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [2, LLM_LAYERS])  # a middle block, and the last (hooked on the final norm)
def test_vla_features_are_mean_visual_hidden_states(ckpt, data, layer):
    paths = scan_imagefolder(data).val.paths[:3]
    feats = extract_features(str(ckpt), paths, layer=layer, batch_size=2)
    assert feats.shape == (3, 64) and feats.dtype == np.float32

    vla = load_vla(ckpt)
    images = [Image.open(p).convert("RGB") for p in paths]
    with torch.no_grad():
        out = vla.model(**vla.batch([DEFAULT_PROMPT] * 3, images), output_hidden_states=True)
    n = out.projector_features.shape[1]
    expected = out.hidden_states[layer][:, 1 : 1 + n].mean(1)
    torch.testing.assert_close(torch.from_numpy(feats), expected, rtol=1e-4, atol=1e-5)

    # Visual tokens precede the text under causal attention, so the prompt cannot change them.
    other = extract_features(str(ckpt), paths, layer=layer, prompt="In: Pick up the cup.\nOut:")
    np.testing.assert_allclose(other, feats, rtol=1e-5, atol=1e-6)


def test_layer_out_of_range(ckpt, data):
    with pytest.raises(ValueError, match=r"--layer 5 is out of range .* layers run from 1 to 4"):
        extract_features(str(ckpt), scan_imagefolder(data).val.paths[:1], layer=5)


@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
def test_teacher_features(data):
    paths = scan_imagefolder(data).val.paths
    feats = extract_features("teacher:c-radio-v3-l", paths, teacher_kwargs=TINY_TEACHER)
    assert feats.shape == (len(paths), TINY_ARCH["embed_dim"])
    again = extract_features("teacher:c-radio-v3-l", paths, teacher_kwargs=TINY_TEACHER)
    np.testing.assert_array_equal(again, feats)  # random smoke-test weights are seeded: the cache stays valid
    # a multi-view teacher (VGGT) probes each image as a one-camera sample
    vggt = extract_features("teacher:vggt-1b", paths, teacher_kwargs={**TINY_TEACHER, "resolution": 224})
    assert vggt.shape == (len(paths), 2 * TINY_ARCH["embed_dim"]) and np.isfinite(vggt).all()


# --- end to end ----------------------------------------------------------------------------------------------


def _cache_file(cache, split):
    (path,) = cache.glob(f"*-{split}.npy")
    return path


def test_end_to_end_with_cache(ckpt, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="openvla_align.probe")
    data = make_imagefolder(tmp_path / "data")
    out = tmp_path / "out" / "probe.json"
    cache = tmp_path / "out" / "feature_cache"

    first = run_linear_probe(data, [str(ckpt)], out=out, layer=2, **FAST)
    r = json.loads(out.read_text())["results"][str(ckpt)]
    assert r == first["results"][str(ckpt)]
    assert r["top1"] == 1.0  # colour is linearly decodable even from random features; chance is 1/3
    assert (r["n_train"], r["n_val"], r["classes"], r["feature_dim"]) == (12, 6, sorted(COLOURS), 64)
    assert r["settings"]["epochs"] == FAST["epochs"] and r["settings"]["dtype"] == "float32"
    assert r["cache"] == {"train": "extracted", "val": "extracted"}
    assert "only 60 optimiser steps" in caplog.text  # 12 images: the run says the defaults would not suffice
    train_feats = np.load(_cache_file(cache, "train"))
    assert train_feats.shape == (12, 64)
    key = json.loads(_cache_file(cache, "train").with_suffix(".json").read_text())["key"]
    assert key["layer"] == 2 and key["adapter"] is None and len(key["data"]["files"]) == 12

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(linear, "extract_features", no_extraction)
        m.setattr(features, "_VLAEncoder", no_extraction)  # not even the model is loaded
        again = run_linear_probe(data, [str(ckpt)], out=out, layer=2, epochs=30, lr=0.05, batch_size=4)
    assert again["results"][str(ckpt)]["cache"] == {"train": "hit", "val": "hit"}
    assert again["results"][str(ckpt)]["settings"]["epochs"] == 30

    write_square(data / "val" / "red" / "new.png", COLOURS["red"], np.random.default_rng(9))
    grown = run_linear_probe(data, [str(ckpt)], out=out, layer=2, **FAST)["results"][str(ckpt)]
    assert grown["cache"] == {"train": "hit", "val": "re-extracted (stale)"}
    assert grown["n_val"] == 7
    assert "images: 1 added, 0 removed, 0 modified" in caplog.text

    blob = bytearray(_cache_file(cache, "train").read_bytes())
    blob[-5] ^= 0xFF  # a flipped bit in the data: numpy would load it without complaint
    _cache_file(cache, "train").write_bytes(bytes(blob))
    caplog.clear()
    repaired = run_linear_probe(data, [str(ckpt)], out=out, layer=2, **FAST)["results"][str(ckpt)]
    assert repaired["cache"] == {"train": "re-extracted (corrupt)", "val": "hit"}
    assert "corrupt (its sha256 does not match" in caplog.text
    np.testing.assert_array_equal(np.load(_cache_file(cache, "train")), train_feats)

    _cache_file(cache, "val").with_suffix(".json").write_text('{"key": ')
    assert run_linear_probe(data, [str(ckpt)], out=out, layer=2, **FAST)["results"][str(ckpt)]["cache"] == {
        "train": "hit",
        "val": "re-extracted (corrupt)",
    }
    assert not list(cache.glob(".*tmp"))  # atomic writes leave no temporaries behind


@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
def test_vla_and_teacher_comparison(ckpt, data, tmp_path):
    teacher = "teacher:c-radio-v3-l"
    report = run_linear_probe(
        data, [str(ckpt), teacher], out=tmp_path / "r.json", layer=2, teacher_kwargs=TINY_TEACHER, **FAST
    )
    assert list(report["results"]) == [str(ckpt), teacher]
    t = report["results"][teacher]
    assert (t["kind"], t["feature_dim"], t["n_val"]) == ("teacher", TINY_ARCH["embed_dim"], 6)
    assert t["top1"] == 1.0
    table = comparison_table(report).splitlines()
    assert table[0] == "| model | features | dim | top-1 (%) | train top-1 (%) |"
    assert table[2] == f"| {ckpt} | layer 2 | 64 | 100.00 | 100.00 |"
    assert table[3] == f"| {teacher} | teacher | 32 | 100.00 | 100.00 |"


# --- CLI -----------------------------------------------------------------------------------------------------


def cli(argv):
    parser = argparse.ArgumentParser(prog="openvla-align probe")
    add_parser(parser.add_subparsers(dest="probe_command", required=True))
    args = parser.parse_args(["linear", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def adapter(ckpt, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        load_vla(ckpt).model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    )
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return path


def test_cli_compares_base_and_adapter(ckpt, adapter, data, tmp_path, capsys):
    out = tmp_path / "probe" / "results.json"
    spec = f"{ckpt}::{adapter}"
    argv = ["--data", str(data), "--model", str(ckpt), "--model", spec, "--layer", "3", "--out", str(out)]
    plot = tmp_path / "probe" / "top1.png"
    fast = ["--epochs", "60", "--lr", "0.05", "--batch-size", "0", "--device", "cpu", "--plot", str(plot)]
    assert cli([*argv, *fast]) == 0
    printed = capsys.readouterr().out
    assert plot.stat().st_size > 5_000 and f"wrote {plot}" in printed
    assert f"{ckpt}: top-1 100.00% (train 100.00%) on 6 val images, 3 classes, 12 train; 64-d features" in printed
    assert f"| {spec} | layer 3 | 64 |" in printed and "|---|---|---:|---:|---:|" in printed
    report = json.loads(out.read_text())
    assert report["results"][spec]["adapter"] == str(adapter)
    assert len(list((out.parent / "feature_cache").glob("*.npy"))) == 4  # base and adapter cached apart


@pytest.mark.parametrize(
    "argv, message, status",
    [
        ([], "Nothing to probe: give --model DIR", 1),
        (["--teacher-path", "w.pth"], "--teacher-path needs one teacher to belong to: --teacher NAME", 1),
        (
            ["--model", "{ckpt}", "--model", "{tmp}", "--adapter", "{tmp}"],
            "with 2 VLA --model: write each model as DIR::",
            1,
        ),
        (["--model", "{tmp}/nope"], r"model .*nope' does not exist", 1),
        (["--model", "{ckpt}::{tmp}"], "has no adapter_config.json", 1),
        (["--teacher", "no-such-teacher"], "Unknown teacher 'no-such-teacher'. Known teachers: .*c-radio-v3-l", 1),
        (["--model", "{ckpt}", "--model", "{ckpt}"], "given more than once", 1),
        (["--model", "{ckpt}", "--epochs", "0"], "argument --epochs: must be a positive integer, got 0", 2),
        (["--model", "{ckpt}", "--layer", "0"], "argument --layer: must be a positive integer, got 0", 2),
        (["--model", "{ckpt}", "--data", "{tmp}/none"], "argument --data: directory .*none' does not exist", 2),
        (["--model", "{ckpt}", "--data", "{tmp}/empty"], r"empty/train does not exist; ", 1),
        # a teacher that cannot load fails before the VLA's features are extracted and cached
        (
            ["--model", "{ckpt}", "--model", "teacher:demo-scenes::{tmp}/bad.safetensors"],
            "does not hold its weights",
            1,
        ),
    ],
)
def test_cli_errors(ckpt, data, tmp_path, argv, message, status, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.safetensors").write_bytes(b"\0" * 64)
    argv = [a.format(tmp=tmp_path, ckpt=ckpt) for a in argv]
    command = ["probe", "linear", "--data", str(data), "--out", str(tmp_path / "r.json"), *argv]
    cli_fails(capsys, command, message, status=status)
    assert not (tmp_path / "r.json").exists() and not list(tmp_path.glob("feature_cache/*"))
