"""`openvla-align data build EPISODES_DIR OUT_DIR`: motion-planner episodes -> the paper's RLDS dataset.

Episodes (``*.npz``) are taken in name order; the last ``--held-back`` (140) are held back and the first ``--train``
(1,400) of the rest become the ``train`` split, as the paper's builder does. Per episode: drop steps whose translation
norm <= 0.01 and rotation norm <= 0.06 unless the gripper toggles, stop after 6 consecutive successful steps.
Schema: ``steps/observation/image`` (JPEG, the frames' own size: 480x640 for the paper's camera),
``steps/language_instruction``, ``steps/action`` float32[7], ``episode_metadata/file_path``.

Bad input: every file is integrity-checked (zip CRCs) before anything is written; a bad or truncated file fails the
build, naming every such file, unless ``--skip-bad`` (then each is reported and left out). tensorflow-datasets writes
into a temporary directory and renames it when the split is complete, so an interrupted build leaves nothing
half-written.
"""

from __future__ import annotations

import argparse
import concurrent.futures
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..argtypes import existing_dir, nonnegative_int, output_dir, positive_int
from .episodes import Episode, EpisodeError, check_file, episode_steps, load_episode

VERSION = "1.0.0"


def select_files(episodes_dir, train: int = 1400, held_back: int = 140) -> Tuple[List[Path], List[Path]]:
    files = sorted(Path(episodes_dir).glob("*.npz"))
    if len(files) < train + held_back:
        raise ValueError(
            f"{episodes_dir} has {len(files)} episode files; {train} training + {held_back} held back need "
            f"{train + held_back}. Pass --train/--held-back to match what you collected."
        )
    kept, spare = (files[:-held_back], files[-held_back:]) if held_back else (files, [])
    return kept[:train], spare


def check_files(files: Sequence[Path], workers: int = 4) -> Dict[Path, str]:
    """Problems found in ``files`` (integrity only): bad file -> message."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return {path: error for path, error in zip(files, pool.map(_check, files)) if error}


def _check(path: Path) -> Optional[str]:
    try:
        check_file(path)
    except EpisodeError as exc:
        return str(exc)
    return None


def _example(path: Path) -> Tuple[str, dict, int]:
    episode: Episode = load_episode(path)
    steps = episode_steps(episode)
    example = {
        "steps": [
            {
                "observation": {"image": episode.images[i]},
                "language_instruction": episode.instruction,
                "action": episode.actions[i].astype(np.float32),
            }
            for i in steps
        ],
        "episode_metadata": {"file_path": str(path)},
    }
    return str(path.name), example, len(episode.actions) - len(steps)


TFDS_HINT = (
    "needs tensorflow-datasets, as OpenVLA's environment has it: pip install tensorflow==2.15.0 "
    "tensorflow_datasets==4.9.3"
)


def require_tfds(what: str) -> None:
    """Fail before anything is written when tensorflow-datasets cannot be imported."""
    import importlib.util

    if importlib.util.find_spec("tensorflow_datasets") is None:
        raise ImportError(f"{what} {TFDS_HINT}.")


def features(image_shape: Tuple[int, int, int]):
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict(
        {
            "steps": tfds.features.Dataset(
                {
                    "observation": tfds.features.FeaturesDict(
                        {"image": tfds.features.Image(shape=image_shape, dtype=np.uint8, encoding_format="jpeg")}
                    ),
                    "language_instruction": tfds.features.Text(),
                    "action": tfds.features.Tensor(shape=(7,), dtype=np.float32),
                }
            ),
            "episode_metadata": tfds.features.FeaturesDict({"file_path": tfds.features.Text()}),
        }
    )


def build_rlds(
    episodes_dir,
    out_dir,
    name: str = "sft",
    *,
    train: int = 1400,
    held_back: int = 140,
    skip_bad: bool = False,
    workers: int = 4,
    progress: bool = True,
) -> Dict[str, object]:
    """Write ``out_dir/name/1.0.0`` (a tensorflow-datasets RLDS build); returns what was written and skipped."""
    require_tfds("Writing RLDS")
    import tensorflow_datasets as tfds

    files, spare = select_files(episodes_dir, train, held_back)
    problems = check_files(files, workers)
    if problems and not skip_bad:
        raise EpisodeError(
            f"{len(problems)} bad episode file(s), nothing written:\n  "
            + "\n  ".join(problems.values())
            + "\nRemove or re-collect them, or pass --skip-bad to build without them."
        )
    files = [f for f in files if f not in problems]
    if not files:
        raise EpisodeError(f"every episode file in {episodes_dir} is bad; nothing written.")
    shape = load_episode(files[0]).images.shape[1:]
    stats = {"episodes": 0, "steps": 0, "filtered_steps": 0}

    def generate() -> Iterator[Tuple[str, dict]]:
        from tqdm import tqdm

        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            # bounded look-ahead: at most 2 x workers decoded episodes in memory
            pending: List[concurrent.futures.Future] = []
            it = iter(files)
            bar = tqdm(total=len(files), desc=f"episodes -> {name}", unit="ep", disable=not progress)
            for path in it:
                pending.append(pool.submit(_example, path))
                if len(pending) >= 2 * workers:
                    yield _emit(pending.pop(0), stats, shape, bar)
            while pending:
                yield _emit(pending.pop(0), stats, shape, bar)
            bar.close()

    with tfds.core.registered.skip_registration():
        builder_cls = type(
            f"OpenVLAAlign_{name}",
            (tfds.core.GeneratorBasedBuilder,),
            {
                "name": name,
                "VERSION": tfds.core.Version(VERSION),
                "RELEASE_NOTES": {VERSION: "built by openvla-align data build"},
                "_info": lambda self: tfds.core.DatasetInfo(builder=self, features=features(tuple(shape))),
                "_split_generators": lambda self, dl_manager: {"train": generate()},
                "_generate_examples": lambda self: generate(),
            },
        )
    builder = builder_cls(data_dir=str(out_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return {
        "out": str(Path(out_dir) / name / VERSION),
        **stats,
        "held_back": [f.name for f in spare],
        "skipped": sorted(problems.values()),
    }


def _emit(future, stats, shape, bar):
    key, example, filtered = future.result()
    got = example["steps"][0]["observation"]["image"].shape if example["steps"] else shape
    if tuple(got) != tuple(shape):
        raise EpisodeError(f"{key}: frames are {got}, the dataset's are {shape}; one camera size per dataset")
    stats["episodes"] += 1
    stats["steps"] += len(example["steps"])
    stats["filtered_steps"] += filtered
    bar.update(1)
    return key, example


# --------------------------------------------------------------------------------------------------- CLI
def _cmd_build(args) -> int:
    summary = build_rlds(
        args.episodes_dir,
        args.out_dir,
        args.name,
        train=args.train,
        held_back=args.held_back,
        skip_bad=args.skip_bad,
        workers=args.workers,
    )
    print(
        f"wrote {summary['out']}: {summary['episodes']} episodes, {summary['steps']} steps "
        f"({summary['filtered_steps']} near-zero steps dropped); held back {len(summary['held_back'])} episodes"
    )
    for problem in summary["skipped"]:
        print(f"skipped: {problem}")
    return 0


def _cmd_synth(args) -> int:
    from .synth import write_synthetic_episodes

    if not args.no_rlds:
        require_tfds("The RLDS build of `data synth` (--no-rlds writes only the .npz episodes)")
        if not 0 <= args.held_back < args.episodes:
            raise ValueError(f"--held-back {args.held_back} must leave at least one of --episodes {args.episodes}.")
    episodes = write_synthetic_episodes(
        Path(args.out) / "episodes", args.episodes, args.steps, seed=args.seed, size=(args.height, args.width)
    )
    print(f"wrote {len(episodes)} episodes to {Path(args.out) / 'episodes'}")
    if not args.no_rlds:
        train = args.episodes - args.held_back
        summary = build_rlds(
            Path(args.out) / "episodes",
            Path(args.out) / "rlds",
            args.name,
            train=train,
            held_back=args.held_back,
            progress=False,
        )
        print(f"wrote {summary['out']}: {summary['episodes']} episodes, {summary['steps']} steps")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("data")
    sub = p.add_subparsers(dest="data_command", required=True)
    b = sub.add_parser("build", help="Collector .npz episodes -> RLDS (tensorflow-datasets), with the paper's rules.")
    b.add_argument(
        "episodes_dir", type=existing_dir, help="directory of the collector's .npz episodes (read in name order)"
    )
    b.add_argument("out_dir", type=output_dir, help="RLDS root (finetune.py's --data_root_dir)")
    b.add_argument("--name", default="sft", help="dataset name (sft, or warmup for the warm-up episodes)")
    b.add_argument("--train", type=positive_int, default=1400, help="training episodes (first, in name order)")
    b.add_argument("--held-back", type=nonnegative_int, default=140, help="episodes held back (last, in name order)")
    b.add_argument("--skip-bad", action="store_true", help="leave out bad files (reported) instead of failing")
    b.add_argument("--workers", type=positive_int, default=4, help="episodes read in parallel")
    b.set_defaults(func=_cmd_build)
    s = sub.add_parser("synth", help="A small synthetic dataset in the same schema (+ its .npz episodes).")
    s.add_argument("out", type=output_dir, help="output directory: episodes/ (.npz) and the RLDS build under it")
    s.add_argument("--episodes", type=positive_int, default=8, help="episodes to generate")
    s.add_argument("--held-back", type=nonnegative_int, default=2, help="last episodes left out of the RLDS build")
    s.add_argument("--steps", type=positive_int, default=12, help="steps per episode")
    s.add_argument("--height", type=positive_int, default=480, help="frame height in pixels (the collector's)")
    s.add_argument("--width", type=positive_int, default=640, help="frame width in pixels (the collector's)")
    s.add_argument("--name", default="sft", help="RLDS dataset name")
    s.add_argument("--seed", type=int, default=0, help="seed of the generated episodes")
    s.add_argument("--no-rlds", action="store_true", help="only the .npz episodes (no tensorflow-datasets needed)")
    s.set_defaults(func=_cmd_synth)
    return p
