"""`openvla-align probe linear`: how linearly decodable is the object class from frozen visual features?

The representation-learning protocol the paper follows for its Table 3: features are extracted once from a frozen
model, one linear classifier is trained on the train split, and top-1 accuracy is reported on the val split
(ImageNet-100: C-RADIOv3 teacher 87.31%, OpenVLA 79.88%, OpenVLA SFT 77.48%, OpenVLA Align 82.13%).

Features
  * VLA (``--model DIR`` or ``DIR::LORA_ADAPTER_DIR``): the hidden states of the 256 visual tokens at LLM layer
    ``--layer`` (default 16, the paper's; layer L = ``output_hidden_states[L]``), averaged over the tokens. The
    image goes through the checkpoint's own processor, with the fixed prompt ``DEFAULT_PROMPT``. The prompt cannot
    change these features: the visual tokens come right after BOS and attention is causal, so they never see the
    text; it is there only to make a well-formed batch. The forward pass stops after layer L.
  * Teacher (``--model teacher:NAME[::WEIGHTS]`` or ``--teacher NAME [--teacher-path WEIGHTS]``): the teacher's
    final patch features (on the 16x16 student grid), averaged over patches. The image is resized straight to the
    teacher's input size.

Data
  Any ImageFolder layout: ``DATA/train/<class>/*.jpg`` and ``DATA/val/<class>/*.jpg`` (also png, bmp, webp, ...,
  found recursively, symlinks followed). The classes are the sorted train class folders; every val class must be
  one of them. The paper's dataset is ImageNet-100: the 100-class ImageNet-1k subset of the CMC paper (Tian,
  Krishnan, Isola 2019; the class list is ``imagenet100.txt`` in github.com/HobbitLong/CMC). Build it yourself from
  ImageNet-1k by copying or symlinking those 100 synset folders of ``train/`` and ``val/`` (sort ImageNet's flat
  val images into synset folders first, e.g. with the usual ``valprep.sh``). ImageNet may not be redistributed,
  so nothing here downloads it.

Cache
  Features are stored per (model, layer or teacher, dtype, split) under ``--cache-dir`` (default: ``feature_cache``
  next to ``--out``) as ``<name>.npy`` plus a ``<name>.json`` key: model path, adapter, layer or teacher,
  dtype, the model's files and every image file with its size and mtime, and the features' sha256. Any change to
  the dataset or the model files re-extracts that split; a features file whose checksum or shape does not match is
  reported and re-extracted, never used. Changing only classifier settings reuses the features, so such a re-run
  costs only the classifier's training.

Classifier
  One ``nn.Linear`` on features standardised with the train split's mean and std, cross-entropy, AdamW with a
  cosine schedule, a fixed seed, no augmentation; the reported top-1 is that of the final epoch. The defaults suit
  ImageNet-100-sized data; with a few hundred images use e.g. ``--batch-size 0 --epochs 300 --lr 0.05`` (the run
  warns when the defaults get too few optimiser steps).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .. import dtypes
from .._io import atomic_write, save_figure
from ..argtypes import existing_dir, nonnegative_int, positive_float, positive_int
from ..vla.args import ModelArgs
from ..vla.checkpoint import CameraView, resolve_device_dtype
from . import feature_cache
from .features import DEFAULT_PROMPT, ModelSpec, as_model_spec, extract_features, make_encoder
from .imagefolder import IMAGE_EXTENSIONS, ImageFolderData, ImageFolderSplit, scan_imagefolder

__all__ = [
    "DEFAULT_PROMPT",
    "IMAGE_EXTENSIONS",
    "ImageFolderData",
    "ImageFolderSplit",
    "ModelSpec",
    "add_parser",
    "comparison_table",
    "extract_features",
    "linear_probe",
    "run_linear_probe",
    "scan_imagefolder",
    "summary_lines",
]

logger = logging.getLogger(__name__)

# Tuned for ImageNet-100-sized data (~500 steps an epoch); on a synthetic 100-class problem a 10x larger lr lost
# about a point of val top-1 to overfitting.
DEFAULTS = dict(epochs=100, lr=1e-3, weight_decay=0.0, batch_size=256, seed=0)
MIN_STEPS = 1000  # below this, the default lr has not converged even on separable data
MODELS = ModelArgs(
    many=True,
    help="checkpoint DIR, DIR::LORA_ADAPTER_DIR or teacher:NAME[::WEIGHTS]; repeat to compare models",
    metavar="SPEC",
    others=("teacher:",),  # --adapter belongs to the single VLA among them
)


# --- classifier ----------------------------------------------------------------------------------------------


def _check_settings(epochs: int, lr: float, weight_decay: float, batch_size: int) -> None:
    for flag, value, ok in (
        ("--epochs", epochs, epochs >= 1),
        ("--lr", lr, lr > 0),
        ("--weight-decay", weight_decay, weight_decay >= 0),
        ("--batch-size", batch_size, batch_size >= 0),
    ):
        if not ok:
            raise ValueError(
                f"{flag} {value} is invalid: epochs >= 1, lr > 0, weight decay >= 0, batch size >= 0 (0 = full batch)."
            )


def _fit(train_x, train_y, test_x, test_y, num_classes, epochs, lr, weight_decay, batch_size, seed, device, verbose):
    """(train top-1, test top-1) of a linear classifier on standardised features."""
    _check_settings(epochs, lr, weight_decay, batch_size)
    device = torch.device(device or "cpu")
    train_x = torch.as_tensor(np.asarray(train_x), dtype=torch.float32, device=device)
    test_x = torch.as_tensor(np.asarray(test_x), dtype=torch.float32, device=device)
    train_y = torch.as_tensor(np.asarray(train_y), dtype=torch.long, device=device)
    test_y = torch.as_tensor(np.asarray(test_y), dtype=torch.long, device=device)
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError("The linear probe needs at least one train and one test example.")
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    # Standardising with train statistics stands in for MAE's affine-free BatchNorm before the head: LLM hidden
    # states have a few huge-magnitude channels that would otherwise dominate the optimisation.
    mean, std = train_x.mean(0), train_x.std(0).nan_to_num(1.0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std

    probe = nn.Linear(train_x.shape[1], num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nn.init.normal_(probe.weight, std=0.01)  # small init as in MAE/MoCo v3: the answer comes from training
    nn.init.zeros_(probe.bias)
    probe.to(device)
    n = len(train_x)
    step = n if batch_size == 0 else min(batch_size, n)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(n / step)
    if verbose and steps < MIN_STEPS:
        logger.warning(
            "The probe gets only %d optimiser steps (%d epochs x %d batches): too few for the default lr, so it may "
            "underfit (compare train top-1). Small datasets want e.g. --batch-size 0 --epochs 300 --lr 0.05.",
            steps,
            epochs,
            math.ceil(n / step),
        )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    shuffle = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="linear probe", unit="epoch", disable=not verbose, leave=False):
        order = torch.randperm(n, generator=shuffle).to(device) if step < n else None
        for start in range(0, n, step):
            idx = order[start : start + step] if order is not None else slice(None)
            loss = F.cross_entropy(probe(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        train_top1 = (probe(train_x).argmax(1) == train_y).float().mean().item()
        test_top1 = (probe(test_x).argmax(1) == test_y).float().mean().item()
    return train_top1, test_top1


def linear_probe(
    train_x,
    train_y,
    test_x,
    test_y,
    epochs: int = DEFAULTS["epochs"],
    seed: int = DEFAULTS["seed"],
    *,
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    batch_size: int = DEFAULTS["batch_size"],
    num_classes: Optional[int] = None,
    device: Optional[str] = None,
) -> float:
    """Top-1 on (``test_x``, ``test_y``) of a linear classifier trained on standardised frozen features.

    ``batch_size=0`` trains full batch. Arrays or tensors; labels are class indices.
    """
    return _fit(
        train_x, train_y, test_x, test_y, num_classes, epochs, lr, weight_decay, batch_size, seed, device, False
    )[1]


# --- run -----------------------------------------------------------------------------------------------------


PROTOCOL = (
    "Frozen features (mean-pooled), one linear classifier trained on the train split (standardised features, "
    "cross-entropy, AdamW, cosine schedule, fixed seed), top-1 of the final epoch on the val split."
)


def _split_features(spec, split, data_key, cache: Path, model_key, encode, **extract) -> Tuple[np.ndarray, str]:
    """Features of one split from the cache, or extracted (and cached); plus what happened."""
    stem = cache / feature_cache.cache_stem(spec, model_key, split)
    key = feature_cache.full_key(model_key, spec, data_key)
    feats, status = feature_cache.load_cached(stem, key, split)
    if feats is not None:
        return feats, status
    feats = extract_features(spec, split.paths, encoder=encode, desc=f"{spec.label} [{split.name}]", **extract)
    feature_cache.store(stem, key, feats)
    return feats, "extracted" if status == "miss" else f"re-extracted ({status})"


def run_linear_probe(
    data: Union[str, Path],
    models: Sequence[Union[str, ModelSpec]],
    *,
    out: Optional[Union[str, Path]] = None,
    cache_dir: Optional[Union[str, Path]] = None,
    layer: int = 16,
    prompt: str = DEFAULT_PROMPT,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    extract_batch_size: int = 16,
    workers: int = 4,
    teacher_kwargs: Optional[Mapping[str, Any]] = None,
    epochs: int = DEFAULTS["epochs"],
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    batch_size: int = DEFAULTS["batch_size"],
    seed: int = DEFAULTS["seed"],
    view: Optional[CameraView] = None,
) -> Dict[str, Any]:
    """Linear-probe each of ``models`` on the ImageFolder ``data``; returns (and writes to ``out``) the report.

    ``models``: ``ModelSpec`` objects or strings ``DIR``, ``DIR::ADAPTER``, ``teacher:NAME[::WEIGHTS]``.
    ``teacher_kwargs`` go to every teacher's factory (e.g. ``allow_random=True`` for smoke tests).
    ``device`` defaults to CUDA when available; ``dtype`` to bfloat16 on CUDA, else float32.
    ``view``: for a multi-camera model (OpenVLA-OFT), its camera count and whether all cameras' visual tokens or
    the primary camera's are pooled (each image is shown to every camera).
    Features are cached in ``cache_dir`` (default: ``feature_cache`` next to ``out``, or in the working directory).
    The report is ``{"dataset", "protocol", "results": {model label: {"top1", "n_train", "n_val", ...}}}``.
    """
    specs = [as_model_spec(m) for m in models]
    if not specs:
        raise ValueError("Nothing to probe: give at least one --model (DIR, DIR::ADAPTER, teacher:NAME) or --teacher.")
    names = [s.label for s in specs]
    twice = sorted({x for x in names if names.count(x) > 1})
    if twice:
        raise ValueError(f"--model {twice} is given more than once.")
    if layer < 1:
        raise ValueError(f"--layer {layer} is out of range: layers start at 1 (layer L = output_hidden_states[L]).")
    _check_settings(epochs, lr, weight_decay, batch_size)  # before any time goes into features
    if extract_batch_size < 1 or workers < 0:
        raise ValueError(
            f"--extract-batch-size {extract_batch_size} / --workers {workers}: need a batch size >= 1 and workers >= 0."
        )
    for spec in specs:
        feature_cache.check_model(spec)
    dataset = scan_imagefolder(data)
    device, dtype = resolve_device_dtype(device, dtype)
    dtype = dtypes.canonical(dtype)
    if cache_dir is None:
        cache_dir = (Path(out).parent if out else Path(".")) / "feature_cache"
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    logger.info(
        "Linear probe on %s: %d classes, %d train / %d val images; features cached in %s.",
        dataset.root,
        len(dataset.classes),
        len(dataset.train.paths),
        len(dataset.val.paths),
        cache,
    )
    settings = dict(epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size, seed=seed)
    extract = dict(
        layer=layer,
        prompt=prompt,
        device=device,
        dtype=dtype,
        batch_size=extract_batch_size,
        workers=workers,
        teacher_kwargs=teacher_kwargs,
        view=view,
    )
    data_keys = {split.name: feature_cache.data_key(split, dataset.classes) for split in (dataset.train, dataset.val)}
    results: Dict[str, Any] = {}
    # teachers first: their weights are what a user gets wrong most often, and a teacher fails in seconds where a
    # VLA's features take long to extract (the report keeps the order the models were given)
    for spec in sorted(specs, key=lambda spec: not spec.is_teacher):
        t0 = time.time()
        model_key = feature_cache.model_key(spec, layer, prompt, dtype, teacher_kwargs, view)
        encode = make_encoder(spec, layer, prompt, device, dtype, teacher_kwargs, view)
        feats, status = {}, {}
        try:
            for split in (dataset.train, dataset.val):
                feats[split.name], status[split.name] = _split_features(
                    spec, split, data_keys[split.name], cache, model_key, encode, **extract
                )
        finally:
            encode.close()
        train_top1, top1 = _fit(
            feats["train"],
            dataset.train.labels,
            feats["val"],
            dataset.val.labels,
            len(dataset.classes),
            device=device,
            verbose=True,
            **settings,
        )
        if spec.is_teacher:
            what = {"kind": "teacher", "teacher": spec.teacher, "teacher_path": spec.teacher_path}
        else:
            what = {"kind": "vla", "model": spec.path, "adapter": spec.adapter, "layer": layer, "prompt": prompt}
            if view is not None and not view.is_default:
                what["cameras"] = {"num_images": view.num_images, "images": view.images}
        results[spec.label] = {
            **what,
            "feature": model_key["feature"],
            "feature_dim": int(feats["train"].shape[1]),
            "top1": top1,
            "train_top1": train_top1,
            "n_train": len(dataset.train.paths),
            "n_val": len(dataset.val.paths),
            "classes": list(dataset.classes),
            "settings": {**settings, "dtype": dtype, "device": str(device)},
            "cache": status,
            "seconds": round(time.time() - t0, 1),
        }
        logger.info("%s", _summary(spec.label, results[spec.label]))

    results = {spec.label: results[spec.label] for spec in specs}
    report = {"dataset": str(dataset.root), "protocol": PROTOCOL, "results": results}
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
    return report


# --- reporting and CLI ---------------------------------------------------------------------------------------


def _summary(label: str, r: Mapping[str, Any]) -> str:
    where = f"layer {r['layer']}" if r["kind"] == "vla" else "final patches"
    return (
        f"{label}: top-1 {100 * r['top1']:.2f}% (train {100 * r['train_top1']:.2f}%) on {r['n_val']} val images, "
        f"{len(r['classes'])} classes, {r['n_train']} train; {r['feature_dim']}-d features ({where})"
    )


def summary_lines(report: Mapping[str, Any]) -> List[str]:
    """One line per model."""
    return [_summary(label, r) for label, r in report["results"].items()]


def comparison_table(report: Mapping[str, Any]) -> str:
    """Markdown table of all models in ``report``."""
    lines = [
        "| model | features | dim | top-1 (%) | train top-1 (%) |",
        "|---|---|---:|---:|---:|",
    ]
    for label, r in report["results"].items():
        where = f"layer {r['layer']}" if r["kind"] == "vla" else "teacher"
        name = label.replace("|", "\\|")  # a path may contain the cell separator
        lines.append(f"| {name} | {where} | {r['feature_dim']} | {100 * r['top1']:.2f} | {100 * r['train_top1']:.2f} |")
    first = next(iter(report["results"].values()))
    lines.append(f"\n{first['n_train']} train / {first['n_val']} val images, {len(first['classes'])} classes.")
    return "\n".join(lines)


def save_bar_chart(report: Mapping[str, Any], path: Union[str, Path]) -> Path:
    """Bar chart of val (and train) top-1 per model, the picture of a comparison."""
    from matplotlib.figure import Figure

    labels = list(report["results"])
    val = [100 * report["results"][k]["top1"] for k in labels]
    train = [100 * report["results"][k]["train_top1"] for k in labels]
    fig = Figure(figsize=(max(4.0, 1.6 * len(labels) + 1.5), 3.6))
    ax = fig.subplots()
    xs = np.arange(len(labels))
    ax.bar(xs - 0.2, val, width=0.4, label="val top-1")
    ax.bar(xs + 0.2, train, width=0.4, alpha=0.5, label="train top-1")
    for x, v in zip(xs, val):
        ax.text(x - 0.2, v + 1, f"{v:.1f}", ha="center", fontsize=8)
    short = [Path(k.split("::")[-1]).parent.name if "::" in k else Path(k).name or k for k in labels]
    ax.set_xticks(xs, short, fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"linear probe on {Path(str(report['dataset'])).name}", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path, 110)


def _cmd_linear(args: argparse.Namespace) -> int:
    models: List[ModelSpec] = [ModelSpec.parse(m) for m in MODELS.models(args)]
    if args.teacher:
        models.append(ModelSpec(teacher=args.teacher, teacher_path=args.teacher_path))
    elif args.teacher_path:
        bare = [m for m in models if m.is_teacher and not m.teacher_path]
        if len(bare) != 1:
            raise ValueError(
                "--teacher-path needs one teacher to belong to: --teacher NAME, or a single --model teacher:NAME "
                "(or write --model teacher:NAME::WEIGHTS)."
            )
        models[models.index(bare[0])] = ModelSpec(teacher=bare[0].teacher, teacher_path=args.teacher_path)
    if not models:
        raise ValueError("Nothing to probe: give --model DIR (or DIR::ADAPTER, teacher:NAME) or --teacher NAME.")
    report = run_linear_probe(
        args.data,
        models,
        out=args.out,
        cache_dir=args.cache_dir,
        layer=args.layer,
        extract_batch_size=args.extract_batch_size,
        workers=args.workers,
        teacher_kwargs={"allow_random": True} if args.allow_random_teacher else None,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        seed=args.seed,
        **MODELS.options(args),
    )
    for line in summary_lines(report):
        print(line)
    if len(report["results"]) > 1:
        print()
        print(comparison_table(report))
    print(f"wrote {args.out}")
    if args.plot:
        print(f"wrote {save_bar_chart(report, args.plot)}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``linear`` subcommand (``openvla-align probe linear``) to an argparse subparsers object."""
    p = subparsers.add_parser("linear", description=__doc__)
    p.add_argument(
        "--data",
        type=existing_dir,
        required=True,
        metavar="DIR",
        help="ImageFolder root with train/<class>/ and val/<class>/",
    )
    p.add_argument("--plot", metavar="PNG", default=None, help="also draw a bar chart of top-1 per model")
    MODELS.add(p)
    p.add_argument("--teacher", metavar="NAME", help="also probe this teacher (`openvla-align teachers` lists them)")
    p.add_argument(
        "--teacher-path",
        metavar="P",
        help="weights for --teacher, or for the single --model teacher:NAME (default: its usual location)",
    )
    p.add_argument(
        "--allow-random-teacher",
        action="store_true",
        help="build teachers with random weights: smoke tests only, the numbers mean nothing",
    )
    p.add_argument("--layer", type=positive_int, default=16, help="LLM layer of the VLA's visual tokens (default: 16)")
    p.add_argument("--extract-batch-size", type=positive_int, default=16, help="images per forward pass (default: 16)")
    p.add_argument("--workers", type=nonnegative_int, default=4, help="image-decoding threads (default: 4)")
    p.add_argument(
        "--epochs", type=positive_int, default=DEFAULTS["epochs"], help="classifier epochs (default: %(default)s)"
    )
    p.add_argument(
        "--lr", type=positive_float, default=DEFAULTS["lr"], help="classifier AdamW lr (default: %(default)s)"
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=DEFAULTS["weight_decay"],
        help="classifier AdamW weight decay (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=nonnegative_int,
        default=DEFAULTS["batch_size"],
        help="classifier batch size, 0 = full batch (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="classifier init and shuffling seed")
    p.add_argument("--out", default="linear_probe/results.json", help="results JSON (default: %(default)s)")
    p.add_argument("--cache-dir", default=None, help="feature cache (default: feature_cache/ next to --out)")
    p.set_defaults(func=_cmd_linear)
    return p
