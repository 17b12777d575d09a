"""The diagnostics (`probe linear`, `probe attention`, `probe tsne`) on an OpenVLA-OFT checkpoint: OFT's own model class
(``OPENVLA_OFT_SRC``) with its transformers fork, set to two cameras as OFT's deploy code does.

What is checked against OFT itself: the probe's features are the mean of OFT's ``output.hidden_states[L]`` over every
camera's visual tokens (or the first camera's), and the attention the diagnostics read (eager, the only kind that
returns weights) is the fork's bidirectional attention, not the causal attention eager has in the fork.
Opt-in like the other OFT tests; ``scripts/test.sh`` runs it in its OFT phase.
"""

import json
import os
import subprocess
import sys

import numpy as np
import oft_assets as A
import pytest
import torch
from assets import write_image_folder

from openvla_align.cli import main
from openvla_align.tiny.data import SHAPES
from openvla_align.vla.checkpoint import CameraView, load_vla

pytestmark = pytest.mark.skipif(A.oft_unavailable() is not None, reason=str(A.oft_unavailable()))

LAYER = 16
PROMPT = "In: What is in the image?\nOut:"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    A.oft_src()
    return A.build_tiny_oft_checkpoint(tmp_path_factory.mktemp("oft") / "tiny-oft", seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("shapes"), n_train=12, n_val=6, size=64)  # every shape in both


def oft_model(checkpoint, attn_implementation):
    """OFT's class as its deploy code loads it (no openvla-align code involved), set to 2 cameras."""
    from transformers import AutoModelForVision2Seq

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    vla = AutoModelForVision2Seq.from_pretrained(
        checkpoint, torch_dtype=torch.float32, trust_remote_code=True, **kwargs
    ).eval()
    vla.vision_backbone.set_num_images_in_input(2)
    return vla


def oft_inputs(checkpoint, pils):
    """OFT's inputs for one image per sample shown to both cameras: its processor's 6 channels, twice."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    pixels = processor.image_processor(pils, return_tensors="pt")["pixel_values"]
    ids = processor.tokenizer([PROMPT] * len(pils), return_tensors="pt").input_ids
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=torch.cat([pixels, pixels], dim=1),
        labels=torch.full_like(ids, -100),  # OFT's forward finds its action tokens in the labels: none here
    )


def pils(folder, n=3):
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in sorted(folder.rglob("*.png"))[:n]]


def test_features_are_oft_hidden_states_of_every_camera_or_the_first(checkpoint, images):
    from openvla_align.probe.features import extract_features

    paths = sorted((images / "train").rglob("*.png"))[:3]
    batch = oft_inputs(checkpoint, pils(images / "train"))
    with torch.no_grad():
        out = oft_model(checkpoint, None)(**batch, output_hidden_states=True)
    hidden = out.hidden_states[LAYER].float()
    assert hidden.shape[1] == 1 + 2 * 256 + batch["input_ids"].shape[1] - 1  # BOS, both cameras' tokens, the prompt
    want = {"all": hidden[:, 1 : 1 + 512].mean(1), "primary": hidden[:, 1 : 1 + 256].mean(1)}
    for which, expected in want.items():
        got = extract_features(str(checkpoint), paths, layer=LAYER, prompt=PROMPT, workers=0, view=CameraView(2, which))
        np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-7)  # the same computation, hooked
    # each camera shows the same image, so the cameras' tokens differ by their positions only (~1e-5 here)
    assert (want["all"] - want["primary"]).abs().max() > 1e-6


def test_eager_attention_is_the_forks_bidirectional_attention(checkpoint, images):
    """load_vla gives eager attention the fork's mask: its hidden states equal OFT's SDPA ones; plain eager (causal
    in the fork too) does not, so the diagnostics would otherwise read attention OFT never computed."""
    batch = oft_inputs(checkpoint, pils(images / "val", 2))
    with torch.no_grad():
        sdpa = oft_model(checkpoint, None)(**batch, output_hidden_states=True).hidden_states[LAYER]
        causal = oft_model(checkpoint, "eager")(**batch, output_hidden_states=True).hidden_states[LAYER]
        vla = load_vla(checkpoint, attn_implementation="eager", num_images=2)
        assert (vla.num_images, vla.needs_labels, vla.attn_implementation()) == (2, True, "eager")
        ours = vla.model(**batch, output_hidden_states=True).hidden_states[LAYER]
    torch.testing.assert_close(ours, sdpa, rtol=1e-4, atol=1e-5)
    assert (causal - sdpa).abs().max() > 1e-3


def test_attention_map_of_every_camera_or_the_first(checkpoint, images):
    from openvla_align.probe.attention import attention_maps

    vla = load_vla(checkpoint, attn_implementation="eager", num_images=2)
    image = sorted((images / "val").rglob("*.png"))[0]
    both = attention_maps(vla, image, PROMPT, [LAYER], images="all")
    first = attention_maps(vla, image, PROMPT, [LAYER], images="primary")
    assert both.maps.shape == first.maps.shape == (1, 16, 16) and both.cameras == 2
    assert float(both.maps.sum()) == pytest.approx(float(both.visual_mass[0]), rel=1e-5)  # the grids summed
    assert 0 < float(first.maps.sum()) < float(both.maps.sum())


def test_probe_commands_read_an_oft_checkpoint(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "linear.json"
    args = ["probe", "linear", "--data", str(images), "--model", str(checkpoint), "--layer", str(LAYER)]
    assert main([*args, "--num-images", "2", "--images", "primary", "--epochs", "5", "--out", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"].values()
    assert result["cameras"] == {"num_images": 2, "images": "primary"} and result["feature_dim"] == 64
    assert "primary camera images' tokens" in result["feature"] and result["n_val"] == 6

    image = sorted((images / "val").rglob("*.png"))[0]
    png = tmp_path / "attention.png"
    args = ["probe", "attention", "--model", str(checkpoint), "--image", str(image), "--prompt", "what is it"]
    assert main([*args, "--layers", "15-16", "--num-images", "2", "--out", str(png)]) == 0
    summary = json.loads(png.with_suffix(".json").read_text())
    assert summary["grid"] == [16, 16] and summary["cameras"] == {"num_images": 2, "map": "all"}
    for layer in summary["layers"].values():  # the shares of one attention row, both cameras' in the visual one
        assert layer["visual_mass"] + layer["bos_mass"] + layer["text_mass"] == pytest.approx(1.0, abs=1e-4)

    png = tmp_path / "tsne.png"
    args = ["probe", "tsne", "--model", str(checkpoint), "--data", str(images / "train"), "--classes", ",".join(SHAPES)]
    argv = [*args, "--layers", "16", "--feature", "visual-mean", "--num-images", "2", "--images", "primary"]
    assert main([*argv, "--out", str(png)]) == 0
    summary = json.loads(png.with_suffix(".json").read_text())
    assert summary["cameras"] == {"num_images": 2, "images": "primary"} and png.is_file()
    assert sum(summary["counts"].values()) == 12
    capsys.readouterr()


def test_oft_checkpoint_without_ofts_package_says_where_to_get_it(checkpoint):
    """Without OFT's `prismatic` importable, transformers would ask for `pip install prismatic` (another project):
    the loader names OFT's checkout instead, before loading anything."""
    code = f"from openvla_align.vla.checkpoint import load_vla; load_vla({str(checkpoint)!r})"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OPENVLA_OFT_SRC")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=checkpoint)
    assert proc.returncode != 0
    assert "OpenVLA-OFT checkpoint" in proc.stderr and "PYTHONPATH=/path/to/openvla-oft" in proc.stderr
