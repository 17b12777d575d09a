"""Teacher caches of several cameras per sample: a multi-view teacher's rows are samples (VGGT sees a sample's
cameras together), a single-view teacher's rows are every camera's frames; caches made for another teacher kind or
another number of views are refused when opened for training, in one line that says what to do."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from openvla_align import AlignConfig, Aligner
from openvla_align.cache.build import build_cache, image_dir_samples, rlds_frames, step_cameras
from openvla_align.cli import main
from openvla_align.config import SPATIAL_FORCING
from openvla_align.targets.cache import (
    CacheError,
    CacheSpec,
    CacheWriter,
    TeacherCache,
    open_for_training,
    source_cameras,
)
from openvla_align.targets.frame_keys import frame_key, keys_from_pixel_values, pixel_values_from_frames, sample_key
from openvla_align.teachers import TeacherRequest, register_teacher, teacher_spec
from openvla_align.tiny import tiny_teacher
from openvla_align.tiny.model import TINY_VIT

from conftest import cli_fails

SF = {k: SPATIAL_FORCING[k] for k in ("teacher_input", "pooling", "pooling_pos_embed")}  # Spatial Forcing's


def frames(n, size=224, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def samples(n, views=2, seed=0):
    fs = frames(n * views, seed=seed)
    return [tuple(fs[i * views : (i + 1) * views]) for i in range(n)]


def stacked(batch):
    """OpenVLA-OFT's pixel_values for samples: each camera's 6 channels stacked on the channels, primary first."""
    return torch.cat([pixel_values_from_frames([s[v] for s in batch]) for v in range(len(batch[0]))], dim=1)


def vggt():
    """VGGT's aggregator at tiny width, 518 px input as VGGT-1B; LayerScale at 1 instead of VGGT's initial 0.01, so
    that the global blocks mix the cameras visibly in random weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        teacher = tiny_teacher("vggt-1b", seed=2)
    with torch.no_grad():
        for name, param in teacher.named_parameters():
            if name.endswith("gamma"):
                param.fill_(1.0)
    return teacher


def radio():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_teacher("c-radio-v3-l", seed=1)


def build(out, teacher, items, **kwargs):
    kwargs = {"source": {"kind": "test"}, "teacher_name": "vggt-1b", "progress": False, **kwargs}
    return build_cache(out, teacher, items, **kwargs)


def live(teacher, pixel_values, **config):
    aligner = Aligner(AlignConfig(enabled=True, teacher=teacher.spec.name, **config), teacher)
    return aligner.teacher_targets(pixel_values)


# --- keys -----------------------------------------------------------------------------------------------------------


def test_a_sample_key_is_its_frames_in_camera_order():
    a, b = (frame_key(f) for f in frames(2))
    assert sample_key([a, b]) != sample_key([b, a]) != sample_key([a])
    assert sample_key([a]) != a and len(sample_key([a, b])) == 16  # never a frame's key
    pv = stacked(samples(3))
    from openvla_align.vla.pixels import split_images

    keys = keys_from_pixel_values(split_images(pv))
    assert keys[:2] == [frame_key(f) for f in samples(3)[0]]  # one image per row, a sample's cameras in a row


# --- a multi-view teacher's cache ----------------------------------------------------------------------------------


def test_multi_view_cache_stores_samples_and_equals_the_live_teacher(tmp_path):
    """VGGT's targets of a sample depend on all its cameras: the cache stores one row per sample, (2 x 256, D),
    keyed by its frames in order, computed with the run's teacher input and pooling (Spatial Forcing's here); the
    Aligner reads them exactly where it would run the teacher."""
    teacher, data = vggt(), samples(5)
    summary = build(tmp_path / "c", teacher, iter(data), batch_size=2, shard_rows=3, dtype="float16", **SF)
    assert (summary["rows"], summary["views"], summary["stored"], summary["computed"]) == ("samples", 2, 5, 5)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["spec"]["multi_view"] is True and manifest["spec"]["views"] == 2
    assert manifest["spec"]["teacher_input"] == "spatial-forcing" and manifest["spec"]["pooling_pos_embed"] == 0.1
    assert [s["rows"] for s in manifest["shards"]] == [3, 2]
    cache = TeacherCache(tmp_path / "c")
    assert cache.multi_view and cache.views == 2 and len(cache) == 5 and cache.width == teacher.width

    batch = data[1:4]
    pv = stacked(batch)
    want = live(teacher, pv, **SF)  # (3, 512, D): the two cameras through VGGT together
    assert want.shape == (3, 512, teacher.width)
    got = Aligner(AlignConfig(enabled=True, teacher="vggt-1b", **SF), cache).teacher_targets(pv)
    assert got.shape == want.shape and got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=2e-3 * want.abs().max().item())
    # a camera's features depend on the other camera: one camera's sample is not half of a two-camera sample
    alone = live(teacher, pv[:, :6], **SF)
    assert (alone - want[:, :256]).abs().max() > 5 * 2e-3 * want.abs().max()  # well above the storage error

    swapped = torch.cat([pv[:, 6:], pv[:, :6]], dim=1)  # the same frames, cameras in the other order
    with pytest.raises(CacheError, match=r"Sample 0 of the batch \(2 camera frames together"):
        cache.targets(swapped.reshape(6, 6, 224, 224), views=2)
    with pytest.raises(CacheError, match=r"per sample of 2 camera\(s\) seen together, but this run aligns 1 image"):
        cache.targets(pv[:, :6], views=1)


def test_resumed_multi_view_build_computes_only_the_missing_samples(tmp_path):
    teacher, data = vggt(), samples(5, seed=4)

    def interrupted():
        yield from data[:3]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "c", teacher, interrupted(), batch_size=1, shard_rows=2)
    summary = build(tmp_path / "c", teacher, iter(data), batch_size=1, shard_rows=2)
    assert (summary["resumed_with"], summary["computed"], summary["stored"]) == (2, 3, 5)
    with pytest.raises(ValueError, match="A sample has 3 camera frames, the first one had 2"):
        build(tmp_path / "d", teacher, iter([data[0], data[1] + data[1][:1]]), batch_size=1)
    with pytest.raises(CacheError, match="made differently .*views: cache has 2, now 3"):
        build(tmp_path / "c", teacher, iter(samples(2, views=3)))


def test_single_view_teacher_stores_every_cameras_frames(tmp_path):
    """C-RADIO on two cameras: each frame is a row of its own (keyed by the frame), so the cache serves a run that
    aligns both cameras, image by image, as the live teacher does."""
    teacher, data = radio(), samples(3, seed=6)
    summary = build(tmp_path / "c", teacher, iter(data), teacher_name="c-radio-v3-l", source={"cameras": ["a", "b"]})
    assert (summary["rows"], summary["stored"], summary["frames_seen"]) == ("frames", 6, 6)
    cache = TeacherCache(tmp_path / "c")
    assert not cache.multi_view and cache.views == 1 and source_cameras(cache.spec) == ["a", "b"]
    pv = stacked(data[:2])
    got = Aligner(AlignConfig(enabled=True), cache).teacher_targets(pv)
    want = live(teacher, pv)
    assert got.shape == want.shape == (2, 512, teacher.width)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    with pytest.raises(ValueError, match="views=2: a single-view teacher's rows are frames"):
        build(tmp_path / "d", teacher, iter(data), teacher_name="c-radio-v3-l", views=2)


# --- refused before the model loads ----------------------------------------------------------------------------------


def _spec(**kwargs):
    base = dict(teacher="vggt-1b", weights_sha256="", resolution=518, grid=(16, 16), width=64, dtype="bfloat16")
    return CacheSpec(**{**base, "source": {"kind": "test"}, **kwargs})


def _open(directory, views, **config):
    cfg = AlignConfig(enabled=True, teacher="vggt-1b", teacher_cache=str(directory), **config)
    return open_for_training(cfg, views=views)


def test_a_cache_for_another_number_of_views_or_teacher_kind_is_refused_in_one_line(tmp_path):
    CacheWriter(tmp_path / "mv", _spec(multi_view=True, views=2)).close()
    assert _open(tmp_path / "mv", 2).views == 2
    assert _open(tmp_path / "mv", None).views == 2  # a caller that does not know its views: checked at lookup
    for views, hint in ((1, "--align.images"), (3, "--num-images 3")):
        with pytest.raises(CacheError) as info:
            _open(tmp_path / "mv", views)
        message = str(info.value)
        assert "\n" not in message and hint in message and "drop --align.teacher_cache" in message
        assert f"per sample of 2 camera(s) seen together, this run aligns {views} image(s)" in message

    # a single-view teacher's cache for the multi-view teacher: its per-frame features are not VGGT's per-sample ones
    CacheWriter(tmp_path / "sv", _spec(teacher="c-radio-v3-l", width=32, resolution=256)).close()
    with pytest.raises(CacheError, match=r"holds 'c-radio-v3-l' features but --align.teacher is 'vggt-1b'"):
        _open(tmp_path / "sv", 2)
    # a single-view cache of the primary camera's frames, for a run aligning two cameras
    rlds = _spec(teacher="c-radio-v3-l", width=32, resolution=256, source={"kind": "rlds", "dataset": "sft"})
    CacheWriter(tmp_path / "rlds", rlds).close()
    cfg = AlignConfig(enabled=True, teacher_cache=str(tmp_path / "rlds"))
    open_for_training(cfg, views=1)
    with pytest.raises(CacheError, match=r"frames of 1 camera\(s\) per sample \(image_primary\), this run aligns 2"):
        open_for_training(cfg, views=2)
    both = _spec(teacher="c-radio-v3-l", width=32, resolution=256, source={"cameras": ["image_primary", "wrist"]})
    CacheWriter(tmp_path / "both", both).close()
    open_for_training(AlignConfig(enabled=True, teacher_cache=str(tmp_path / "both")), views=2)

    # built with other teacher inputs or pooling than the run's
    with pytest.raises(CacheError, match="--align.teacher_input 'reference', this run has 'spatial-forcing'"):
        _open(tmp_path / "mv", 2, **SF)
    CacheWriter(tmp_path / "sf", _spec(multi_view=True, views=2, **SF)).close()
    _open(tmp_path / "sf", 2, **SF)
    with pytest.raises(CacheError, match="pooling_pos_embed 0.1, this run has 0.0"):
        _open(tmp_path / "sf", 2, teacher_input="spatial-forcing", pooling="bilinear-corners")


def test_manifests_before_views_read_as_single_view_frames(tmp_path):
    CacheWriter(tmp_path / "c", _spec(teacher="c-radio-v3-l")).close()
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    for name in ("multi_view", "views", "teacher_input", "pooling", "pooling_pos_embed"):
        del manifest["spec"][name]  # as written before these fields
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    spec = TeacherCache(tmp_path / "c").spec
    assert (spec.multi_view, spec.views, spec.teacher_input, spec.pooling) == (False, 1, "reference", "resample")
    manifest["spec"]["from_the_future"] = 1
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="written by a newer version"):
        TeacherCache(tmp_path / "c")
    with pytest.raises(ValueError, match="a single-view teacher's rows are frames"):
        _spec(views=2)


# --- sources and the CLI -------------------------------------------------------------------------------------------


def _tiny_vggt_factory(path=None, resolution=None, grid=(16, 16), allow_random=False, trust_remote_code=False, **_):
    from openvla_align.teachers.vggt import build as build_vggt

    request = TeacherRequest(path, resolution, grid, allow_random, trust_remote_code, TINY_VIT)
    return build_vggt(teacher_spec("vggt-1b"), request)


@pytest.fixture
def tiny_vggt_registered():
    """``tiny-vggt-views-test`` in the registry for one test (registered at import, it would join the registry-wide
    parametrisations of other test files collected in the same process)."""
    from openvla_align.teachers import _registry

    register_teacher("tiny-vggt-views-test")(_tiny_vggt_factory)
    yield
    _registry._REGISTRY.pop("tiny-vggt-views-test", None)


def _camera_dirs(root, data, cameras=("primary", "wrist")):
    for v, camera in enumerate(cameras):
        (root / camera).mkdir(parents=True)
        for i, sample in enumerate(data):
            Image.fromarray(sample[v]).save(root / camera / f"{i:03d}.png")


def test_cli_builds_a_multi_view_cache_from_camera_folders(tmp_path, capsys, tiny_vggt_registered):
    data = samples(3, seed=8)
    _camera_dirs(tmp_path / "images", data)
    argv = ["cache", "build", str(tmp_path / "c"), "--images", str(tmp_path / "images"), "--num-images", "2"]
    argv += ["--teacher", "tiny-vggt-views-test", "--allow-random-teacher", "--device", "cpu", "--batch-size", "2"]
    argv += ["--teacher-input", "spatial-forcing", "--pooling", "bilinear-corners", "--pooling-pos-embed", "0.1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 0
    assert "3 samples of 2 cameras (3 computed now, 0 already there)" in capsys.readouterr().out
    assert main(["cache", "verify", str(tmp_path / "c")]) == 0
    assert "OK, 3 samples of 2 cameras seen together in 1 shards" in capsys.readouterr().out
    cache = TeacherCache(tmp_path / "c")
    assert cache.spec.source["cameras"] == ["primary", "wrist"]
    assert sample_key([frame_key(f) for f in data[2]]) in cache

    it, source = image_dir_samples(tmp_path / "images", ["wrist", "primary"])
    assert source["cameras"] == ["wrist", "primary"] and np.array_equal(next(it)[0], data[0][1])
    base = ["cache", "build", str(tmp_path / "d"), "--images", str(tmp_path / "images")]
    cli_fails(capsys, [*base, "--cameras", "primary,wrist"], r"--cameras names 2 camera\(s\) but --num-images is 1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        more = [*base, "--num-images", "3", "--teacher", "tiny-vggt-views-test", "--allow-random-teacher"]
        cli_fails(capsys, more, "--num-images 3, but .* has 2 camera subfolders")
    (tmp_path / "images" / "wrist" / "000.png").rename(tmp_path / "images" / "wrist" / "999.png")
    with pytest.raises(ValueError, match="do not hold the same file names"):
        image_dir_samples(tmp_path / "images")
    with pytest.raises(FileNotFoundError, match="one subfolder of .* per camera"):
        image_dir_samples(tmp_path / "images" / "primary")


def test_rlds_cameras_are_the_primary_then_every_wrist_camera_as_oft_feeds_them():
    """OFT's RLDSBatchTransform: image_primary, then each observation key holding "wrist", in the observation's
    order. (Reading a real RLDS build through OFT's pipeline: tests/test_oft_cache.py, in the OFT environment.)"""
    assert step_cameras({"image_primary": 0, "image_wrist": 0, "proprio": 0}) == ["image_primary", "image_wrist"]
    observation = {"image_primary": 0, "image_left_wrist": 0, "image_right_wrist": 0, "proprio": 0}
    assert step_cameras(observation) == ["image_primary", "image_left_wrist", "image_right_wrist"]
    assert callable(rlds_frames)


def test_the_plugin_opens_a_multi_view_cache_for_the_images_it_aligns(tmp_path):
    """OFT with two cameras: the align plugin's setup opens a multi-view cache for 2 views (every camera aligned),
    and refuses it with --align.images primary (1 view), before the model loads."""
    from openvla_align.openvla.plugins import AlignPlugin

    CacheWriter(tmp_path / "mv", _spec(multi_view=True, views=2, **SF)).close()

    class OftCfg:  # OpenVLA-OFT's FinetuneConfig, as the host registry recognises it
        vla_path, num_images_in_input, resume, image_aug = "unused", 2, False, False
        data_root_dir, dataset_name = "unused", None

    cfg = dict(enabled=True, teacher="vggt-1b", teacher_cache=str(tmp_path / "mv"), **SF)
    plugin = AlignPlugin(AlignConfig(**cfg))
    plugin.setup(OftCfg())
    assert plugin.cache.multi_view and plugin.cache.views == 2 and plugin.teacher is None  # no teacher is built
    with pytest.raises(CacheError, match=r"this run aligns 1 image"):
        AlignPlugin(AlignConfig(**cfg, images="primary")).setup(OftCfg())
