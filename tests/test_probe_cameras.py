"""Multi-camera models in the diagnostics (`--num-images`, `--images`), on the tiny model in OpenVLA-OFT's input layout
(``num_images_in_input``: 6 channels per camera, each camera's tokens in turn). The same paths on OFT's own class and
checkpoints: tests/test_oft_probes.py."""

import numpy as np
import pytest
import torch
from assets import write_image_folder

from openvla_align.probe import feature_cache
from openvla_align.probe.attention import attention_maps
from openvla_align.probe.features import ModelSpec, extract_features
from openvla_align.tiny import build_tiny_vla, build_tokenizer, save_tiny_checkpoint
from openvla_align.vla.checkpoint import CameraView, load_vla

LAYER = 3
PROMPT = "In: What is in the image?\nOut:"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same weights saved in OpenVLA's layout and in OFT's (2 cameras): 4 blocks, 112 px = 8x8 tokens a camera."""
    tok = build_tokenizer()
    root = tmp_path_factory.mktemp("cams")
    kwargs = dict(vocab_size=len(tok), llm_layers=4, image_size=112)
    save_tiny_checkpoint(root / "openvla", build_tiny_vla(**kwargs), tok)
    save_tiny_checkpoint(root / "oft", build_tiny_vla(num_images_in_input=2, **kwargs), tok)
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return sorted(write_image_folder(tmp_path_factory.mktemp("img"), n_train=3, n_val=1, size=64).glob("train/*/*.png"))


def test_the_view_feeds_every_camera_and_selects_tokens(checkpoints, images):
    from PIL import Image

    oft = load_vla(checkpoints / "oft", num_images=2)
    assert oft.num_images == 2
    pils = [Image.open(p) for p in images[:2]]
    pixels = oft.pixel_values(pils)
    assert pixels.shape == (2, 12, 112, 112) and torch.equal(pixels[:, :6], pixels[:, 6:])
    visual = torch.arange(2 * 128 * 3, dtype=torch.float32).reshape(2, 128, 3)
    assert torch.equal(oft.select_images(visual, "all"), visual)
    assert torch.equal(oft.select_images(visual, "primary"), visual[:, :64])
    with pytest.raises(ValueError, match="choose one of"):
        oft.select_images(visual, "wrist")


def test_features_pool_the_chosen_cameras_tokens(checkpoints, images):
    """--images primary on a 2-camera model = the first camera's tokens; the first camera alone, at position 1..64,
    is what a 1-camera model sees, so its features equal the model set to one camera up to the other camera's
    influence (none: the tiny model's attention is causal and the first camera comes first)."""
    feats = {
        which: extract_features(
            str(checkpoints / "oft"), images, layer=LAYER, prompt=PROMPT, workers=0, view=CameraView(2, which)
        )
        for which in ("all", "primary")
    }
    one = extract_features(str(checkpoints / "oft"), images, layer=LAYER, prompt=PROMPT, workers=0, view=CameraView(1))
    np.testing.assert_allclose(feats["primary"], one, rtol=0, atol=1e-6)
    assert np.abs(feats["all"] - feats["primary"]).max() > 1e-4


def test_attention_map_sums_or_picks_the_cameras_grids(checkpoints, images):
    vla = load_vla(checkpoints / "oft", num_images=2)
    both = attention_maps(vla, images[0], PROMPT, [LAYER], images="all")
    first = attention_maps(vla, images[0], PROMPT, [LAYER], images="primary")
    assert both.maps.shape == first.maps.shape == (1, 8, 8)
    assert float(both.maps.sum()) == pytest.approx(float(both.visual_mass[0]), rel=1e-5)
    assert 0 < float(first.maps.sum()) < float(both.maps.sum())
    assert float(both.visual_mass[0] + both.bos_mass[0] + both.text_mass[0]) == pytest.approx(1.0, abs=1e-5)


def test_feature_cache_key_names_a_non_default_view_only():
    spec = ModelSpec(path="/m")
    plain = feature_cache.model_key(spec, 16, PROMPT, "float32", None)
    assert plain == feature_cache.model_key(spec, 16, PROMPT, "float32", None, CameraView())  # old entries still hit
    oft = feature_cache.model_key(spec, 16, PROMPT, "float32", None, CameraView(2, "primary"))
    assert oft["cameras"] == {"num_images": 2, "images": "primary"} and oft != plain


def test_bad_camera_settings_are_refused(checkpoints):
    with pytest.raises(ValueError, match="openvla models take one image per sample, not 2"):
        load_vla(checkpoints / "openvla", num_images=2)
    with pytest.raises(ValueError, match="--images 'wrist'"):
        CameraView(2, "wrist")
    with pytest.raises(ValueError, match="at least 1 image"):
        CameraView(0)
