"""OpenVLA's action tokens (``vla/actions.py``) and how a checkpoint of another model class finds its loader."""

import json

import numpy as np
import pytest
import torch

from openvla_align.tiny import build_tiny_vla, build_tokenizer, save_tiny_checkpoint
from openvla_align.vla.actions import ActionDecoder, ActionTokenizer
from openvla_align.vla.checkpoint import action_prompt, load_vla, vqa_prompt

from conftest import install_entry_points


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = build_tokenizer()
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_checkpoint(path, build_tiny_vla(seed=3, vocab_size=len(tok), image_size=64), tok)
    return path


def test_the_action_prompt_is_openvlas():
    assert action_prompt("open the drawer") == "In: What action should the robot take to open the drawer?\nOut:"
    assert action_prompt("x") == vqa_prompt("What action should the robot take to x?")


def test_action_bins_round_trip_on_the_top_256_ids():
    act = ActionTokenizer(1000)
    ids = act.encode(np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0, -3.0]))
    assert all(1000 - 256 <= i < 1000 for i in ids) and ids[0] == ids[-1] and ids[4] == ids[5]  # clipped
    np.testing.assert_allclose(act.decode(ids)[:5], [-1, -0.5, 0, 0.5, 1], atol=1 / 255)


def test_decoder_any_length_cached_or_not_batched_or_alone(checkpoint):
    loaded = load_vla(checkpoint)
    images = torch.randn(3, 6, 64, 64)
    for n in (1, 2, 7):
        decoder = ActionDecoder(loaded, n_tokens=n)
        rows = decoder.rows(["push the block", "pick up the red cup and put it on the plate", "open"])
        cached = decoder.decode(rows, images)
        assert cached.shape == (3, n) and ((cached >= decoder.first) & (cached < decoder.vocab_size)).all()
        np.testing.assert_array_equal(cached, decoder.decode(rows, images, kv_cache=False))
        alone = np.concatenate([decoder.decode(rows[i : i + 1], images[i : i + 1]) for i in range(3)])
        np.testing.assert_array_equal(cached, alone)
        np.testing.assert_array_equal(decoder.first_tokens(rows, images), cached[:, 0])
    with pytest.raises(ValueError, match="n_tokens must be >= 1"):
        ActionDecoder(loaded, n_tokens=0)


def test_a_checkpoint_class_registered_by_an_installed_package_loads(checkpoint, tmp_path, monkeypatch):
    """A model class of another package: its config.json model_type, its loader an entry point of the group."""
    ckpt = tmp_path / "other"
    ckpt.mkdir()
    for f in checkpoint.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "standin_vla"}))
    with pytest.raises(ValueError, match="is not an OpenVLA checkpoint"):
        load_vla(ckpt)  # nothing registered for the type yet: the stock OpenVLA path refuses it
    (tmp_path / "standin_loader.py").write_text(
        "from openvla_align.tiny.model import load_tiny_checkpoint\n"
        "CALLS = []\n"
        "def load(path, attn_implementation=None):\n"
        "    CALLS.append(str(path))\n"
        "    return load_tiny_checkpoint(path, attn_implementation)\n"
    )
    install_entry_points(
        tmp_path, monkeypatch, "openvla_align.checkpoint_loaders", {"standin_vla": "standin_loader:load"}
    )
    loaded = load_vla(ckpt)
    import standin_loader

    assert standin_loader.CALLS == [str(ckpt)] and loaded.image_size == 64
