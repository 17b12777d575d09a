import argparse
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from openvla_align.cli import main
from openvla_align.probe import load_vla, vqa_prompt
from openvla_align.probe.tsne import (
    add_parser,
    class_prompt,
    collect_features,
    find_images,
    knn_loo_accuracy,
    object_positions,
    run_tsne,
    separability,
    silhouette,
    tsne_2d,
)
from openvla_align.tiny import build_tiny_vla, save_tiny_checkpoint

CLASSES = {"cup": (220, 40, 40), "bottle": (40, 200, 60), "knife": (40, 60, 230)}
PER_CLASS = 6
LLM_LAYERS = 6  # a shallower tiny LLM keeps 18 images x 2 features fast on CPU


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tsne_ckpt")
    save_tiny_checkpoint(path, build_tiny_vla(seed=0, vocab_size=len(tokenizer), llm_layers=LLM_LAYERS), tokenizer)
    return path


@pytest.fixture(scope="module")
def vla(ckpt):
    return load_vla(ckpt)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 classes x 6 small PNGs (a coloured square on a random background), plus a .jpg and a stray text file."""
    root = tmp_path_factory.mktemp("tsne_data")
    rng = np.random.default_rng(0)
    for name, colour in CLASSES.items():
        (root / name).mkdir()
        for i in range(PER_CLASS):
            img = np.empty((48, 48, 3), np.uint8)
            img[:] = rng.integers(80, 160, 3)
            x, y = rng.integers(4, 28, 2)
            img[y : y + 16, x : x + 16] = colour
            ext = "jpg" if i == 0 else "png"
            Image.fromarray(img).save(root / name / f"{i}.{ext}")
        (root / name / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    return root


def clustered(n_per_class=20, n_classes=3, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), n_per_class)
    x = rng.normal(0, 0.3, (len(y), dim))
    x[np.arange(len(y)), y] += 5.0  # each class sits far along its own axis
    return x, y


def test_separability_scores_on_constructed_embeddings():
    x, y = clustered()
    s = separability(x, y)
    assert s["knn_accuracy"] == 1.0 and s["k"] == 5 and s["chance"] == pytest.approx(1 / 3)
    assert s["silhouette"] > 0.7
    assert separability(x, y, metric="cosine")["knn_accuracy"] == 1.0

    rng = np.random.default_rng(1)
    noise = rng.normal(size=(300, 16))
    labels = rng.integers(0, 3, 300)
    s = separability(noise, labels)
    assert abs(s["knn_accuracy"] - 1 / 3) < 0.12
    assert abs(s["silhouette"]) < 0.05
    shuffled = rng.permutation(y)
    assert separability(x, shuffled)["knn_accuracy"] < 0.6


def test_knn_small_sets_and_ties():
    # 4 samples: k is clamped to 3; each point's neighbours are its twin plus the other pair's two points.
    x = np.array([[0.0], [0.1], [10.0], [10.1]])
    acc, k = knn_loo_accuracy(x, np.array([0, 0, 1, 1]), k=5)
    assert k == 3 and acc == 0.0  # the other class outvotes the twin 2:1
    acc, k = knn_loo_accuracy(x, np.array([0, 0, 1, 1]), k=1)
    assert (acc, k) == (1.0, 1)
    # A 1:1 tie goes to the nearer neighbour's class.
    x = np.array([[0.0], [1.0], [-3.0], [50.0], [51.0], [47.0]])
    acc, _ = knn_loo_accuracy(x, np.array([0, 0, 1, 1, 1, 0]), k=2)
    assert acc == pytest.approx(4 / 6)  # breaking ties by lowest label instead would give 2 / 6


def test_silhouette_matches_sklearn():
    from sklearn.metrics import silhouette_score

    x, y = clustered(n_per_class=7, seed=3)
    x += np.random.default_rng(4).normal(0, 2.0, x.shape)  # overlapping clusters: a non-trivial value
    y[0] = 9  # a singleton class scores 0, as in sklearn
    for metric in ("euclidean", "cosine"):
        assert silhouette(x, y, metric) == pytest.approx(silhouette_score(x, y, metric=metric), abs=1e-7)
    assert silhouette(x, np.zeros(len(y), int)) is None


def test_tsne_2d_clamps_perplexity_and_is_seeded():
    x, y = clustered(n_per_class=4)
    a, perp = tsne_2d(x, seed=0)
    b, _ = tsne_2d(x, seed=0)
    assert a.shape == (12, 2) and perp == pytest.approx(11 / 3)
    np.testing.assert_allclose(a, b)


def test_features_shapes_and_object_tokens(vla, data):
    f = collect_features(vla, data, "cup,bottle,knife", "1,6", batch_size=4)
    assert f.layers == [1, 6] and f.classes == list(CLASSES)
    assert f.features[1].shape == (3 * PER_CLASS, 64) and f.features[6].dtype == np.float32
    assert f.labels.tolist() == [0] * PER_CLASS + [1] * PER_CLASS + [2] * PER_CLASS
    assert f.paths[0].endswith("cup/0.jpg") and not any(p.endswith(".txt") for p in f.paths)
    assert f.object_tokens == {"cup": ["Ġcup"], "bottle": ["Ġbottle"], "knife": ["Ġknife"]}

    # The object-token feature is the hidden state at the word's sequence position (prompt index + 256 visual).
    import torch

    prompt = vqa_prompt("Do you see knife?")
    pos = object_positions(vla.tokenizer, prompt, "knife", "knife")
    batch = vla.batch([prompt], [Image.open(data / "knife" / "3.png").convert("RGB")])
    with torch.no_grad():
        hs = vla.model(**batch, output_hidden_states=True).hidden_states
    np.testing.assert_allclose(f.features[6][2 * PER_CLASS + 3], hs[6][0, pos[0] + 256].numpy(), rtol=1e-4, atol=1e-5)

    v = collect_features(vla, data, ["knife"], [2], feature="visual-mean")
    np.testing.assert_allclose(v.features[2][3], hs[2][0, 1:257].mean(0).numpy(), rtol=1e-4, atol=1e-5)
    assert v.object_tokens == {}


def test_run_tsne_writes_png_json_and_cli(vla, ckpt, data, tmp_path, capsys):
    out = tmp_path / "tsne.png"
    summary = run_tsne(vla, data, "cup,bottle,knife", "1,6", out)
    assert out.stat().st_size > 20_000
    on_disk = json.loads(out.with_suffix(".json").read_text())
    assert on_disk["counts"] == {c: PER_CLASS for c in CLASSES}
    assert set(on_disk["layers"]) == {"1", "6"} and on_disk["layers"]["6"]["k"] == 5
    assert np.asarray(on_disk["points"]["1"]).shape == (3 * PER_CLASS, 2)
    assert on_disk["tsne"]["perplexity"] == pytest.approx(17 / 3)
    assert summary["layers"]["1"]["knn_accuracy"] == on_disk["layers"]["1"]["knn_accuracy"]

    cli_out = tmp_path / "cli" / "visual.png"
    argv = "probe tsne --classes cup,knife --layers 3 --feature visual-mean --device cpu --dtype float32".split()
    assert main([*argv, "--model", str(ckpt), "--data", str(data), "--out", str(cli_out)]) == 0
    printed = capsys.readouterr().out
    assert "5-NN acc" in printed and "silhouette" in printed
    assert cli_out.stat().st_size > 10_000
    assert json.loads(cli_out.with_suffix(".json").read_text())["feature"] == "visual-mean"


def test_data_errors(vla, data, tmp_path):
    with pytest.raises(ValueError, match=r"\['plate'\].*Available classes: bottle, cup, empty, knife"):
        find_images(data, ["cup", "plate"])
    with pytest.raises(ValueError, match=r"'empty'.*has no images.*\.png"):
        find_images(data, ["cup", "empty"])
    with pytest.raises(FileNotFoundError, match="not a directory"):
        find_images(tmp_path / "nowhere", ["cup"])
    with pytest.raises(ValueError, match=r"out of range.*6 decoder blocks"):
        collect_features(vla, data, "cup,bottle", "1,7")
    with pytest.raises(ValueError, match="more than once"):
        collect_features(vla, data, "cup,cup", "1")
    with pytest.raises(ValueError, match=r"exactly one '\{\}'"):
        class_prompt("cup", "Is there a cup?")
    assert class_prompt("coke_can") == ("In: Do you see coke can?\nOut:", "coke can")

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(
        [
            "tsne",
            "--model",
            str(tmp_path / "no_model"),
            "--data",
            str(data),
            "--classes",
            "cup,spoon",
            "--layers",
            "1",
            "--out",
            str(tmp_path / "x.png"),
        ]
    )
    with pytest.raises(ValueError, match="spoon"):  # the data is checked before loading any model
        args.func(args)


class NoOffsets:
    """A tokenizer whose offsets cover nothing (as some slow/legacy tokenizers report them)."""

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, text, **kwargs):
        enc = self._tok(text, **kwargs)
        if "offset_mapping" in enc:
            enc["offset_mapping"] = [(0, 0)] * len(enc["input_ids"])
        return enc

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_unlocatable_object_word_names_the_tokens(vla, data):
    blind = dataclasses.replace(vla, tokenizer=NoOffsets(vla.tokenizer))
    with pytest.raises(ValueError, match=r"Class 'bottle'.*'bottle'.*'Ġbottle'.*--feature visual-mean"):
        collect_features(blind, data, "bottle,cup", "1")
    # visual-mean does not need the word, so the same tokenizer works there.
    assert collect_features(blind, data, "bottle", "1", feature="visual-mean").features[1].shape == (PER_CLASS, 64)
