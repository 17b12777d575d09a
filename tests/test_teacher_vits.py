"""DINOv2, SigLIP and Theia teachers: checkpoint layouts, offline lookup, features, errors.

Tiny random models are saved in every on-disk layout the loaders accept (timm safetensors and OpenCLIP files in a
fake HF cache, original DINOv2 torch.hub checkpoints, Theia snapshots). The expected features come from the source
model itself (timm ``forward_features``, transformers ``ViTModel``), never through the teacher code.
"""

from __future__ import annotations

import json
import shutil
import uuid
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from transformers import ViTConfig, ViTModel

from openvla_align.teachers import (
    TeacherWeightsNotFound,
    dinov2,
    get_teacher_factory,
    list_teachers,
    siglip,
    teacher_spec,
    theia,
)
from openvla_align.tiny.model import TINY_VIT

IMAGENET = (torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225]))
HALF = (torch.full((3,), 0.5), torch.full((3,), 0.5))
TINY = TINY_VIT
FAMILIES = {"dinov2": dinov2, "siglip": siglip, "theia": theia}
OURS = sorted(n for n in list_teachers() if teacher_spec(n) is not None and teacher_spec(n).family in FAMILIES)


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """An empty HF cache and torch.hub dir for this test only."""
    hf, hub = tmp_path / "hf", tmp_path / "torch" / "hub"
    hf.mkdir()
    (hub / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(hf))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hf, hub


def snapshot(hf, repo, revision="0123456789abcdef"):
    d = hf / ("models--" + repo.replace("/", "--")) / "snapshots" / revision
    d.mkdir(parents=True, exist_ok=True)
    return d


def build(name, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_teacher_factory(name)(**kw)


def images(size, n=2, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def normalise(x, stats):
    mean, std = stats
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def perturbed(model, seed=0):
    """Random init plus noise on every tensor: timm starts layer scale at 1e-5 and biases at 0, which hides bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def tiny_timm(model_name, img_size, seed=0):
    model = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=img_size, **TINY)
    return perturbed(model, seed)


def timm_patch_tokens(model, x, num_prefix):
    with torch.no_grad():
        return model.forward_features(x)[:, num_prefix:]


def assert_close(a, b):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


# --- every registered variant: the Teacher contract on tiny random weights ---


def test_registered_names_and_specs():
    assert OURS == sorted(
        [f"dinov2-vit-{s}{r}" for s in "sblg" for r in ("", "-reg")]
        + ["siglip-so400m-p14-224", "siglip-b-p16-224", "siglip-b-p16-256", "siglip-l-p16-256"]
        + [f"theia-{s}-patch16-224-{m}" for s in ("tiny", "small", "base") for m in ("cdiv", "cddsv")]
    )
    spec = teacher_spec("dinov2-vit-l-reg")
    assert (spec.width, spec.patch_size, spec.num_prefix_tokens, spec.default_resolution()) == (1024, 14, 5, 224)
    spec = teacher_spec("siglip-so400m-p14-224")
    assert (spec.width, spec.mean, spec.num_prefix_tokens, spec.default_resolution()) == (1152, (0.5,) * 3, 0, 224)
    spec = teacher_spec("theia-base-patch16-224-cdiv")
    assert (spec.width, spec.patch_size, spec.default_resolution()) == (768, 16, 256)


@pytest.mark.parametrize("name", OURS)
def test_random_tiny_teacher_contract(name, dirs):
    with pytest.warns(UserWarning, match="RANDOM weights"):
        teacher = get_teacher_factory(name)(allow_random=True, arch=TINY)
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.width == 32 and teacher.native_grid == (16, 16)
    out = teacher(images(224))
    assert out.shape == (2, 256, 32) and not out.requires_grad and torch.isfinite(out).all()


# --- DINOv2 ---

DINO = {  # name: (timm model, torch.hub file, prefix tokens, SwiGLU MLP)
    "dinov2-vit-l": ("vit_large_patch14_dinov2", "dinov2_vitl14_pretrain.pth", 1, False),
    "dinov2-vit-l-reg": ("vit_large_patch14_reg4_dinov2", "dinov2_vitl14_reg4_pretrain.pth", 5, False),
    "dinov2-vit-g": ("vit_giant_patch14_dinov2", "dinov2_vitg14_pretrain.pth", 1, True),
    "dinov2-vit-s-reg": ("vit_small_patch14_reg4_dinov2", "dinov2_vits14_reg4_pretrain.pth", 5, False),
}


def original_dinov2_keys(state, registers, swiglu, seed=1):
    """timm weights in facebookresearch/dinov2's layout, i.e. the inverse of timm's conversion, written out by hand."""
    out = {}
    for k, v in state.items():
        if swiglu:
            k = k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        out[k] = v.clone()
    width = out["cls_token"].shape[-1]
    out["mask_token"] = torch.zeros(1, width)
    if registers:
        # DINOv2 adds a position embedding to the class token and none to the registers; timm folds it into cls.
        cls_pos = torch.randn(1, 1, width, generator=torch.Generator().manual_seed(seed))
        out["register_tokens"] = out.pop("reg_token")
        out["cls_token"] = out["cls_token"] - cls_pos
        out["pos_embed"] = torch.cat([cls_pos, out["pos_embed"]], dim=1)
    return out


@pytest.mark.parametrize("name", sorted(DINO))
@pytest.mark.parametrize("layout", ["timm-cache", "timm-path-dir", "hub-cache", "hub-path-file"])
def test_dinov2_layouts_match_source(name, layout, dirs):
    hf, hub = dirs
    model_name, hub_file, prefix, swiglu = DINO[name]
    src = tiny_timm(model_name, 224)
    if layout.startswith("timm"):
        snap = snapshot(hf, f"timm/{model_name}.lvd142m")
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(snap / "model.safetensors"))
        path = str(snap) if layout == "timm-path-dir" else None
    else:
        file = hub / "checkpoints" / hub_file
        torch.save(original_dinov2_keys(src.state_dict(), prefix == 5, swiglu), file)
        path = str(file) if layout == "hub-path-file" else None
    teacher = build(name, path=path, arch=TINY)
    x = images(224)
    assert_close(teacher(x), timm_patch_tokens(src, normalise(x, IMAGENET), prefix))


@pytest.mark.parametrize("name", ["dinov2-vit-l", "dinov2-vit-l-reg"])
def test_dinov2_518px_checkpoint_resampled_like_reference(name, dirs):
    """A 37x37 pos_embed is resampled to 16x16 as the reference does to the hub model (bicubic, antialiased)."""
    _, hub = dirs
    model_name, hub_file, prefix, _ = DINO[name]
    src = tiny_timm(model_name, 518)
    torch.save(original_dinov2_keys(src.state_dict(), prefix == 5, False), hub / "checkpoints" / hub_file)
    teacher = build(name, arch=TINY)

    ref = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=224, **TINY).eval()
    state = src.state_dict()
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], [16, 16], num_prefix_tokens=1 if prefix == 1 else 0)
    ref.load_state_dict(state)
    x = images(224)
    assert_close(teacher(x), timm_patch_tokens(ref, normalise(x, IMAGENET), prefix))


def test_dinov2_resolution_and_grid(dirs):
    """A larger teacher resolution runs a 32x32 grid that is resampled back to the student's 16x16."""
    hf, _ = dirs
    src = tiny_timm("vit_small_patch14_dinov2", 448)
    snap = snapshot(hf, "timm/vit_small_patch14_dinov2.lvd142m")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(snap / "model.safetensors"))
    teacher = build("dinov2-vit-s", resolution=448, arch=TINY)
    assert teacher.native_grid == (32, 32)
    x = images(448)
    fmap = timm_patch_tokens(src, normalise(x, IMAGENET), 1).transpose(1, 2).reshape(2, 32, 32, 32)
    expected = F.interpolate(fmap, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    assert_close(teacher(x), expected.flatten(2).transpose(1, 2))


def test_dinov2_wrong_variant_weights(dirs):
    _, hub = dirs
    src = tiny_timm("vit_small_patch14_dinov2", 224)
    torch.save(original_dinov2_keys(src.state_dict(), False, False), hub / "checkpoints" / "dinov2_vits14_pretrain.pth")
    with pytest.raises(ValueError, match=r"does not fit timm's vit_small_patch14_dinov2 \(width 384\)"):
        build("dinov2-vit-s")


# --- SigLIP ---

SIGLIP = {  # name: (timm model, OpenCLIP repo, resolution)
    "siglip-so400m-p14-224": ("vit_so400m_patch14_siglip_224", "ViT-SO400M-14-SigLIP", 224),
    "siglip-b-p16-256": ("vit_base_patch16_siglip_256", "ViT-B-16-SigLIP-256", 256),
}


@pytest.mark.parametrize("name", sorted(SIGLIP))
@pytest.mark.parametrize("layout", ["timm-cache", "open_clip-cache", "open_clip-path-file"])
def test_siglip_layouts_match_source(name, layout, dirs):
    hf, _ = dirs
    model_name, open_clip_repo, size = SIGLIP[name]
    src = tiny_timm(model_name, size)
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = None
    if layout == "timm-cache":
        save_file(state, str(snapshot(hf, f"timm/{model_name}.webli") / "model.safetensors"))
    else:
        clip = {"visual.trunk." + k: v for k, v in state.items()}
        clip["text.token_embedding.weight"] = torch.randn(10, 32)
        clip["logit_scale"] = torch.tensor(2.3)
        file = snapshot(hf, f"timm/{open_clip_repo}") / "open_clip_pytorch_model.bin"
        torch.save(clip, file)
        path = str(file) if layout == "open_clip-path-file" else None
    teacher = build(name, path=path, arch=TINY)
    assert teacher.resolution == size
    x = images(size)
    assert_close(teacher(x), timm_patch_tokens(src, normalise(x, HALF), 0))


def test_siglip_patch16_224_runs_at_256(dirs):
    """siglip-b-p16-224 defaults to 256 px (16x16): its 14x14 pos_embed is resampled once at load."""
    hf, _ = dirs
    src = tiny_timm("vit_base_patch16_siglip_224", 224)
    save_file(
        {k: v.contiguous() for k, v in src.state_dict().items()},
        str(snapshot(hf, "timm/vit_base_patch16_siglip_224.webli") / "model.safetensors"),
    )
    teacher = build("siglip-b-p16-224", arch=TINY)
    assert teacher.resolution == 256
    ref = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, num_classes=0, img_size=256, **TINY)
    state = src.state_dict()
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], [16, 16], num_prefix_tokens=0)
    ref.load_state_dict(state)
    x = images(256)
    assert_close(teacher(x), timm_patch_tokens(ref.eval(), normalise(x, HALF), 0))


# --- Theia ---

LEGACY_NAMES = (  # transformers >= 5 ViT module names -> the names Theia's checkpoints were saved with (< 5)
    ("layers.", "encoder.layer."),
    (".attention.q_proj.", ".attention.attention.query."),
    (".attention.k_proj.", ".attention.attention.key."),
    (".attention.v_proj.", ".attention.attention.value."),
    (".attention.o_proj.", ".attention.output.dense."),
    (".mlp.fc1.", ".intermediate.dense."),
    (".mlp.fc2.", ".output.dense."),
)


# DeiT-tiny's layout at tiny width (Theia's backbone config, as its remote code and our native port read it)
TINY_DEIT_VIT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    layer_norm_eps=1e-12,
    image_size=224,
    patch_size=16,
)


def tiny_deit(seed=0):
    config = ViTConfig(**TINY_DEIT_VIT, qkv_bias=True)
    return perturbed(ViTModel(config, add_pooling_layer=False), seed)


def legacy(state):
    out = {}
    for k, v in state.items():
        if k.startswith("layers."):
            for new, old in LEGACY_NAMES:
                k = k.replace(new, old, 1)
        out[k] = v
    return out


def theia_config(**overrides):
    config = {
        "architectures": ["TheiaModel"],
        "auto_map": {"AutoConfig": "theia_model.TheiaConfig", "AutoModel": "theia_model.TheiaModel"},
        "backbone": "facebook/deit-tiny-patch16-224",
        "num_reg_tokens": 0,
        "image_size": 224,
        "translator_type": "lconv",
        "target_feature_sizes": {"facebook/dinov2-large": [1024, 16, 16]},
    }
    config.update(overrides)
    return config


def write_theia(snap, src, key_layout="legacy", **config):
    state = src.state_dict()
    state = legacy(state) if key_layout == "legacy" else state
    tensors = {"backbone.model." + k: v.contiguous() for k, v in state.items()}
    tensors["translator.translator_heads.facebook_dinov2-large.adapter.0.weight"] = torch.randn(64, 32)
    save_file(tensors, str(snap / "model.safetensors"), metadata={"format": "pt"})  # as save_pretrained writes
    (snap / "config.json").write_text(json.dumps(theia_config(**config)))


def deit_tokens(src, x):
    with torch.no_grad():
        return src(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state[:, 1:]


@pytest.mark.parametrize("lookup", ["cache", "path-dir", "path-file"])
@pytest.mark.parametrize("key_layout", ["legacy", "installed"])
def test_theia_native_matches_vitmodel(lookup, key_layout, dirs):
    hf, _ = dirs
    src = tiny_deit()
    snap = snapshot(hf, "theaiinstitute/theia-tiny-patch16-224-cdiv")
    write_theia(snap, src, key_layout)
    path = {"cache": None, "path-dir": str(snap), "path-file": str(snap / "model.safetensors")}[lookup]
    teacher = build("theia-tiny-patch16-224-cdiv", path=path, arch=TINY)
    assert teacher.resolution == 256 and teacher.width == 32
    x = images(256)
    out = teacher(x)
    assert out.shape == (2, 256, 32)
    assert_close(out, deit_tokens(src, normalise(x, IMAGENET)))


def test_theia_resizes_input_bilinear_to_256(dirs):
    hf, _ = dirs
    src = tiny_deit()
    write_theia(snapshot(hf, "theaiinstitute/theia-small-patch16-224-cddsv"), src)
    teacher = build("theia-small-patch16-224-cddsv", arch=TINY)
    x = images(224)
    x256 = F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)
    assert_close(teacher(x), deit_tokens(src, normalise(x256, IMAGENET)))


def test_theia_wrong_size_weights(dirs):
    hf, _ = dirs
    write_theia(snapshot(hf, "theaiinstitute/theia-tiny-patch16-224-cdiv"), tiny_deit())
    with pytest.raises(ValueError, match="does not fit this variant"):
        build("theia-tiny-patch16-224-cdiv")


def test_theia_not_a_theia_checkpoint(dirs, tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"encoder.weight": torch.zeros(2)}, str(file))
    with pytest.raises(ValueError, match=r"holds no 'backbone\.model\.\*' tensors"):
        build("theia-tiny-patch16-224-cdiv", path=str(file), arch=TINY)


@pytest.mark.parametrize(
    "config, reason",
    [
        (
            dict(num_reg_tokens=1, backbone="reg-facebook/deit-tiny-patch16-224"),
            r"has register tokens \(num_reg_tokens=1\)",
        ),
        (dict(backbone="nocls-facebook/deit-tiny-patch16-224"), "has no CLS token"),
    ],
)
def test_theia_native_refuses_variant_needing_remote_code(config, reason, dirs):
    hf, _ = dirs
    snap = snapshot(hf, "theaiinstitute/theia-tiny-patch16-224-cdiv")
    write_theia(snap, tiny_deit(), **config)
    hint = r"\. Pass trust_remote_code=True \(--align\.trust_remote_code true\)"
    with pytest.raises(ValueError, match=reason + hint):
        build("theia-tiny-patch16-224-cdiv", arch=TINY)


REMOTE_CODE = '''
import torch.nn as nn
from transformers import PretrainedConfig, PreTrainedModel, ViTConfig, ViTModel


class TheiaConfig(PretrainedConfig):
    model_type = "theia"

    def __init__(self, backbone="facebook/deit-tiny-patch16-224", vit=None, num_reg_tokens=0, **kwargs):
        self.backbone = backbone
        self.vit = vit or {}
        self.num_reg_tokens = num_reg_tokens
        super().__init__(**kwargs)


class TheiaModel(PreTrainedModel):
    """Stand-in for the snapshot's theia_model.py: the same module tree (backbone.model = ViTModel, no pooler)."""

    config_class = TheiaConfig

    def __init__(self, config):
        super().__init__(config)
        self.backbone = nn.Module()
        self.backbone.model = ViTModel(ViTConfig(**config.vit))
        self.backbone.model.pooler = nn.Identity()
        self.no_cls = False
        self.num_reg_tokens = config.num_reg_tokens
        self.post_init()
'''


@pytest.fixture
def remote_snapshot(dirs):
    """A Theia snapshot with its own remote code; transformers copies that code into its modules cache."""
    from transformers import dynamic_module_utils

    hf, _ = dirs
    revision = "rev" + uuid.uuid4().hex
    snap = snapshot(hf, "theaiinstitute/theia-tiny-patch16-224-cdiv", revision)
    src = tiny_deit()
    write_theia(snap, src, model_type="theia", vit=dict(TINY_DEIT_VIT))
    (snap / "theia_model.py").write_text(REMOTE_CODE)
    yield hf, snap, src
    shutil.rmtree(f"{dynamic_module_utils.HF_MODULES_CACHE}/transformers_modules/{revision}", ignore_errors=True)


def test_theia_remote_code_path(remote_snapshot):
    hf, _, src = remote_snapshot
    snapshot(hf, "facebook/deit-tiny-patch16-224")  # the remote code builds its backbone from this repo
    teacher = build("theia-tiny-patch16-224-cdiv", trust_remote_code=True, arch=TINY)
    assert teacher.width == 32 and not any(p.requires_grad for p in teacher.parameters())
    x = images(256)
    assert_close(teacher(x), deit_tokens(src, normalise(x, IMAGENET)))


def test_theia_remote_code_needs_its_backbone_repo(remote_snapshot):
    with pytest.raises(TeacherWeightsNotFound, match=r"builds its backbone from 'facebook/deit-tiny-patch16-224'"):
        build("theia-tiny-patch16-224-cdiv", trust_remote_code=True, arch=TINY)


def test_theia_remote_code_file_missing(remote_snapshot):
    _, snap, _ = remote_snapshot
    (snap / "theia_model.py").unlink()
    with pytest.raises(TeacherWeightsNotFound, match=r"the remote code theia_model\.py is missing from "):
        build("theia-tiny-patch16-224-cdiv", trust_remote_code=True, arch=TINY)


# --- missing weights ---


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "dinov2-vit-l",
            [
                "models--timm--vit_large_patch14_dinov2.lvd142m/snapshots/<revision>/model.safetensors",
                "checkpoints/dinov2_vitl14_pretrain.pth",
            ],
        ),
        (
            "dinov2-vit-g-reg",
            [
                "models--timm--vit_giant_patch14_reg4_dinov2.lvd142m/snapshots/<revision>/",
                "checkpoints/dinov2_vitg14_reg4_pretrain.pth",
            ],
        ),
        (
            "siglip-so400m-p14-224",
            [
                "models--timm--vit_so400m_patch14_siglip_224.webli/snapshots/<revision>/model.safetensors",
                "models--timm--ViT-SO400M-14-SigLIP/snapshots/<revision>/open_clip_model.safetensors (or "
                "open_clip_pytorch_model.bin)",
            ],
        ),
        (
            "theia-base-patch16-224-cdiv",
            ["models--theaiinstitute--theia-base-patch16-224-cdiv/snapshots/<revision>/model.safetensors"],
        ),
    ],
)
def test_missing_weights_name_file_and_directory(name, expected, dirs):
    hf, hub = dirs
    with pytest.raises(TeacherWeightsNotFound) as info:
        build(name)
    message = str(info.value)
    assert f"{hf}/" in message and "allow_random=True" in message
    for piece in expected:
        assert piece in message
    if name.startswith("dinov2"):
        assert f"{hub}/checkpoints/" in message


@pytest.mark.parametrize("name", ["dinov2-vit-b", "siglip-b-p16-256", "theia-tiny-patch16-224-cdiv"])
def test_explicit_path_never_falls_back_to_random(name, tmp_path, dirs):
    with pytest.raises(TeacherWeightsNotFound, match=f"directory {tmp_path} holds none of"):
        build(name, path=str(tmp_path), arch=TINY)
    with pytest.raises(ValueError, match="contradict each other"):
        build(name, path=str(tmp_path), allow_random=True, arch=TINY)
