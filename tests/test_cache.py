"""Precomputed teacher features: keys, the sharded store, the builder (resume, corruption) and training from it."""

import json
import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TVF
from PIL import Image

from openvla_align import AlignConfig, Aligner
from openvla_align.cache.build import build_cache, image_dir_frames
from openvla_align.cli import main
from openvla_align.openvla.plugins import AlignPlugin
from openvla_align.targets.cache import CacheError, CacheSpec, CacheWriter, TeacherCache, open_for_training
from openvla_align.targets.frame_keys import (
    frame_key,
    frames_from_pixel_values,
    keys_from_pixel_values,
    pixel_values_from_frames,
)
from openvla_align.tiny import tiny_teacher
from openvla_align.vla.pixels import IMAGENET_MEAN, IMAGENET_STD

from conftest import cli_fails, make_batch


def frames(n, size=224, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def build(out, teacher, fs, **kwargs):
    """`build_cache` with this file's defaults: frames from a test, the tiny C-RADIOv3 teacher, no progress bar."""
    kwargs = {"source": {"kind": "test"}, "teacher_name": "c-radio-v3-l", "progress": False, **kwargs}
    return build_cache(out, teacher, fs, **kwargs)


def radio():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_teacher("c-radio-v3-l", seed=1)


def live_targets(teacher, fs):
    aligner = Aligner(AlignConfig(enabled=True), teacher)
    return aligner.teacher_targets(pixel_values_from_frames(fs))


# --- keys ---------------------------------------------------------------------------------------------------------


def test_frames_come_back_bit_for_bit_from_processor_output():
    fs = frames(3)
    # what OpenVLA's PrismaticImageProcessor computes per tower: to_tensor, then normalize (float32)
    dino = [TVF.normalize(TVF.to_tensor(Image.fromarray(f)), IMAGENET_MEAN, IMAGENET_STD) for f in fs]
    siglip = [TVF.normalize(TVF.to_tensor(Image.fromarray(f)), (0.5,) * 3, (0.5,) * 3) for f in fs]
    fused = torch.stack([torch.cat([d, s]) for d, s in zip(dino, siglip)])
    torch.testing.assert_close(fused, pixel_values_from_frames(fs), rtol=0, atol=1e-6)
    back = frames_from_pixel_values(fused)
    assert all(np.array_equal(a, b) for a, b in zip(back, fs))
    assert keys_from_pixel_values(fused) == [frame_key(f) for f in fs]
    assert np.array_equal(frames_from_pixel_values(torch.stack(dino))[1], fs[1])  # single-tower input too
    assert len({frame_key(f) for f in fs}) == 3 and frame_key(fs[0][:112]) != frame_key(fs[0])


def test_augmented_or_random_pixel_values_are_refused():
    pv = pixel_values_from_frames(frames(2))
    with pytest.raises(ValueError, match="--image_aug false"):
        frames_from_pixel_values(pv * 0.9 + 0.01)  # e.g. a brightness/contrast jitter after the processor
    with pytest.raises(ValueError, match="do not come from uint8 frames"):
        keys_from_pixel_values(torch.randn(1, 6, 8, 8))


# --- store + builder ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [("bfloat16", 1e-2), ("float16", 2e-3)])
def test_round_trip_equals_the_live_teacher(tmp_path, dtype, tol):
    teacher, fs = radio(), frames(7)
    summary = build(tmp_path / "c", teacher, iter(fs), dtype=dtype, batch_size=3, shard_rows=4)
    assert (summary["stored"], summary["computed"], summary["resumed_with"]) == (7, 7, 0)
    assert summary["teacher_frames_per_s"] > 0
    cache = TeacherCache(tmp_path / "c")
    assert len(cache) == 7 and cache.width == 32 and cache.spec.grid == (16, 16) and cache.spec.dtype == dtype
    got = cache.lookup([frame_key(f) for f in reversed(fs)])
    assert got.dtype == getattr(torch, dtype) and got.shape == (7, 256, 32)
    want = live_targets(teacher, fs).flip(0)
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [4, 3] and manifest["complete"] is True


def test_interrupted_build_resumes_to_the_same_cache(tmp_path):
    teacher, fs = radio(), frames(10, seed=3)

    def interrupted():
        yield from fs[:7]
        raise KeyboardInterrupt  # the user hits ^C after 7 frames (one 4-row shard committed)

    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "c", teacher, interrupted(), batch_size=2, shard_rows=4)
    with pytest.raises(CacheError, match="unfinished cache build"):
        TeacherCache(tmp_path / "c")
    summary = build(tmp_path / "c", teacher, iter(fs), batch_size=2, shard_rows=4)
    assert (summary["resumed_with"], summary["computed"], summary["stored"]) == (4, 6, 10)
    build(tmp_path / "ref", teacher, iter(fs), batch_size=2, shard_rows=4)
    keys = [frame_key(f) for f in fs]
    assert torch.equal(TeacherCache(tmp_path / "c").lookup(keys), TeacherCache(tmp_path / "ref").lookup(keys))


@pytest.fixture
def built(tmp_path):
    build(tmp_path / "c", radio(), iter(frames(6)), batch_size=4, shard_rows=4)
    return tmp_path / "c"


def test_corrupt_truncated_and_missing_shards_fail_loudly(built):
    shard = built / "shard-00000.feats"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"shard-00000.feats is corrupt \(its SHA-256"):
        TeacherCache(built)
    TeacherCache(built, verify=False)  # sizes only: a flipped byte passes, as documented
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(CacheError, match="truncated or stale"):
        TeacherCache(built, verify=False)
    shard.unlink()
    with pytest.raises(CacheError, match="is missing"):
        TeacherCache(built)
    (built / "manifest.json").write_text("{broken")
    with pytest.raises(CacheError, match="unreadable"):
        TeacherCache(built)


def test_a_shard_damaged_after_the_run_opened_it_stops_with_one_line(built):
    """Training reads a shard that was cut short, removed or overwritten with garbage after the cache was opened
    (verified): one line naming the shard and `openvla-align cache verify`, never a SIGBUS from the memory map."""
    keys = [frame_key(f) for f in frames(6)]
    cache = TeacherCache(built)
    good = cache.lookup(keys)
    shard = built / "shard-00000.feats"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # the first shard (rows 0-3) truncated under the open maps
    with pytest.raises(CacheError) as err:
        cache.lookup(keys[:2])
    message = str(err.value)
    assert "\n" not in message and str(shard) in message and f"openvla-align cache verify {built}" in message
    assert f"{len(data) // 2} bytes; {len(data)} bytes then" in message
    assert torch.equal(cache.lookup(keys[4:]), good[4:])  # rows of the intact shard still read
    shard.unlink()
    with pytest.raises(CacheError, match="shard-00000.feats changed since the run opened it .unreadable"):
        cache.lookup(keys[:1])
    garbage = np.frombuffer(data, dtype="<i2").copy()
    garbage[:] = 0x7F80 if cache.spec.dtype == "bfloat16" else 0x7C00  # +inf in the cache's 16-bit float format
    shard.write_bytes(garbage.tobytes())  # same size, non-finite values
    fresh = TeacherCache(built, verify=False)  # sizes only at open: the content is found bad when read
    with pytest.raises(CacheError, match=r"shard-00000.feats holds non-finite values in row 0: it is corrupt"):
        fresh.lookup(keys[:1])


def test_missing_key_and_foreign_caches(built, tmp_path):
    cache = TeacherCache(built)
    with pytest.raises(CacheError, match="is not in the teacher cache"):
        cache.lookup([frame_key(frames(1, seed=99)[0])])
    with pytest.raises(CacheError, match=r"holds 'c-radio-v3-l' features but --align.teacher is 'dinov2-vit-l'"):
        open_for_training(AlignConfig(enabled=True, teacher="dinov2-vit-l", teacher_cache=str(built)))
    with pytest.raises(CacheError, match="built at 256 px"):
        open_for_training(AlignConfig(enabled=True, teacher_resolution=512, teacher_cache=str(built)))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"other weights")
    spec = CacheSpec("c-radio-v3-l", "0" * 64, 256, (16, 16), 32, "bfloat16", {"kind": "test"})
    CacheWriter(tmp_path / "w", spec).close()
    with pytest.raises(CacheError, match="other teacher weights"):
        open_for_training(AlignConfig(enabled=True, teacher_path=str(weights), teacher_cache=str(tmp_path / "w")))
    with pytest.raises(CacheError, match="already holds a cache made differently .*dtype"):
        CacheWriter(built, CacheSpec("c-radio-v3-l", "", 256, (16, 16), 32, "float16", {"kind": "test"}))
    with pytest.raises(CacheError, match="not a teacher cache"):
        TeacherCache(tmp_path / "nowhere")


def test_rlds_cache_must_match_the_training_dataset(tmp_path):
    root = tmp_path / "data"
    (root / "sft" / "1.0.0").mkdir(parents=True)
    (root / "sft" / "1.0.0" / "dataset_info.json").write_text('{"name": "sft"}')
    from openvla_align.targets.cache import rlds_identity

    spec = CacheSpec("c-radio-v3-l", "", 256, (16, 16), 32, "bfloat16", {"kind": "rlds", **rlds_identity(root, "sft")})
    CacheWriter(tmp_path / "c", spec).close()
    cfg = AlignConfig(enabled=True, teacher_cache=str(tmp_path / "c"))
    open_for_training(cfg, "sft", root)
    with pytest.raises(CacheError, match="built on dataset 'sft', training uses 'warmup'"):
        open_for_training(cfg, "warmup", root)
    (root / "sft" / "1.0.0" / "dataset_info.json").write_text('{"name": "sft", "rebuilt": true}')
    with pytest.raises(CacheError, match="changed since"):
        open_for_training(cfg, "sft", root)


# --- training from the cache ----------------------------------------------------------------------------------------


class _Cfg:
    data_root_dir, dataset_name, image_aug, vla_path = "unused", "sft", False, None


def test_training_reads_targets_instead_of_running_the_teacher(tmp_path, vla, tokenizer):
    teacher = radio()
    fs = frames(4, seed=5)
    build(tmp_path / "c", teacher, iter(fs), dtype="float16")
    batch = make_batch(tokenizer, 2)
    batch["pixel_values"] = pixel_values_from_frames(fs[1:3])

    cfg = AlignConfig(enabled=True, projector_dim=32, teacher_cache=str(tmp_path / "c"))
    cached = AlignPlugin(cfg)
    cached.setup(_Cfg())
    assert cached.teacher is None and cached.cache is not None  # no teacher built at all
    cached.on_model_ready(vla)
    term, metrics = cached.loss(vla, batch, vla(**batch), 0)
    cached.on_save(tmp_path / "ckpt")
    cached.on_end()

    live = AlignPlugin(AlignConfig(enabled=True, projector_dim=32), teacher)
    live.on_model_ready(vla)
    live_term, live_metrics = live.loss(vla, batch, vla(**batch), 0)
    live.on_end()
    assert term.item() == pytest.approx(live_term.item(), rel=2e-3)
    assert metrics["align/cos_layer16"].item() == pytest.approx(live_metrics["align/cos_layer16"].item(), rel=2e-3)

    resumed = AlignPlugin(cfg)
    resumed.setup(_Cfg())
    resumed.on_model_ready(vla)
    resumed.on_resume(tmp_path / "ckpt")  # the sidecar of a cached run restores without a teacher
    resumed.on_end()

    with pytest.raises(CacheError, match="is not in the teacher cache"):
        batch["pixel_values"] = pixel_values_from_frames(frames(2, seed=77))
        resumed.on_model_ready(vla)
        resumed.loss(vla, batch, vla(**batch), 1)


def test_cache_with_image_augmentation_is_refused(built):
    class Aug(_Cfg):
        image_aug = True

    with pytest.raises(ValueError, match="colour jitter"):
        AlignPlugin(AlignConfig(enabled=True, teacher_cache=str(built))).setup(Aug())


def test_cli_build_and_verify(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i, f in enumerate(frames(5, size=64)):
        Image.fromarray(f).save(images / f"{i}.png")
    args = ["cache", "build", str(tmp_path / "c"), "--images", str(images), "--teacher", "dinov2-vit-s"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*args, "--allow-random-teacher", "--batch-size", "2", "--device", "cpu"]) == 0
    assert "5 frames (5 computed now, 0 already there)" in capsys.readouterr().out
    assert main(["cache", "verify", str(tmp_path / "c")]) == 0
    assert "OK, 5 frames in 1 shards; teacher dinov2-vit-s (384 wide, 16x16 grid at 224 px)" in capsys.readouterr().out
    frames_iter, source = image_dir_frames(images)
    first = next(frames_iter)
    assert first.shape == (224, 224, 3) and source["files"] == 5
    assert frame_key(first) in TeacherCache(tmp_path / "c")
    cli_fails(capsys, ["cache", "build", str(tmp_path / "d")], "exactly one frame source")


def test_cache_for_another_grid_is_refused_when_the_model_is_ready(tmp_path, vla):
    spec = CacheSpec("c-radio-v3-l", "", 128, (8, 8), 32, "bfloat16", {"kind": "test"})
    CacheWriter(tmp_path / "c", spec).close()
    plugin = AlignPlugin(AlignConfig(enabled=True, projector_dim=32, teacher_cache=str(tmp_path / "c")))
    plugin.setup(_Cfg())
    with pytest.raises(ValueError, match=r"gives targets on a \(8, 8\) grid but the VLA has a \(16, 16\) visual token"):
        plugin.on_model_ready(vla)
