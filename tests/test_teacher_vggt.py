"""The VGGT teacher: the built-in aggregator against VGGT's own code, the real checkpoint's key layout, weight loading
and the multi-view Teacher contract.

VGGT's code comes from the Spatial Forcing snapshot (``spatial-forcing/openvla-SF/vggt``, VGGT unmodified) in the
shared upstream folder (``$OPENVLA_UPSTREAM``, default ``../shared/upstream`` beside the repository), imported from a
writable temporary copy. Everything runs on tiny random weights; nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from openvla_align.teachers import TeacherWeightsNotFound, create_teacher, list_teachers, teacher_spec, vggt
from openvla_align.teachers.spec import IMAGENET_MEAN, IMAGENET_STD
from openvla_align.teachers.vggt_model import VGGTAggregator

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = Path(os.environ.get("OPENVLA_UPSTREAM") or REPO.parent / "shared" / "upstream")
SF_SRC = UPSTREAM / "spatial-forcing" / "openvla-SF"

# Reduced VGGT for the comparison with VGGT's code: width 64, 4 frame/global pairs, a 2-block patch-embedding ViT
# whose position grid is 5x5 (70 px).
WIDTH, DEPTH, HEADS, PE_DEPTH, PE_HEADS, IMG = 64, 4, 4, 2, 4, 70
REDUCED = dict(
    embed_dim=WIDTH,
    depth=DEPTH,
    num_heads=HEADS,
    img_size=IMG,
    patch_embed_depth=PE_DEPTH,
    patch_embed_num_heads=PE_HEADS,
)
# Tinier still, for the teacher tests: 56 px = 4x4 patches.
TINY = dict(embed_dim=32, depth=2, num_heads=2, img_size=56, patch_embed_depth=1, patch_embed_num_heads=2)
HEAD_KEYS = {
    "camera_head.trunk.0.norm1.weight": torch.ones(4),
    "depth_head.scratch.output_conv2.2.bias": torch.zeros(2),
    "point_head.projects.0.weight": torch.zeros(2, 2, 1, 1),
    "track_head.feature_extractor.norm.weight": torch.ones(3),
}


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    """No test sees the user's HF cache or torch.hub dir."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights at scales that keep every part of the network visible in the output (LayerScale ~0.5, norms
    ~1, fan-in scaled matrices, distinct camera/register tokens for the first and the other frames)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(0.5 + 0.2 * noise)
            elif "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
            elif name.endswith(("token", "tokens", "pos_embed")):
                p.copy_(0.5 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / (p[0].numel() ** 0.5))
    return module


def frames(b, s, h, w, seed=1):
    return torch.rand(b, s, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# 1. Against VGGT's own aggregator
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """VGGT's ``models.aggregator`` and ``layers.vision_transformer`` modules, from a writable copy of the snapshot."""
    if not (SF_SRC / "vggt" / "models" / "aggregator.py").is_file():
        pytest.skip(f"the Spatial Forcing snapshot with VGGT's code is not at {SF_SRC} (set OPENVLA_UPSTREAM)")
    root = tmp_path_factory.mktemp("sf")
    shutil.copytree(SF_SRC / "vggt", root / "vggt", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    sys.path.insert(0, str(root))
    try:
        import importlib

        aggregator = importlib.import_module("vggt.models.aggregator")
        vision_transformer = importlib.import_module("vggt.layers.vision_transformer")
        assert Path(aggregator.__file__).resolve().is_relative_to(root.resolve())
        yield aggregator, vision_transformer
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == "vggt" or m.startswith("vggt.")]:
            del sys.modules[name]


def upstream_aggregator(upstream, seed=0):
    """VGGT's Aggregator at the reduced size, built by its own code: only the sizes its patch-embedding factory
    (``vit_large``) hard-codes are replaced (width, depth, heads); every other argument is VGGT's."""
    aggregator, vision_transformer = upstream
    dino = vision_transformer.DinoVisionTransformer

    def reduced_vit(**kwargs):
        kwargs.update(embed_dim=WIDTH, depth=PE_DEPTH, num_heads=PE_HEADS)
        return dino(**kwargs)

    with mock.patch.object(vision_transformer, "DinoVisionTransformer", reduced_vit):
        agg = aggregator.Aggregator(img_size=IMG, patch_size=14, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS)
    assert len(agg.patch_embed.blocks) == PE_DEPTH and agg.patch_embed.num_register_tokens == 4
    return randomize_(agg, seed).eval()


def test_state_dict_layout_matches_upstream(upstream):
    ref = upstream_aggregator(upstream)
    mine = VGGTAggregator(**REDUCED)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in mine.state_dict().items()}
    assert list(got) == list(want)  # same keys, same order
    assert got == want
    mine.load_state_dict(ref.state_dict(), strict=True)


@pytest.mark.parametrize("b, s, h, w", [(2, 2, 70, 70), (1, 3, 56, 56), (2, 2, 56, 84)])
def test_every_layer_matches_upstream(upstream, b, s, h, w):
    """70 px: the stored 5x5 position grid; 56 px and 56x84: resampled (down, and non-square)."""
    ref = upstream_aggregator(upstream, seed=b * 10 + s)
    mine = VGGTAggregator(**REDUCED).eval()
    mine.load_state_dict(ref.state_dict(), strict=True)
    x = frames(b, s, h, w)
    with torch.no_grad():
        want, start = ref(x)
        got = [mine(x, layer=i) for i in range(DEPTH)]
        last = mine(x)
    assert start == mine.patch_start_idx == 5 and len(want) == DEPTH
    n = 5 + (h // 14) * (w // 14)
    worst = 0.0
    for i in range(DEPTH):
        assert got[i].shape == want[i].shape == (b, s, n, 2 * WIDTH)
        assert want[i].abs().max() > 1.0  # a real signal, not a vanishing residual
        worst = max(worst, (got[i] - want[i]).abs().max().item())
    print(f"max |ours - VGGT| over {DEPTH} layers at B={b} S={s} {h}x{w}: {worst:.3g}")
    assert worst <= 1e-5
    torch.testing.assert_close(last, got[-1], atol=0, rtol=0)
    # the layers differ from each other (the selection is real)
    assert (got[0] - got[-1]).abs().max() > 0.1


def test_frames_mix_in_global_attention(upstream):
    """Changing frame 1 of sample 0 changes frame 0's global-attention half from layer 0 on, not its frame-attention
    half at layer 0; sample 1 is untouched. VGGT's own aggregator agrees."""
    ref = upstream_aggregator(upstream, seed=5)
    mine = VGGTAggregator(**REDUCED).eval()
    mine.load_state_dict(ref.state_dict(), strict=True)
    x = frames(2, 2, 56, 56)
    x2 = x.clone()
    x2[0, 1] = torch.rand(3, 56, 56, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a0, b0 = mine(x, layer=0), mine(x2, layer=0)
        a_last, b_last = mine(x), mine(x2)
        ref_a, ref_b = ref(x)[0][0], ref(x2)[0][0]
    frame_half, global_half = slice(0, WIDTH), slice(WIDTH, 2 * WIDTH)
    torch.testing.assert_close(b0[0, 0, :, frame_half], a0[0, 0, :, frame_half], atol=1e-6, rtol=1e-6)
    assert (b0[0, 0, :, global_half] - a0[0, 0, :, global_half]).abs().max() > 1e-2
    assert (b_last[0, 0] - a_last[0, 0]).abs().max() > 1e-2  # deeper frame blocks see the mixed tokens
    torch.testing.assert_close(b_last[1], a_last[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b0, ref_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a0, ref_a, atol=1e-5, rtol=1e-5)


def test_reduced_by_three_sizes():
    """embed_dim/depth/num_heads alone (the project's tiny-teacher arch) shrink the patch-embedding ViT too."""
    from openvla_align.tiny.model import TINY_VIT

    m = VGGTAggregator(**TINY_VIT)
    assert len(m.patch_embed.blocks) == len(m.frame_blocks) == TINY_VIT["depth"]
    assert m.patch_embed.blocks[0].attn.num_heads == TINY_VIT["num_heads"]
    assert len(VGGTAggregator(**dict(TINY_VIT, patch_embed_depth=1)).patch_embed.blocks) == 1
    assert m(frames(1, 2, 28, 28)).shape == (1, 2, 5 + 4, 2 * TINY_VIT["embed_dim"])


def test_first_frame_has_its_own_tokens():
    """The first frame of a sample gets camera/register version 0, every later frame version 1."""
    mine = randomize_(VGGTAggregator(**TINY), seed=2).eval()
    x = frames(1, 1, 56, 56).expand(1, 3, 3, 56, 56).contiguous()  # three identical frames
    with torch.no_grad():
        out = mine(x, layer=0)
    frame_half = slice(0, TINY["embed_dim"])
    assert (out[0, 0, :, frame_half] - out[0, 1, :, frame_half]).abs().max() > 1e-2
    torch.testing.assert_close(out[0, 1], out[0, 2], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# 2. The real VGGT-1B layout, without allocating its billion parameters
# ---------------------------------------------------------------------------------------------------------------


def test_full_size_keys_and_shapes_match_upstream(upstream):
    aggregator, vision_transformer = upstream
    dino = vision_transformer.DinoVisionTransformer

    def on_meta_but_schedule(**kwargs):
        # VGGT's ViT reads its drop-path schedule with .item(); a uniform schedule of the same rate (0.0) makes no
        # linspace, and has no parameters either way.
        return dino(**kwargs, drop_path_uniform=True)

    with torch.device("meta"), mock.patch.object(vision_transformer, "DinoVisionTransformer", on_meta_but_schedule):
        ref = aggregator.Aggregator()  # VGGT-1B's aggregator, as VGGT() builds it
        mine = VGGTAggregator()
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in mine.state_dict().items()}
    assert list(got) == list(want) and got == want
    assert got["patch_embed.pos_embed"] == (1, 1 + 37 * 37, 1024) and got["register_token"] == (1, 2, 4, 1024)
    assert len([k for k in got if k.startswith("frame_blocks.") and k.endswith(".attn.q_norm.weight")]) == 24
    assert mine.patch_start_idx == ref.patch_start_idx == 5
    n_params = sum(v.numel() for v in mine.state_dict().values())
    assert 0.9e9 < n_params < 0.92e9, n_params


# ---------------------------------------------------------------------------------------------------------------
# 3. Weights: model.pt of the whole VGGT
# ---------------------------------------------------------------------------------------------------------------


def fake_model_pt(path: Path, model: VGGTAggregator, extra=None, drop=(), legacy=False) -> Path:
    sd = {"aggregator." + k: v for k, v in model.state_dict().items()}
    sd.update(HEAD_KEYS)
    sd.update(extra or {})
    for key in drop:
        del sd[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    return path


def teacher(**kw):
    kw.setdefault("arch", TINY)
    kw.setdefault("resolution", 56)
    kw.setdefault("grid", (4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_teacher("vggt-1b", **kw)


def expected(model: VGGTAggregator, x: torch.Tensor, layer=-1, resolution=56):
    """(B, V, 3, H, W) -> what the teacher must return: bilinear resize, the model, prefix dropped, views in order."""
    b, v = x.shape[:2]
    r = F.interpolate(x.flatten(0, 1), size=(resolution, resolution), mode="bilinear", align_corners=False)
    with torch.no_grad():
        out = model(r.view(b, v, 3, resolution, resolution), layer)
    return out[:, :, model.patch_start_idx :].reshape(b, -1, out.shape[-1])


def test_loads_model_pt_file_dir_and_hf_cache(tmp_path):
    model = randomize_(VGGTAggregator(**TINY), seed=3).eval()
    file = fake_model_pt(tmp_path / "ckpt" / "model.pt", model)
    x = frames(2, 2, 40, 40)
    want = expected(model, x)
    assert want.shape == (2, 2 * 16, 64)
    for path in (file, file.parent):
        t = teacher(path=str(path))
        assert isinstance(t, vggt.VGGTTeacher) and t.model.camera_token.device.type == "cpu"
        torch.testing.assert_close(t(x), want, atol=1e-6, rtol=1e-6)
    # the HF cache snapshot of facebook/VGGT-1B (HF_HUB_CACHE points into tmp_path)
    fake_model_pt(tmp_path / "hf" / "models--facebook--VGGT-1B" / "snapshots" / "abc123" / "model.pt", model)
    torch.testing.assert_close(teacher()(x), want, atol=1e-6, rtol=1e-6)
    # a legacy (non-zip) torch.save file cannot be memory-mapped; it is read the plain way
    legacy = fake_model_pt(tmp_path / "legacy" / "model.pt", model, legacy=True)
    torch.testing.assert_close(teacher(path=str(legacy))(x), want, atol=1e-6, rtol=1e-6)


def test_wrong_keys_are_errors(tmp_path):
    model = VGGTAggregator(**TINY)
    extra = fake_model_pt(tmp_path / "a" / "model.pt", model, extra={"refiner.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys refiner\.weight"):
        teacher(path=str(extra))
    extra_agg = fake_model_pt(tmp_path / "b" / "model.pt", model, extra={"aggregator.extra_token": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys aggregator\.extra_token"):
        teacher(path=str(extra_agg))
    missing = fake_model_pt(tmp_path / "c" / "model.pt", model, drop=("aggregator.camera_token",))
    with pytest.raises(ValueError, match=r"missing keys aggregator\.camera_token"):
        teacher(path=str(missing))
    with pytest.raises(ValueError, match=r"missing keys .*frame_blocks\.2\."):  # arch deeper than the file
        teacher(path=str(fake_model_pt(tmp_path / "d" / "model.pt", model)), arch=dict(TINY, depth=3))
    wider = fake_model_pt(tmp_path / "e" / "model.pt", VGGTAggregator(**dict(TINY, embed_dim=48)))
    with pytest.raises(ValueError, match="shapes do not fit"):
        teacher(path=str(wider))
    not_vggt = tmp_path / "f" / "model.pt"
    not_vggt.parent.mkdir()
    torch.save({"encoder.weight": torch.zeros(2)}, not_vggt)
    with pytest.raises(ValueError, match="not a VGGT checkpoint"):
        teacher(path=str(not_vggt))
    garbage = tmp_path / "g" / "model.pt"
    garbage.parent.mkdir()
    garbage.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        teacher(path=str(garbage))


def test_missing_weights_say_what_and_where(tmp_path):
    with pytest.raises(TeacherWeightsNotFound) as err:
        create_teacher("vggt-1b")  # full size: fails before anything is built
    msg = str(err.value)
    assert "model.pt" in msg and "facebook/VGGT-1B" in msg and "--align.teacher_path /path/to/model.pt" in msg
    assert str(tmp_path / "hf" / "models--facebook--VGGT-1B" / "snapshots") in msg
    with pytest.raises(TeacherWeightsNotFound, match="does not exist"):
        create_teacher("vggt-1b", path=str(tmp_path / "nope.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherWeightsNotFound, match="model.pt"):
        create_teacher("vggt-1b", path=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="contradict each other"):
        create_teacher("vggt-1b", path=str(tmp_path / "nope.pt"), allow_random=True)


# ---------------------------------------------------------------------------------------------------------------
# 4. The Teacher
# ---------------------------------------------------------------------------------------------------------------


def test_registered_spec():
    assert "vggt-1b" in list_teachers("vggt*")
    spec = teacher_spec("vggt-1b")
    assert (spec.family, spec.width, spec.patch_size, spec.num_prefix_tokens) == ("vggt", 2048, 14, 5)
    assert spec.normalized_inside and spec.mean == IMAGENET_MEAN and spec.std == IMAGENET_STD
    assert [(s.files, s.repo) for s in spec.sources] == [(("model.pt",), "facebook/VGGT-1B")]


def test_teacher_end_to_end_random():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        t = create_teacher("vggt-1b", arch=TINY, allow_random=True, resolution=56, grid=(4, 4))
    assert t.multi_view and t.spec.normalized_inside and t.spec.width == 64 and t.width == 64
    assert t.native_grid == (4, 4) and not t.training and not any(p.requires_grad for p in t.parameters())
    x = frames(2, 3, 64, 48)
    with torch.enable_grad():
        out = t(x)
    assert out.shape == (2, 3 * 16, 64) and not out.requires_grad and torch.isfinite(out).all()
    torch.testing.assert_close(out, expected(t.model, x), atol=1e-6, rtol=1e-6)
    # view v's tokens are the (v*16 ... v*16+15) block: sample 1's views alone give the same rows of sample 1
    torch.testing.assert_close(t(x[1:]), out[1:], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="cameras together"):
        t(torch.rand(2, 3, 56, 56))  # single images: a multi-view teacher wants (B, V, 3, H, W)


def test_layer_resolution_and_arch_checks():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = create_teacher("vggt-1b", arch=TINY, allow_random=True)
        assert default.resolution == 518 and default.native_grid == (37, 37)  # VGGT's own size, not grid x patch
        torch.manual_seed(0)
        last = create_teacher("vggt-1b", arch=TINY, allow_random=True, resolution=56, grid=(4, 4))
        torch.manual_seed(0)
        first = create_teacher("vggt-1b", arch=dict(TINY, layer=0), allow_random=True, resolution=56, grid=(4, 4))
        with pytest.raises(ValueError, match="not a multiple of vggt-1b's patch size 14"):
            create_teacher("vggt-1b", arch=TINY, allow_random=True, resolution=50)
        with pytest.raises(ValueError, match="out of range"):
            create_teacher("vggt-1b", arch=dict(TINY, layer=2), allow_random=True)
        with pytest.raises(ValueError, match="unknown arch keys"):
            create_teacher("vggt-1b", arch=dict(TINY, widht=3), allow_random=True)
    assert (last.layer, first.layer) == (-1, 0)
    x = frames(1, 2, 56, 56)
    torch.testing.assert_close(first(x), expected(first.model, x, layer=0), atol=1e-6, rtol=1e-6)
    assert (first(x) - last(x)).abs().max() > 1e-3


def test_bfloat16_teacher_tracks_float32():
    """Run in bfloat16 (the training default on CUDA), the rotary embedding is still computed in float32."""
    t = teacher(allow_random=True)
    randomize_(t.model, seed=4)
    x = frames(1, 2, 56, 56)
    want = t(x)
    got = t.to(torch.bfloat16)(x)
    assert got.dtype == torch.bfloat16
    rel = (got.float() - want).norm() / want.norm()
    assert rel < 0.05, rel
