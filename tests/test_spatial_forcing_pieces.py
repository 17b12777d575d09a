"""Spatial Forcing's pieces as registered choices, each against the fork's own function on the same inputs.

The fork's files (``../shared/upstream/spatial-forcing/openvla-SF``: ``prismatic/util/pooling_utils.py``,
``prismatic/models/projectors.py``, the vendored ``vggt``) are copied to a temporary folder and imported from there;
its ``prismatic`` is loaded by file path, so it never shadows OpenVLA's. Also here: the multi-view path through the
Aligner, and a trainable projector's optimizer state saved in the sidecar and restored on resume.
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from openvla_align import AlignConfig, Aligner
from openvla_align.config import SPATIAL_FORCING
from openvla_align.losses import get_loss
from openvla_align.norms import IMAGENET_MEAN, IMAGENET_STD
from openvla_align.pooling import bilinear_corners, get_pooling, uv_embedding
from openvla_align.projector import build_projector
from openvla_align.targets.inputs import get_teacher_input
from openvla_align.teachers.base import Teacher, TeacherSpec
from openvla_align.vla.pixels import normalize_fused

SF = Path(os.environ.get("OPENVLA_UPSTREAM", Path(__file__).resolve().parents[2] / "shared" / "upstream"))
SF = SF / "spatial-forcing" / "openvla-SF"
pytestmark = pytest.mark.skipif(not SF.is_dir(), reason=f"no Spatial Forcing snapshot at {SF}")


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fork(tmp_path_factory):
    """The fork's pooling, projector and VGGT loader, imported from a writable copy."""
    root = tmp_path_factory.mktemp("spatial-forcing")
    shutil.copytree(SF / "vggt", root / "vggt")
    shutil.copytree(SF / "prismatic", root / "sf_prismatic")
    sys.path.insert(0, str(root))
    try:
        pooling = _load(root / "sf_prismatic/util/pooling_utils.py", "sf_pooling_utils")
        projectors = _load(root / "sf_prismatic/models/projectors.py", "sf_projectors")
        from vggt.heads.utils import create_uv_grid, position_grid_to_embed
        from vggt.utils.load_fn import preprocess_normed_images
    finally:
        sys.path.remove(str(root))
    return SimpleNamespace(
        custom_pooling=pooling.custom_pooling,
        AlignProjector=projectors.AlignProjector,
        create_uv_grid=create_uv_grid,
        position_grid_to_embed=position_grid_to_embed,
        preprocess=preprocess_normed_images,
    )


def test_uv_embedding_is_vggts(fork):
    for h, w, d, aspect in [(37, 37, 64, 1.0), (5, 7, 16, 1.4)]:
        theirs = fork.position_grid_to_embed(fork.create_uv_grid(w, h, aspect_ratio=aspect, dtype=torch.float32), d)
        ours = uv_embedding(h, w, d, aspect)
        torch.testing.assert_close(ours, theirs.permute(2, 0, 1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="divisible by 4"):
        uv_embedding(4, 4, 6, 1.0)


@pytest.mark.parametrize("pos_embed", [0.0, 0.1])
@pytest.mark.parametrize("views", [1, 2])
def test_bilinear_corners_pooling_is_the_forks(fork, views, pos_embed):
    """37x37 VGGT patches per view onto the 16x16 student grid, with and without the uv embedding x 0.1."""
    b, d = 2, 32
    hidden = torch.randn(b, views, 37 * 37, d, generator=torch.Generator().manual_seed(views))
    reference = torch.zeros(b, views * 256, 8)  # the student's visual tokens: only its length is read
    theirs = fork.custom_pooling(hidden, (37, 37), (518, 518), reference, "bilinear", pos_embed > 0)
    ours = bilinear_corners(hidden.flatten(0, 1), (37, 37), (16, 16), pos_embed=pos_embed).reshape(b, -1, d)
    assert ours.shape == theirs.shape == (b, views * 256, d)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert get_pooling("bilinear-corners") is bilinear_corners
    with pytest.raises(ValueError, match="Unknown pooling 'nearest'; known: resample, bilinear-corners"):
        get_pooling("nearest")


def test_spatial_forcing_input_is_preprocess_normed_images(fork):
    """pixel_values of 2 fused images -> the images VGGT sees, as the fork's preprocess_normed_images makes them."""
    rgb = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    pixel_values = normalize_fused(rgb).reshape(2, 12, 224, 224)  # 2 samples x 2 cameras
    mean = torch.tensor(IMAGENET_MEAN).float().tolist()  # the processor's, as float32 -> list (OFT's processing)
    std = torch.tensor(IMAGENET_STD).float().tolist()
    processor = SimpleNamespace(tvf_normalize_params=[{"mean": mean, "std": std, "inplace": False}])
    theirs = fork.preprocess(pixel_values, processor, 2)  # (2, 2, 3, 518, 518)
    prep = get_teacher_input("spatial-forcing")
    ours = prep.resize(prep.rgb(pixel_values.reshape(4, 6, 224, 224)), 518).view(2, 2, 3, 518, 518)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    reference = get_teacher_input("reference")
    assert reference.resize(reference.rgb(pixel_values[:, :6]), 518).shape == (2, 3, 518, 518)
    with pytest.raises(ValueError, match="Unknown teacher input"):
        get_teacher_input("sf")
    with pytest.raises(ValueError, match="wider than tall"):
        prep.resize(torch.rand(1, 3, 100, 300), 518)


@pytest.mark.parametrize("norm", [True, False])
def test_projector_and_loss_are_the_forks(fork, norm):
    llm, vggt = 48, 16
    theirs = fork.AlignProjector(llm, vggt, "cosine", use_vlm_norm=norm)
    kind = "spatial-forcing" if norm else "spatial-forcing-nonorm"
    ours = build_projector(kind, llm, 2 * vggt, seed=0, frozen=False)
    # the fork's init: xavier-uniform weights, zero biases; ours draws the same law from the seeded generator
    for linear in (ours.net[1], ours.net[3]):
        bound = (6 / (linear.in_features + linear.out_features)) ** 0.5
        assert linear.weight.abs().max() <= bound and linear.weight.abs().max() > 0.9 * bound
        assert torch.count_nonzero(linear.bias) == 0
    assert isinstance(ours.net[0], nn.LayerNorm if norm else nn.Identity)
    mapping = {"fc1": "net.1", "fc2": "net.3", "vlm_norm": "net.0"}
    state = {}
    for key, value in theirs.state_dict().items():
        module, _, param = key.partition(".")
        state[f"{mapping[module]}.{param}"] = value
    ours.load_state_dict(state)
    x = torch.randn(3, 20, llm)
    target = torch.randn(3, 20, 2 * vggt)
    torch.testing.assert_close(ours(x), theirs.align_dimension(x), atol=1e-6, rtol=0)
    loss, metrics = get_loss("one-minus-cosine")(ours(x), target)
    torch.testing.assert_close(loss, theirs(x, target), atol=1e-6, rtol=0)
    cos = get_loss("cosine")(ours(x), target)[0]
    torch.testing.assert_close(loss, 1 + cos, atol=1e-6, rtol=0)  # the same gradient as the paper's -cos
    assert metrics["cos"].item() == pytest.approx(-cos.item(), abs=1e-6)


class TwoViewTeacher(Teacher):
    """A multi-view test teacher: each view's patch features plus the mean over the sample's views (frames mix)."""

    multi_view = True

    def __init__(self, width=24, grid=(16, 16)):
        spec = TeacherSpec("two-view-test", "test", width, 14, IMAGENET_MEAN, IMAGENET_STD, 0, "nowhere")
        super().__init__(spec, resolution=14 * grid[0], grid=grid)
        torch.manual_seed(7)
        self.conv = nn.Conv2d(3, width, 14, 14)
        self.freeze()

    def _features(self, x):
        b, v = x.shape[:2]
        f = self.conv(x.flatten(0, 1)).flatten(2).transpose(1, 2)  # (b * v, T, D)
        f = f.view(b, v, *f.shape[1:])
        return (f + f.mean(dim=1, keepdim=True)).flatten(0, 1)


def test_multi_view_targets_through_the_aligner():
    teacher = TwoViewTeacher()
    rgb = torch.rand(2, 2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    pixel_values = normalize_fused(rgb.flatten(0, 1)).reshape(2, 12, 224, 224)
    cfg = AlignConfig(enabled=True, teacher="two-view-test", projector_dim=8)
    aligner = Aligner(cfg, teacher)
    targets = aligner.teacher_targets(pixel_values)
    assert targets.shape == (2, 512, 24)
    with torch.no_grad():
        rgb = get_teacher_input("reference").rgb(pixel_values.reshape(4, 6, 224, 224))
        direct = teacher(rgb.view(2, 2, 3, 224, 224))
    torch.testing.assert_close(targets, direct)
    # the second camera's image changes the first camera's targets: the views went through together
    changed = pixel_values.clone()
    changed[:, 6:] = normalize_fused(torch.rand(2, 3, 224, 224))
    assert not torch.allclose(aligner.teacher_targets(changed)[:, :256], targets[:, :256])
    # --align.images primary: the teacher sees the third-person camera alone
    primary = Aligner(AlignConfig(enabled=True, teacher="two-view-test", images="primary"), teacher)
    assert primary.teacher_targets(pixel_values).shape == (2, 256, 24)
    with pytest.raises(ValueError, match=r"takes a sample's cameras together: \(B, V, 3, H, W\)"):
        teacher(torch.rand(2, 3, 224, 224))


def test_spatial_forcing_config_sets_the_teachers_input_and_pooling():
    teacher = TwoViewTeacher()
    cfg = AlignConfig(**{**SPATIAL_FORCING, "teacher": "two-view-test"}, enabled=True)
    Aligner(cfg, teacher)
    assert teacher.pool is bilinear_corners and teacher.pool_pos_embed == 0.1
    assert teacher.resize is get_teacher_input("spatial-forcing").resize
    with pytest.raises(ValueError, match="pooling_pos_embed=-1"):
        AlignConfig(pooling_pos_embed=-1)
