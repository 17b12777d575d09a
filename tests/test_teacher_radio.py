"""C-RADIOv3 teachers: the built-in ViT against timm's RADIO port, weight formats, lookup and errors.

Everything runs on tiny random weights written in RADIO's own checkpoint layouts; nothing is downloaded.
The torch.hub test runs only when RADIO_SRC points at a checkout of NVlabs/RADIO (and einops is installed).
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from openvla_align.teachers import TeacherWeightsNotFound, radio, teacher_spec
from openvla_align.tiny.model import TINY_VIT

WIDTH, DEPTH, HEADS, MLP, PREFIX, GRID = 32, 2, 2, 64, 8, 128
ARCH = dict(TINY_VIT)
assert (ARCH["embed_dim"], ARCH["depth"], ARCH["num_heads"]) == (WIDTH, DEPTH, HEADS)

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


def tiny_radio_parts(seed=0, layer_scale=True):
    """(backbone tensors with RADIO's key names, conditioner mean/std, feature normalizer mean/tx)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    bb = {
        "patch_generator.embedder.weight": rnd(WIDTH, 3 * 16 * 16, scale=0.05),
        "patch_generator.pos_embed": rnd(1, GRID * GRID, WIDTH, scale=0.5),
        "patch_generator.cls_token.token": rnd(PREFIX, WIDTH, scale=0.5),
        "reg_token": rnd(1, 4, WIDTH),  # timm leftover RADIO keeps in its backbone but never uses
    }
    for i in range(DEPTH):
        p = f"blocks.{i}."
        bb.update(
            {
                p + "norm1.weight": 1 + rnd(WIDTH),
                p + "norm1.bias": rnd(WIDTH),
                p + "attn.qkv.weight": rnd(3 * WIDTH, WIDTH),
                p + "attn.qkv.bias": rnd(3 * WIDTH),
                p + "attn.proj.weight": rnd(WIDTH, WIDTH),
                p + "attn.proj.bias": rnd(WIDTH),
                p + "norm2.weight": 1 + rnd(WIDTH),
                p + "norm2.bias": rnd(WIDTH),
                p + "mlp.fc1.weight": rnd(MLP, WIDTH),
                p + "mlp.fc1.bias": rnd(MLP),
                p + "mlp.fc2.weight": rnd(WIDTH, MLP),
                p + "mlp.fc2.bias": rnd(WIDTH),
            }
        )
        if layer_scale:
            bb[p + "ls1.grandma"] = 0.5 + rnd(WIDTH)
            bb[p + "ls2.grandma"] = 0.5 + rnd(WIDTH)
    cond = {
        "norm_mean": torch.tensor([0.45, 0.5, 0.4]).view(3, 1, 1),
        "norm_std": torch.tensor([0.25, 0.3, 0.28]).view(3, 1, 1),
    }
    fnorm = {"mean": rnd(WIDTH), "tx": torch.eye(WIDTH) + rnd(WIDTH, WIDTH, scale=0.1)}
    return bb, cond, fnorm


def hf_state_dict(parts):
    bb, cond, fnorm = parts
    sd = {"radio_model.model." + k: v for k, v in bb.items()}
    sd.update({"radio_model.input_conditioner." + k: v for k, v in cond.items()})
    sd.update({"radio_model.feature_normalizer." + k: v for k, v in fnorm.items()})
    sd["radio_model.summary_idxs"] = torch.tensor([0, 1, 2])
    return sd


def hub_state_dict(parts):
    bb, cond, fnorm = parts
    sd = {"base_model." + k: v for k, v in bb.items()}
    sd.update({"input_conditioner." + k: v for k, v in cond.items()})
    sd.update({"_feature_normalizer." + k: v for k, v in fnorm.items()})
    return sd


def hub_args(model_kwargs):
    """The training-args Namespace a RADIO release file carries (the fields hubconf.py reads)."""
    return argparse.Namespace(
        model="vit_large_patch16_v2_224",
        pretrained=False,
        in_chans=None,
        input_size=None,
        num_classes=0,
        drop=0.0,
        drop_path=None,
        drop_block=None,
        gp=None,
        bn_momentum=None,
        bn_eps=None,
        torchscript=False,
        initial_checkpoint="",
        model_kwargs=dict(model_kwargs),
        cpe_max_size=2048,
        teachers=[dict(name=n, type="generic") for n in ("clip", "siglip", "dino", "sam")],
        cls_token_per_teacher=True,
        register_multiple=8,  # 4 summary tokens + 4 registers = 8 prefix tokens
        spectral_reparam=False,
        damp=None,
        model_norm=False,
    )


def save_hub_file(parts, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    args = hub_args(dict(embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=MLP / WIDTH))
    chk = {"arch": "vit_large_patch16_v2_224", "epoch": 1, "state_dict": hub_state_dict(parts), "args": args}
    torch.save(chk, path)
    return path


def save_hf_snapshot(parts, snap: Path) -> Path:
    from safetensors.torch import save_file

    snap.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf_state_dict(parts).items()}, str(snap / "model.safetensors"))
    (snap / "config.json").write_text("{}")
    return snap


def reference_features(parts, images, align_corners=False):
    """Independent plain-torch evaluation of RADIO's inference math (used when timm's port is unavailable)."""
    bb, cond, fnorm = parts
    x = (images - cond["norm_mean"]) / cond["norm_std"]
    b, _, h, w = x.shape
    rows, cols = h // 16, w // 16
    patches = F.unfold(x, 16, stride=16).transpose(1, 2)  # (c, y, x) per patch, row-major patches
    t = patches @ bb["patch_generator.embedder.weight"].T
    pos = bb["patch_generator.pos_embed"].reshape(1, GRID, GRID, WIDTH).permute(0, 3, 1, 2)
    side = max(rows, cols)
    pos = F.interpolate(pos, size=(side, side), mode="bilinear", align_corners=align_corners)[:, :, :rows, :cols]
    t = torch.cat([bb["patch_generator.cls_token.token"].expand(b, -1, -1), t + pos.flatten(2).transpose(1, 2)], 1)
    for i in range(DEPTH):
        p = f"blocks.{i}."
        y = F.layer_norm(t, (WIDTH,), bb[p + "norm1.weight"], bb[p + "norm1.bias"], 1e-6)
        q, k, v = (y @ bb[p + "attn.qkv.weight"].T + bb[p + "attn.qkv.bias"]).chunk(3, -1)
        split = lambda z: z.reshape(b, -1, HEADS, WIDTH // HEADS).transpose(1, 2)  # noqa: E731
        a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (WIDTH // HEADS) ** 0.5, -1) @ split(v)
        a = a.transpose(1, 2).reshape(b, -1, WIDTH) @ bb[p + "attn.proj.weight"].T + bb[p + "attn.proj.bias"]
        t = t + a * bb.get(p + "ls1.grandma", 1.0)
        y = F.layer_norm(t, (WIDTH,), bb[p + "norm2.weight"], bb[p + "norm2.bias"], 1e-6)
        y = F.gelu(y @ bb[p + "mlp.fc1.weight"].T + bb[p + "mlp.fc1.bias"]) @ bb[p + "mlp.fc2.weight"].T
        t = t + (y + bb[p + "mlp.fc2.bias"]) * bb.get(p + "ls2.grandma", 1.0)
    return (t[:, PREFIX:] - fnorm["mean"]) @ fnorm["tx"].T


def images(b=2, h=256, w=256, seed=1):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    """No test sees the user's HF cache or torch.hub dir."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)


# ---------------------------------------------------------------------------------------------------------------
# 1. Numerics
# ---------------------------------------------------------------------------------------------------------------


def _timm_radio():
    try:
        import timm
        from packaging.version import Version
        from timm.models import vision_transformer as tvit
    except ImportError:
        pytest.skip("timm is not installed")
    if Version(timm.__version__) < Version("1.0.31") or not hasattr(tvit, "_convert_radio"):
        pytest.skip(
            f"timm {timm.__version__} has no RADIO port (needs timm >= 1.0.31); the plain-torch check still runs"
        )
    return timm, tvit


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("hw", [(256, 256), (192, 320), (96, 64)])
def test_matches_timm_radio_port(hw, align_corners):
    timm, tvit = _timm_radio()
    parts = tiny_radio_parts()
    bb, cond, fnorm = parts
    dims = dict(embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=MLP / WIDTH, img_size=hw)
    ref = timm.create_model("vit_large_patch16_radio_v3", pretrained=False, **dims).eval()
    converted = tvit.checkpoint_filter_fn(
        hf_state_dict(parts), ref, interpolation="bilinear", antialias=False, align_corners=align_corners
    )
    ref.load_state_dict(converted)

    mine = radio.radio_vit_from_state_dict(
        hf_state_dict(parts), HEADS, expected_width=WIDTH, align_corners=align_corners
    ).eval()
    x = images(h=hw[0], w=hw[1])
    with torch.no_grad():
        want = ref.forward_features((x - cond["norm_mean"]) / cond["norm_std"])[:, ref.num_prefix_tokens :]
        want = (want - fnorm["mean"]) @ fnorm["tx"].T
        got = mine(x)
    assert ref.num_prefix_tokens == PREFIX
    assert got.shape == (2, (hw[0] // 16) * (hw[1] // 16), WIDTH)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hw", [(256, 256), (192, 320)])
def test_matches_plain_torch_reference(hw):
    parts = tiny_radio_parts(seed=3)
    mine = radio.radio_vit_from_state_dict(hub_state_dict(parts), HEADS).eval()
    x = images(h=hw[0], w=hw[1])
    with torch.no_grad():
        torch.testing.assert_close(mine(x), reference_features(parts, x), atol=1e-5, rtol=1e-5)


def test_teacher_forward_contract(tmp_path):
    parts = tiny_radio_parts()
    teacher = radio.c_radio_v3_l(path=str(save_hf_snapshot(parts, tmp_path / "snap")), arch=ARCH)
    assert teacher.spec.normalized_inside and teacher.spec.width == WIDTH and teacher.resolution == 256
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = images(h=224, w=224)
    out = teacher(x)
    assert out.shape == (2, 256, WIDTH) and not out.requires_grad
    # The teacher resizes to 256 px bilinearly and normalises inside the model, then returns the 16x16 grid.
    x256 = F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, reference_features(parts, x256), atol=1e-5, rtol=1e-5)
    # another student grid: features are resampled to it
    small = radio.c_radio_v3_l(path=str(tmp_path / "snap"), arch=ARCH, grid=(8, 8), resolution=256)
    assert small(x).shape == (2, 64, WIDTH)


def test_registered_with_full_size_specs():
    widths = {"c-radio-v3-b": 768, "c-radio-v3-l": 1024, "c-radio-v3-h": 1280, "c-radio-v3-g": 1536}
    for name, width in widths.items():
        spec = teacher_spec(name)
        assert spec.width == width and spec.patch_size == 16 and spec.num_prefix_tokens == 8
        assert spec.normalized_inside and spec.default_resolution() == 256


# ---------------------------------------------------------------------------------------------------------------
# 2. Weight formats, lookup and errors
# ---------------------------------------------------------------------------------------------------------------


def test_hub_file_and_hf_snapshot_agree(tmp_path):
    parts = tiny_radio_parts(seed=5)
    hub_file = save_hub_file(parts, tmp_path / "rel" / "c-radio-v3_l_half.pth.tar")
    snap = save_hf_snapshot(parts, tmp_path / "snap")
    x = images()
    outs = [
        radio.c_radio_v3_l(path=str(p), arch=ARCH)(x)
        for p in (hub_file, hub_file.parent, snap, snap / "model.safetensors")
    ]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=0, rtol=0)
    torch.testing.assert_close(outs[0], reference_features(parts, x), atol=1e-5, rtol=1e-5)


def test_default_lookup_hf_cache_and_torch_hub(tmp_path):
    parts = tiny_radio_parts(seed=7)
    x = images(b=1)
    want = reference_features(parts, x)
    # HF cache (HF_HUB_CACHE points into tmp_path, see the autouse fixture)
    save_hf_snapshot(parts, tmp_path / "hf" / "models--nvidia--C-RADIOv3-B" / "snapshots" / "abc123")
    torch.testing.assert_close(radio.c_radio_v3_b(arch=ARCH)(x), want, atol=1e-5, rtol=1e-5)
    # the g repo is spelled with a lower-case g on the Hub; an upper-case cache entry is found too
    save_hf_snapshot(parts, tmp_path / "hf" / "models--nvidia--C-RADIOv3-G" / "snapshots" / "r1")
    torch.testing.assert_close(radio.c_radio_v3_g(arch=ARCH)(x), want, atol=1e-5, rtol=1e-5)
    # torch.hub checkpoints dir, with the release file names RADIO's hubconf downloads
    save_hub_file(parts, tmp_path / "torch" / "hub" / "checkpoints" / "c-radio-v3_l_half.pth.tar")
    torch.testing.assert_close(radio.c_radio_v3_l(arch=ARCH)(x), want, atol=1e-5, rtol=1e-5)
    save_hub_file(parts, tmp_path / "torch" / "hub" / "checkpoints" / "c-radio_v3-h_half.pth.tar")
    torch.testing.assert_close(radio.c_radio_v3_h(arch=ARCH)(x), want, atol=1e-5, rtol=1e-5)


def test_missing_weights_name_file_and_dirs(tmp_path):
    with pytest.raises(TeacherWeightsNotFound) as err:
        radio.c_radio_v3_l()
    msg = str(err.value)
    assert "model.safetensors" in msg and "models--nvidia--C-RADIOv3-L" in msg and str(tmp_path / "hf") in msg
    assert "c-radio-v3_l_half.pth.tar" in msg and str(tmp_path / "torch" / "hub" / "checkpoints") in msg
    with pytest.raises(TeacherWeightsNotFound, match="does not exist"):
        radio.c_radio_v3_l(path=str(tmp_path / "nope.pth.tar"))
    with pytest.raises(ValueError, match="contradict each other"):
        radio.c_radio_v3_l(path=str(tmp_path / "nope.pth.tar"), allow_random=True)  # a path is never replaced
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherWeightsNotFound, match="model.safetensors"):
        radio.c_radio_v3_l(path=str(tmp_path / "empty"))


def test_allow_random_is_loud_and_tiny():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        t = radio.c_radio_v3_b(allow_random=True, arch=ARCH)
    assert t.spec.width == WIDTH and radio.RADIO_VARIANTS["c-radio-v3-b"].spec.width == 768
    assert t.model.depth == DEPTH and t.model.pos_grid == 128 and t.model.num_prefix_tokens == 8
    assert t(images(b=1)).shape == (1, 256, WIDTH)
    with pytest.raises(ValueError, match="unknown arch keys"):
        radio.c_radio_v3_b(allow_random=True, arch=dict(ARCH, widht=3))


def test_corrupt_and_wrong_files(tmp_path):
    bad = tmp_path / "c-radio_v3-b_half.pth.tar"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        radio.c_radio_v3_b(path=str(bad), arch=ARCH)
    bad_st = tmp_path / "snap" / "model.safetensors"
    bad_st.parent.mkdir()
    bad_st.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="corrupt"):
        radio.c_radio_v3_b(path=str(bad_st.parent), arch=ARCH)
    # right format, wrong variant width
    parts = tiny_radio_parts()
    snap = save_hf_snapshot(parts, tmp_path / "ok")
    with pytest.raises(ValueError, match="32 wide but this teacher is 1024 wide"):
        radio.c_radio_v3_l(path=str(snap))
    with pytest.raises(ValueError, match="depth"):
        radio.c_radio_v3_l(path=str(snap), arch=dict(ARCH, depth=3))
    # not RADIO at all
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a RADIO checkpoint"):
        radio.c_radio_v3_l(path=str(tmp_path / "other.safetensors"), arch=ARCH)
    # a training checkpoint with spectral reparametrisation still in place
    sd = hf_state_dict(parts)
    key = "radio_model.model.blocks.0.attn.proj."
    sd[key + "parametrizations.weight.original"] = sd.pop(key + "weight")
    save_file(sd, str(tmp_path / "train.safetensors"))
    with pytest.raises(ValueError, match="spectrally reparametrised"):
        radio.c_radio_v3_l(path=str(tmp_path / "train.safetensors"), arch=ARCH)


def test_checkout_needs_trust_remote_code(tmp_path):
    (tmp_path / "RADIO").mkdir()
    (tmp_path / "RADIO" / "hubconf.py").write_text("raise RuntimeError('must not be imported')\n")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        radio.c_radio_v3_l(path=str(tmp_path / "RADIO"))
    with pytest.raises(TeacherWeightsNotFound, match="c-radio-v3_l_half.pth.tar"):
        radio.c_radio_v3_l(path=str(tmp_path / "RADIO"), trust_remote_code=True)


# ---------------------------------------------------------------------------------------------------------------
# 3. Opt-in: NVIDIA's own code through torch.hub gives the same features
# ---------------------------------------------------------------------------------------------------------------


def test_torch_hub_checkout_matches_native(tmp_path):
    src = os.environ.get("RADIO_SRC")
    if not src or not (Path(src) / "hubconf.py").is_file():
        pytest.skip(
            "set RADIO_SRC to a checkout of NVlabs/RADIO (with hubconf.py) and `pip install einops` to compare "
            "against NVIDIA's code, e.g. `git clone https://github.com/NVlabs/RADIO /tmp/radio_src`"
        )
    pytest.importorskip("einops", reason="RADIO's code needs einops: pip install einops")
    parts = tiny_radio_parts(seed=11)
    ckpt = save_hub_file(parts, tmp_path / "torch" / "hub" / "checkpoints" / "c-radio-v3_l_half.pth.tar")
    x = images()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hub = radio.c_radio_v3_l(path=src, trust_remote_code=True, arch=ARCH)
    native = radio.c_radio_v3_l(path=str(ckpt), arch=ARCH)
    assert isinstance(hub, radio.RadioHubTeacher) and not hub.training
    assert not any(p.requires_grad for p in hub.parameters())
    torch.testing.assert_close(hub(x), native(x), atol=1e-5, rtol=1e-5)
    x2 = images(b=1, h=160, w=160, seed=4)  # resized to 256 by both
    torch.testing.assert_close(hub(x2), native(x2), atol=1e-5, rtol=1e-5)
