"""`openvla-align cache build`: run the teacher once over every training frame and store its patch features.

Frames come from an RLDS dataset through OpenVLA's own pipeline (decode, resize to the VLA's input size, no
augmentation: exactly the frames training sees) or from a directory of images. The teacher sees each frame the way
it sees it during training (fused ``pixel_values`` → [0,1] RGB → teacher), in its inference dtype under
``torch.inference_mode``, so cached targets equal live ones up to the storage dtype.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Dict, Iterable, Iterator, Tuple

import numpy as np
import torch

from ..argtypes import existing_dir, need_dir, need_output_dir, output_dir, positive_int
from ..config import TEACHER_DTYPES
from ..targets.cache import (
    STORAGE_DTYPES,
    CacheSpec,
    CacheWriter,
    TeacherCache,
    file_sha256,
    read_manifest,
    rlds_identity,
)
from ..targets.frame_keys import frame_key, pixel_values_from_frames

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# --------------------------------------------------------------------------------------------------- frame sources
def image_dir_frames(root, size: int = 224) -> Tuple[Iterator[np.ndarray], Dict[str, object]]:
    """uint8 RGB frames from the images under ``root`` (sorted), resized to ``size`` as OpenVLA's processor does
    (PIL bicubic; frames already ``size`` x ``size`` are kept byte for byte)."""
    from PIL import Image

    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_SUFFIXES)}) under {root}.")

    def frames():
        for path in files:
            img = Image.open(path).convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), resample=Image.Resampling.BICUBIC)
            yield np.asarray(img, dtype=np.uint8)

    return frames(), {"kind": "images", "root": str(root.resolve()), "files": len(files), "size": size}


def rlds_frames(data_root, dataset_name: str, size: int = 224) -> Tuple[Iterator[np.ndarray], Dict[str, object]]:
    """Every frame of an RLDS dataset once, through OpenVLA's pipeline without augmentation (needs OpenVLA's stack)."""
    from ..openvla.datasets import check_dataset, register_paper_datasets

    register_paper_datasets()
    check_dataset(data_root, dataset_name)
    from prismatic.vla.datasets import EpisodicRLDSDataset

    def first_image(rlds_batch):
        return rlds_batch["observation"]["image_primary"][0]

    dataset = EpisodicRLDSDataset(
        Path(data_root),
        dataset_name,
        first_image,
        resize_resolution=(size, size),
        shuffle_buffer_size=1,
        train=True,
        image_aug=False,
    )

    def frames():
        for episode in dataset:
            yield from (np.asarray(f, dtype=np.uint8) for f in episode)

    return frames(), {"kind": "rlds", **rlds_identity(data_root, dataset_name), "size": size}


# --------------------------------------------------------------------------------------------------- the build
def _batches(frames: Iterable[np.ndarray], size: int):
    batch = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def build_cache(
    out,
    teacher,
    frames: Iterable[np.ndarray],
    *,
    source: Dict[str, object],
    teacher_name: str,
    weights_sha256: str = "",
    dtype: str = "bfloat16",
    batch_size: int = 32,
    shard_rows: int = 4096,
    device: str = "cpu",
    progress: bool = True,
) -> Dict[str, object]:
    """Write (or resume) the cache in ``out``; returns counts and throughput (frames/s of teacher inference)."""
    spec = CacheSpec(
        teacher=teacher_name,
        weights_sha256=weights_sha256,
        resolution=int(teacher.resolution),
        grid=tuple(teacher.grid),
        width=int(teacher.width),
        dtype=dtype,
        source=source,
    )
    writer = CacheWriter(out, spec, shard_rows=shard_rows)
    resumed = len(writer)
    teacher = teacher.to(device).eval()
    seen = computed = 0
    compute_time = 0.0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="teacher features", unit="frame", total=source.get("frames") or source.get("files"))
    start = time.perf_counter()
    for batch in _batches(frames, batch_size):
        keys = [frame_key(f) for f in batch]
        todo = [i for i, k in enumerate(keys) if not writer.has(k)]
        seen += len(batch)
        if todo:
            pixel_values = pixel_values_from_frames([batch[i] for i in todo]).to(device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                from ..vla.pixels import rgb_from_pixel_values

                feats = teacher(rgb_from_pixel_values(pixel_values)).to("cpu")
            compute_time += time.perf_counter() - t0
            computed += writer.add([keys[i] for i in todo], feats)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    writer.close(complete=True)
    elapsed = time.perf_counter() - start
    return {
        "out": str(Path(out)),
        "frames_seen": seen,
        "computed": computed,
        "resumed_with": resumed,
        "stored": len(writer),
        "seconds": round(elapsed, 3),
        "teacher_frames_per_s": round(computed / compute_time, 2) if compute_time else None,
        "frames_per_s": round(seen / elapsed, 2) if elapsed else None,
    }


# --------------------------------------------------------------------------------------------------- CLI
def _cmd_build(args) -> int:
    from ..teachers.build import build_teacher

    if bool(args.images) == bool(args.dataset):
        raise ValueError("give exactly one frame source, --images DIR or --dataset NAME.")
    need_output_dir(args.out, "cache directory")
    if args.dataset:
        need_dir(args.data_root, "--data-root (the RLDS root holding the dataset)")
        need_dir(Path(args.data_root) / args.dataset, f"dataset {args.dataset!r} under --data-root")
    teacher = build_teacher(  # before the frame source: a teacher error is the commoner one, and cheaper to find
        args.teacher,
        path=args.teacher_path,
        resolution=args.teacher_resolution,
        allow_random=args.allow_random_teacher,
        trust_remote_code=args.trust_remote_code,
        dtype=args.teacher_dtype,
        device=args.device,
    )
    if args.images:
        frames, source = image_dir_frames(args.images, size=args.size)
    else:
        frames, source = rlds_frames(args.data_root, args.dataset, size=args.size)
    summary = build_cache(
        args.out,
        teacher,
        frames,
        source=source,
        teacher_name=args.teacher,
        weights_sha256=file_sha256(args.teacher_path),
        dtype=args.dtype,
        batch_size=args.batch_size,
        shard_rows=args.shard_rows,
        device=args.device,
    )
    print(
        f"cache {summary['out']}: {summary['stored']} frames ({summary['computed']} computed now, "
        f"{summary['resumed_with']} already there); teacher {summary['teacher_frames_per_s']} frames/s, "
        f"overall {summary['frames_per_s']} frames/s"
    )
    return 0


def _cmd_verify(args) -> int:

    cache = TeacherCache(args.out, verify=True)
    manifest = read_manifest(args.out)
    spec = cache.spec
    print(
        f"{args.out}: OK, {len(cache)} frames in {len(manifest['shards'])} shards; teacher {spec.teacher} "
        f"({spec.width} wide, {spec.grid[0]}x{spec.grid[1]} grid at {spec.resolution} px), {spec.dtype}"
    )
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("cache")
    sub = p.add_subparsers(dest="cache_command", required=True)
    b = sub.add_parser("build", help="Run the teacher over every training frame into a sharded, memory-mapped store.")
    b.add_argument(
        "out", type=output_dir, help="cache directory (an interrupted build resumes when re-run with the same settings)"
    )
    b.add_argument("--dataset", help="RLDS dataset name (read through OpenVLA's pipeline, as training reads it)")
    b.add_argument("--data-root", default="datasets/open-x-embodiment", help="RLDS root (finetune.py's data_root_dir)")
    b.add_argument(
        "--images", type=existing_dir, help="or: a directory of images (frames as the VLA's processor receives them)"
    )
    b.add_argument("--size", type=positive_int, default=224, help="VLA input size the frames are resized to (224)")
    b.add_argument("--teacher", default="c-radio-v3-l", help="registered teacher name (openvla-align teachers)")
    b.add_argument("--teacher-path", default=None, help="teacher weights (file or snapshot directory)")
    b.add_argument(
        "--teacher-resolution", type=positive_int, default=None, help="teacher input size (default: grid x patch)"
    )
    b.add_argument(
        "--teacher-dtype",
        default="auto",
        choices=TEACHER_DTYPES,
        help="teacher inference dtype (auto: bfloat16 on CUDA, float32 elsewhere, as in training)",
    )
    b.add_argument("--allow-random-teacher", action="store_true", help="random teacher weights (smoke tests only)")
    b.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a teacher checkpoint's own code to run (Theia, RADIO hub)",
    )
    b.add_argument("--dtype", default="bfloat16", choices=STORAGE_DTYPES, help="storage dtype")
    b.add_argument("--batch-size", type=positive_int, default=32, help="frames per teacher forward pass")
    b.add_argument("--shard-rows", type=positive_int, default=4096, help="frames per shard")
    b.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device of the teacher"
    )
    b.set_defaults(func=_cmd_build)
    v = sub.add_parser("verify", help="Check a cache's manifest and every shard's size and SHA-256.")
    v.add_argument("out", type=existing_dir, help="cache directory written by `cache build`")
    v.set_defaults(func=_cmd_verify)
    return p
