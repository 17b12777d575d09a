"""`openvla-align cache build`: run the teacher once over every training frame and store its patch features.

Frames come from an RLDS dataset through OpenVLA's own pipeline (decode, resize to the VLA's input size, no
augmentation: exactly the frames training sees) or from a directory of images. The teacher sees each frame the way
it sees it during training (fused ``pixel_values`` → [0,1] RGB by the run's teacher input → teacher, with the run's
pooling), in its inference dtype under ``torch.inference_mode``, so cached targets equal live ones up to the storage
dtype.

Several cameras per sample (OpenVLA-OFT's ``--num_images_in_input N``, ``--num-images N`` here): the RLDS source
reads each step's cameras as OFT's pipeline feeds them (the primary camera, then every wrist camera; needs OFT's
``prismatic``), an image directory holds one subfolder per camera with the same file names. A single-view teacher's
rows are still frames (every camera's, each keyed on its own); a multi-view teacher (VGGT) sees each sample's N
cameras together and its rows are samples (``targets.cache``).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

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
from ..targets.frame_keys import frame_key, pixel_values_from_frames, sample_key

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# --------------------------------------------------------------------------------------------------- frame sources
Sample = Tuple[np.ndarray, ...]  # one step's camera frames, in the order the VLA is fed them


def _images_under(root: Path) -> List[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _load_frame(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), resample=Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def image_dir_frames(root, size: int = 224) -> Tuple[Iterator[np.ndarray], Dict[str, object]]:
    """uint8 RGB frames from the images under ``root`` (sorted), resized to ``size`` as OpenVLA's processor does
    (PIL bicubic; frames already ``size`` x ``size`` are kept byte for byte)."""
    root = Path(root)
    files = _images_under(root)
    if not files:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_SUFFIXES)}) under {root}.")

    def frames():
        for path in files:
            yield _load_frame(root / path, size)

    return frames(), {"kind": "images", "root": str(root.resolve()), "files": len(files), "size": size}


def image_dir_samples(
    root, cameras: Optional[Sequence[str]] = None, size: int = 224
) -> Tuple[Iterator[Sample], Dict[str, object]]:
    """Samples of several cameras from ``root/<camera>/...``: one subfolder per camera (``cameras`` in the order the
    VLA is fed them; default: every subfolder, sorted by name), the same relative file names in each; a sample is
    the files of one name, one per camera. Frames are resized as in ``image_dir_frames``."""
    root = Path(root)
    if cameras is None:
        cameras = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    cameras = list(cameras)
    if len(cameras) < 2:
        raise FileNotFoundError(
            f"Several cameras per sample need one subfolder of {root} per camera (e.g. {root}/primary, "
            f"{root}/wrist, the same file names in each); found {cameras or 'none'}."
        )
    listed = {}
    for camera in cameras:
        if not (root / camera).is_dir():
            raise FileNotFoundError(f"Camera folder {root / camera} does not exist (cameras: {', '.join(cameras)}).")
        listed[camera] = _images_under(root / camera)
    names = listed[cameras[0]]
    for camera in cameras[1:]:
        if listed[camera] != names:
            odd = sorted(set(map(str, names)) ^ set(map(str, listed[camera])))
            raise ValueError(
                f"Camera folders {root / cameras[0]} and {root / camera} do not hold the same file names (e.g. "
                f"{', '.join(odd[:3]) or 'another order'}): a sample is one file name in every camera's folder."
            )
    if not names:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_SUFFIXES)}) under {root / cameras[0]}.")

    def samples():
        for name in names:
            yield tuple(_load_frame(root / camera / name, size) for camera in cameras)

    source = {"kind": "images", "root": str(root.resolve()), "files": len(names), "size": size, "cameras": cameras}
    return samples(), source


def step_cameras(observation) -> List[str]:
    """The image keys of an RLDS step, in the order OpenVLA-OFT feeds them to the VLA: ``image_primary``, then every
    key holding "wrist" in the observation's order (OFT's ``RLDSBatchTransform`` with ``use_wrist_image``)."""
    return ["image_primary"] + [k for k in observation if "wrist" in k]


def rlds_frames(
    data_root, dataset_name: str, size: int = 224, num_images: int = 1
) -> Tuple[Iterator[Union[np.ndarray, Sample]], Dict[str, object]]:
    """Every step of an RLDS dataset once, through OpenVLA's pipeline without augmentation (needs OpenVLA's stack):
    its primary camera's frame, or with ``num_images`` > 1 a sample of that many frames, the cameras OpenVLA-OFT's
    pipeline loads (primary, then wrist; needs OFT's ``prismatic``) in the order OFT feeds them."""
    from ..openvla.datasets import check_dataset, register_paper_datasets

    register_paper_datasets()
    check_dataset(data_root, dataset_name)
    from prismatic.vla.datasets import EpisodicRLDSDataset

    def first_image(rlds_batch):
        return rlds_batch["observation"]["image_primary"][0]

    def all_cameras(rlds_batch):
        obs = rlds_batch["observation"]
        return tuple(obs[k][0] for k in step_cameras(obs)), step_cameras(obs)

    dataset = EpisodicRLDSDataset(
        Path(data_root),
        dataset_name,
        first_image if num_images == 1 else all_cameras,
        resize_resolution=(size, size),
        shuffle_buffer_size=1,
        train=True,
        image_aug=False,
    )
    source = {"kind": "rlds", **rlds_identity(data_root, dataset_name), "size": size}
    if num_images == 1:

        def frames():
            for episode in dataset:
                yield from (np.asarray(f, dtype=np.uint8) for f in episode)

        return frames(), {**source, "cameras": ["image_primary"]}

    episodes = iter(dataset)
    first = next(episodes, None)
    if not first:
        raise ValueError(f"RLDS dataset {dataset_name!r} under {data_root} has no steps.")
    cameras = first[0][1]
    if len(cameras) != num_images:
        raise ValueError(
            f"--num-images {num_images}: the pipeline reads {len(cameras)} camera(s) per step of {dataset_name!r} "
            f"({', '.join(cameras)}). OpenVLA-OFT feeds the primary camera and every wrist camera "
            f"(--num_images_in_input {len(cameras)}); OpenVLA's own pipeline loads the primary camera alone (install "
            "OpenVLA-OFT's prismatic for its wrist cameras)."
        )

    def samples():
        for episode in itertools.chain([first], episodes):
            for frames, _ in episode:
                yield tuple(np.asarray(f, dtype=np.uint8) for f in frames)

    return samples(), {**source, "cameras": cameras}


# --------------------------------------------------------------------------------------------------- the build
def _batches(items: Iterable, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _as_sample(item) -> Sample:
    """A source's item as a sample: a bare (H, W, 3) frame is a sample of one camera."""
    if isinstance(item, np.ndarray) and item.ndim == 3:
        return (item,)
    return tuple(np.asarray(f) for f in item)


def _rows(items: Iterable, multi_view: bool):
    """(key, frames) per cache row: every frame on its own for a single-view teacher, each sample's frames together
    (keyed by ``sample_key``) for a multi-view one."""
    views = None
    for item in items:
        sample = _as_sample(item)
        if not multi_view:
            for frame in sample:
                yield frame_key(frame), (frame,)
            continue
        if views is None:
            views = len(sample)
        elif len(sample) != views:
            raise ValueError(f"A sample has {len(sample)} camera frames, the first one had {views}.")
        yield sample_key([frame_key(f) for f in sample]), sample


def build_cache(
    out,
    teacher,
    frames: Iterable,
    *,
    source: Dict[str, object],
    teacher_name: str,
    weights_sha256: str = "",
    dtype: str = "bfloat16",
    batch_size: int = 32,
    shard_rows: int = 4096,
    device: str = "cpu",
    progress: bool = True,
    views: Optional[int] = None,
    teacher_input: str = "reference",
    pooling: str = "resample",
    pooling_pos_embed: float = 0.0,
) -> Dict[str, object]:
    """Write (or resume) the cache in ``out``; returns counts and throughput (frames/s of teacher inference).

    ``frames``: uint8 (H, W, 3) frames, or samples (a tuple of one step's camera frames, in the VLA's order). A
    single-view teacher stores every frame as a row; a multi-view teacher (``teacher.multi_view``) stores each
    sample as a row of its cameras' features, computed together: its samples must all have ``views`` cameras
    (default: as many as the first). ``teacher_input``, ``pooling`` and ``pooling_pos_embed`` are the run's
    (``AlignConfig``'s fields of those names): the teacher is configured with them as training configures it.
    """
    from ..targets.inputs import configure_teacher, get_teacher_input

    multi_view = bool(getattr(teacher, "multi_view", False))
    rows = _rows(frames, multi_view)
    if multi_view:
        first = next(rows, None)
        found = len(first[1]) if first is not None else (views or 1)
        if views is not None and found != views:
            raise ValueError(f"views={views}, but the source's samples have {found} camera frame(s).")
        views = found
        rows = itertools.chain([first] if first is not None else [], rows)
    elif views not in (None, 1):
        raise ValueError(
            f"views={views}: a single-view teacher's rows are frames (each camera's keyed on its own); views is the "
            "cameras a multi-view teacher sees together."
        )
    spec = CacheSpec(
        teacher=teacher_name,
        weights_sha256=weights_sha256,
        resolution=int(teacher.resolution),
        grid=tuple(teacher.grid),
        width=int(teacher.width),
        dtype=dtype,
        source=source,
        multi_view=multi_view,
        views=views if multi_view else 1,
        teacher_input=teacher_input,
        pooling=pooling,
        pooling_pos_embed=float(pooling_pos_embed),
    )
    writer = CacheWriter(out, spec, shard_rows=shard_rows)
    resumed = len(writer)
    teacher = teacher.to(device).eval()
    configure_teacher(
        teacher, SimpleNamespace(teacher_input=teacher_input, pooling=pooling, pooling_pos_embed=pooling_pos_embed)
    )
    to_rgb = get_teacher_input(teacher_input).rgb
    seen = computed = 0
    compute_time = 0.0
    bar = None
    if progress:
        from tqdm import tqdm

        unit = "sample" if multi_view else "frame"
        bar = tqdm(desc="teacher features", unit=unit, total=source.get("frames") or source.get("files"))
    start = time.perf_counter()
    for batch in _batches(rows, batch_size):
        todo = [i for i, (key, _) in enumerate(batch) if not writer.has(key)]
        seen += len(batch)
        if todo:
            images = [f for i in todo for f in batch[i][1]]  # one image per row, a sample's cameras in a row
            pixel_values = pixel_values_from_frames(images).to(device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                rgb = to_rgb(pixel_values)
                if multi_view:
                    rgb = rgb.view(len(todo), views, *rgb.shape[1:])
                feats = teacher(rgb).to("cpu")
            compute_time += time.perf_counter() - t0
            computed += writer.add([batch[i][0] for i in todo], feats)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    writer.close(complete=True)
    elapsed = time.perf_counter() - start
    images_per_row = views if multi_view else 1
    return {
        "out": str(Path(out)),
        "rows": "samples" if multi_view else "frames",
        "views": images_per_row,
        "rows_seen": seen,
        "frames_seen": seen * images_per_row,
        "computed": computed,
        "resumed_with": resumed,
        "stored": len(writer),
        "seconds": round(elapsed, 3),
        # frames (camera images) per second, whether the teacher takes them one by one or a sample's together
        "teacher_frames_per_s": round(computed * images_per_row / compute_time, 2) if compute_time else None,
        "frames_per_s": round(seen * images_per_row / elapsed, 2) if elapsed else None,
    }


# --------------------------------------------------------------------------------------------------- CLI
def _cmd_build(args) -> int:
    from ..pooling import get_pooling
    from ..targets.inputs import get_teacher_input
    from ..teachers.build import build_teacher

    if bool(args.images) == bool(args.dataset):
        raise ValueError("give exactly one frame source, --images DIR or --dataset NAME.")
    if args.cameras and not args.images:
        raise ValueError("--cameras names an image directory's camera subfolders: use it with --images DIR.")
    if args.cameras and len(args.cameras) != args.num_images:
        raise ValueError(f"--cameras names {len(args.cameras)} camera(s) but --num-images is {args.num_images}.")
    get_teacher_input(args.teacher_input)  # the registries' own errors, before the teacher is built
    get_pooling(args.pooling)
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
    if args.images and args.num_images > 1:
        frames, source = image_dir_samples(args.images, args.cameras, size=args.size)
        if len(source["cameras"]) != args.num_images:
            raise ValueError(
                f"--num-images {args.num_images}, but {args.images} has {len(source['cameras'])} camera subfolders "
                f"({', '.join(source['cameras'])}); name them with --cameras."
            )
    elif args.images:
        frames, source = image_dir_frames(args.images, size=args.size)
    else:
        frames, source = rlds_frames(args.data_root, args.dataset, size=args.size, num_images=args.num_images)
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
        views=args.num_images if getattr(teacher, "multi_view", False) else None,
        teacher_input=args.teacher_input,
        pooling=args.pooling,
        pooling_pos_embed=args.pooling_pos_embed,
    )
    what = f"samples of {summary['views']} cameras" if summary["rows"] == "samples" else "frames"
    print(
        f"cache {summary['out']}: {summary['stored']} {what} ({summary['computed']} computed now, "
        f"{summary['resumed_with']} already there); teacher {summary['teacher_frames_per_s']} frames/s, "
        f"overall {summary['frames_per_s']} frames/s"
    )
    return 0


def _cmd_verify(args) -> int:

    cache = TeacherCache(args.out, verify=True)
    manifest = read_manifest(args.out)
    spec = cache.spec
    rows = f"samples of {spec.views} cameras seen together" if spec.multi_view else "frames"
    print(
        f"{args.out}: OK, {len(cache)} {rows} in {len(manifest['shards'])} shards; teacher {spec.teacher} "
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
    b.add_argument(
        "--num-images",
        type=positive_int,
        default=1,
        help="camera images per sample, as OpenVLA-OFT's --num_images_in_input: 1 = the primary camera; N > 1 = the "
        "primary and wrist cameras (RLDS, OFT's pipeline) or N camera subfolders of --images. A multi-view teacher "
        "(vggt-1b) sees a sample's N images together and the cache serves runs with N images per sample",
    )
    b.add_argument(
        "--cameras",
        type=lambda text: [c for c in text.split(",") if c],
        default=None,
        help="with --images and --num-images N > 1: the camera subfolders, comma-separated, in the VLA's order "
        "(default: the subfolders sorted by name)",
    )
    b.add_argument(
        "--teacher-input",
        default="reference",
        help="as --align.teacher_input: how pixel_values become the teacher's images (reference, spatial-forcing)",
    )
    b.add_argument(
        "--pooling", default="resample", help="as --align.pooling: resample or bilinear-corners (Spatial Forcing)"
    )
    b.add_argument(
        "--pooling-pos-embed",
        type=float,
        default=0.0,
        help="as --align.pooling_pos_embed: scale of the (u, v) embedding added before pooling (Spatial Forcing: 0.1)",
    )
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
