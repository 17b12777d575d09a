"""Do object classes stay apart inside the VLA? t-SNE of per-image embeddings at chosen layers, plus numbers.

The paper shows t-SNE plots of token embeddings for object classes (cup, bottle, knife, ...): clusters that are
distinct in the VLM blur after plain action fine-tuning ("representation collapse") and stay apart with alignment.
For every image DATA/<class>/*.{png,jpg,jpeg} the model reads "In: Do you see <class>?\\nOut:" and we take, at each
chosen layer L (``output_hidden_states[L]``):

* ``object-token`` - the hidden state of the class word's token(s), averaged over its tokens (the paper's view);
* ``visual-mean``  - the mean over the 256 visual tokens (depends on the image alone, not on the class word).

t-SNE pictures are qualitative and depend on perplexity and seed, so each layer also gets numbers computed in the
ORIGINAL feature space: leave-one-out k-NN accuracy (k = 5, fewer when there are few images) and the silhouette
score. Note that with ``object-token`` the prompt itself names the class, so the word alone separates the classes
in early layers; compare checkpoints (VLM vs SFT vs Align) at the same layer rather than reading absolute values.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .._io import atomic_write_bytes, save_figure
from ..argtypes import existing_dir, positive_float, positive_int
from ..vla.args import ModelArgs
from ..vla.checkpoint import LoadedVLA, load_image, token_spans, vqa_prompt
from ..vla.layout import check_layers
from .attention import layers_arg, parse_layers

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
FEATURES = ("object-token", "visual-mean")
METRICS = ("euclidean", "cosine")
DEFAULT_TEMPLATE = "Do you see {}?"
MODEL = ModelArgs()


# --- data ------------------------------------------------------------------------------------------------------


def parse_classes(spec: Union[str, Sequence[str]]) -> List[str]:
    names = [c.strip() for c in spec.split(",")] if isinstance(spec, str) else [str(c).strip() for c in spec]
    names = [c for c in names if c]
    if not names:
        raise ValueError("No classes given; pass e.g. --classes cup,bottle,knife (subdirectories of --data).")
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise ValueError(f"Class(es) {dupes} listed more than once in --classes.")
    return names


def find_images(data_dir: Union[str, Path], classes: Sequence[str]) -> Dict[str, List[Path]]:
    """DATA/<class>/*.png|jpg|jpeg for each class (sorted, so runs are reproducible); errors name what exists."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root} is not a directory (expected DATA/<class>/*.png|jpg).")
    available = sorted(p.name for p in root.iterdir() if p.is_dir())
    unknown = [c for c in classes if not (root / c).is_dir()]
    if unknown:
        raise ValueError(
            f"Class(es) {unknown} have no subdirectory in {root}. Available classes: "
            f"{', '.join(available) if available else '(none: the directory has no subdirectories)'}."
        )
    out = {}
    for c in classes:
        files = sorted(p for p in (root / c).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise ValueError(f"Class {c!r}: {root / c} has no images (looked for {', '.join(IMAGE_EXTS)}).")
        out[c] = files
    return out


def class_prompt(cls: str, template: str = DEFAULT_TEMPLATE) -> Tuple[str, str]:
    """(prompt, object word): underscores in directory names read as spaces ('coke_can' -> 'coke can')."""
    if template.count("{}") != 1:
        raise ValueError(f"Prompt template {template!r} must contain exactly one '{{}}' where the class name goes.")
    word = cls.replace("_", " ")
    return vqa_prompt(template.format(word)), word


def object_positions(tokenizer, prompt: str, word: str, cls: str) -> List[int]:
    """Positions of ``word`` in the tokenised prompt, or an error that shows the tokens the tokenizer did produce."""
    try:
        return token_spans(tokenizer, prompt, word)
    except (ValueError, NotImplementedError, KeyError) as exc:  # no match, or a tokenizer without offsets
        toks = tokenizer.convert_ids_to_tokens(tokenizer(prompt).input_ids)
        raise ValueError(
            f"Class {cls!r}: cannot locate the object word {word!r} in the prompt {prompt!r}; the tokenizer "
            f"produced {toks} ({exc}). Use --feature visual-mean, or a fast tokenizer that reports offsets."
        ) from None


# --- features --------------------------------------------------------------------------------------------------


@dataclass
class ClassFeatures:
    """Per-layer (M, d) float32 features of M images, their class labels and where they came from."""

    features: Dict[int, np.ndarray]
    labels: np.ndarray  # (M,) index into classes
    classes: List[str]
    paths: List[str]
    feature: str
    object_tokens: Dict[str, List[str]] = field(default_factory=dict)  # class -> tokens averaged (object-token)

    @property
    def layers(self) -> List[int]:
        return list(self.features)


@torch.no_grad()
def collect_features(
    vla: LoadedVLA,
    data_dir: Union[str, Path],
    classes: Union[str, Sequence[str]],
    layers: Union[str, int, Sequence[int]],
    feature: str = "object-token",
    template: str = DEFAULT_TEMPLATE,
    batch_size: int = 8,
    cameras: str = "all",
) -> ClassFeatures:
    """Per-layer features of every image of ``classes``; ``cameras`` picks the cameras whose visual tokens the
    visual-mean feature pools on a multi-camera model (OpenVLA-OFT: ``"all"`` or ``"primary"``)."""
    if feature not in FEATURES:
        raise ValueError(f"feature={feature!r}: choose one of {FEATURES}.")
    classes = parse_classes(classes)
    layers = parse_layers(layers)
    check_layers(vla.model, layers)
    images = find_images(data_dir, classes)
    prompts = {c: class_prompt(c, template) for c in classes}
    positions: Dict[str, List[int]] = {}
    object_tokens: Dict[str, List[str]] = {}
    if feature == "object-token":  # locate every word before the first forward, so a bad class fails fast
        for c, (prompt, word) in prompts.items():
            positions[c] = object_positions(vla.tokenizer, prompt, word, c)
            ids = vla.tokenizer(prompt).input_ids
            object_tokens[c] = vla.tokenizer.convert_ids_to_tokens([ids[p] for p in positions[c]])

    feats: Dict[int, List[np.ndarray]] = {layer: [] for layer in layers}
    labels: List[int] = []
    paths: List[str] = []
    for ci, c in enumerate(classes):
        prompt = prompts[c][0]
        # One class per batch: every row has the same prompt, so there is no padding to reason about.
        for start in range(0, len(images[c]), batch_size):
            chunk = images[c][start : start + batch_size]
            batch = vla.batch([prompt] * len(chunk), [load_image(p) for p in chunk])
            out = vla.model(**batch, output_hidden_states=True)
            hidden = out.hidden_states
            n_vis = hidden[0].shape[1] - batch["input_ids"].shape[1]  # what the projector inserted after BOS
            for layer in layers:
                h = hidden[layer].float()
                if feature == "visual-mean":
                    f = vla.select_images(h[:, 1 : 1 + n_vis], cameras).mean(1)
                else:  # prompt token i >= 1 sits at sequence position i + n_vis
                    f = h[:, [p + n_vis for p in positions[c]]].mean(1)
                feats[layer].append(f.cpu().numpy())
            del out, hidden
            labels += [ci] * len(chunk)
            paths += [str(p) for p in chunk]
    return ClassFeatures(
        features={layer: np.concatenate(v).astype(np.float32) for layer, v in feats.items()},
        labels=np.asarray(labels),
        classes=classes,
        paths=paths,
        feature=feature,
        object_tokens=object_tokens,
    )


# --- separability ----------------------------------------------------------------------------------------------


def pairwise_distances(x: np.ndarray, metric: str = "euclidean") -> np.ndarray:
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: choose one of {METRICS}.")
    x = np.asarray(x, dtype=np.float64)
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return np.clip(1.0 - x @ x.T, 0.0, 2.0)
    sq = (x * x).sum(1)
    return np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0))


def knn_loo_accuracy(x: np.ndarray, y: np.ndarray, k: int = 5, metric: str = "euclidean") -> Tuple[float, int]:
    """Leave-one-out k-NN accuracy and the k actually used (at most M - 1).

    Each point is classified by a majority vote of its k nearest other points; a tied vote goes to the tied class
    whose member is nearest, so the result does not depend on label order.
    """
    y = np.asarray(y)
    m = len(y)
    if m < 2:
        raise ValueError(f"k-NN needs at least 2 samples, got {m}.")
    k = max(1, min(k, m - 1))
    d = pairwise_distances(x, metric)
    np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    correct = 0
    for i in range(m):
        nbr = y[order[i]]
        classes, counts = np.unique(nbr, return_counts=True)
        tied = set(classes[counts == counts.max()].tolist())
        pred = next(label for label in nbr if label in tied)  # nbr is sorted nearest-first
        correct += int(pred == y[i])
    return correct / m, k


def silhouette(x: np.ndarray, y: np.ndarray, metric: str = "euclidean") -> Optional[float]:
    """Mean silhouette (as sklearn's ``silhouette_score``), or None when undefined (fewer than 2 classes, or as
    many classes as samples). Points alone in their class score 0, as in sklearn."""
    y = np.asarray(y)
    labels = np.unique(y)
    if not 2 <= len(labels) <= len(y) - 1:
        return None
    d = pairwise_distances(x, metric)
    s = np.zeros(len(y))
    for i in range(len(y)):
        same = y == y[i]
        n_same = same.sum() - 1
        if n_same == 0:
            continue
        a = d[i, same].sum() / n_same
        b = min(d[i, y == other].mean() for other in labels if other != y[i])
        s[i] = (b - a) / max(a, b) if max(a, b) > 0 else 0.0
    return float(s.mean())


def separability(x: np.ndarray, y: np.ndarray, k: int = 5, metric: str = "euclidean") -> Dict:
    acc, k_used = knn_loo_accuracy(x, y, k, metric)
    counts = np.bincount(np.asarray(y))
    return {
        "knn_accuracy": acc,
        "k": k_used,
        "chance": float(counts.max() / counts.sum()),  # always predicting the largest class
        "silhouette": silhouette(x, y, metric),
        "metric": metric,
    }


# --- t-SNE and plot --------------------------------------------------------------------------------------------


def tsne_2d(
    x: np.ndarray, seed: int = 0, perplexity: float = 30.0, metric: str = "euclidean"
) -> Tuple[np.ndarray, float]:
    """2-D t-SNE with a fixed seed; perplexity is clamped to (M - 1) / 3 (at least 1), since t-SNE needs it below
    the number of samples and small sets look like noise with larger values. Returns (points, perplexity used)."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise ImportError("t-SNE needs scikit-learn: pip install scikit-learn") from None
    x = np.asarray(x, dtype=np.float32)
    m = len(x)
    if m < 3:
        raise ValueError(f"t-SNE needs at least 3 images in total, got {m}.")
    perp = float(min(perplexity, max(1.0, (m - 1) / 3.0)))
    tsne = TSNE(n_components=2, perplexity=perp, random_state=seed, init="pca", learning_rate="auto", metric=metric)
    return tsne.fit_transform(x), perp


def save_tsne_grid(
    points: Dict[int, np.ndarray],
    labels: np.ndarray,
    classes: Sequence[str],
    scores: Dict[int, Dict],
    path: Union[str, Path],
    *,
    title: str = "",
    dpi: int = 110,
) -> Path:
    """One PNG, a subplot per layer, points coloured by class, titled with that layer's k-NN accuracy/silhouette."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("Drawing t-SNE plots needs matplotlib: pip install matplotlib") from None
    import textwrap

    from matplotlib import colormaps

    n = len(points)
    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    width = 3.4 * n + 0.4
    fig = Figure(figsize=(width, 3.9))
    axes = np.atleast_1d(fig.subplots(1, n, squeeze=False)[0])
    for ax, (layer, xy) in zip(axes, points.items()):
        for ci, name in enumerate(classes):
            sel = labels == ci
            ax.scatter(xy[sel, 0], xy[sel, 1], s=18, color=cmap(ci % cmap.N), label=name, edgecolors="none")
        sc = scores[layer]
        sil = "n/a" if sc["silhouette"] is None else f"{sc['silhouette']:+.2f}"
        ax.set_title(f"layer {layer}\n{sc['k']}-NN acc {sc['knn_accuracy']:.2f} | silhouette {sil}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    if title:
        fig.suptitle(textwrap.fill(title, width=int(width * 15)), fontsize=8)
    return save_figure(fig, path, dpi)


def format_table(scores: Dict[int, Dict]) -> str:
    first = next(iter(scores.values()))
    lines = [f"{'layer':>5}  {str(first['k']) + '-NN acc (LOO)':>16}  {'silhouette':>10}  {'chance':>6}"]
    for layer, s in scores.items():
        sil = "n/a" if s["silhouette"] is None else f"{s['silhouette']:+.3f}"
        lines.append(f"{layer:>5}  {s['knn_accuracy']:16.3f}  {sil:>10}  {s['chance']:6.3f}")
    return "\n".join(lines)


def run_tsne(
    vla: LoadedVLA,
    data_dir: Union[str, Path],
    classes: Union[str, Sequence[str]],
    layers: Union[str, int, Sequence[int]],
    out: Union[str, Path],
    *,
    feature: str = "object-token",
    template: str = DEFAULT_TEMPLATE,
    k: int = 5,
    metric: str = "euclidean",
    perplexity: float = 30.0,
    seed: int = 0,
    batch_size: int = 8,
    cameras: str = "all",
) -> Dict:
    """Features -> per-layer scores and t-SNE -> PNG at ``out`` and JSON next to it. Returns the JSON's content."""
    out = Path(out)
    feats = collect_features(vla, data_dir, classes, layers, feature, template, batch_size, cameras)
    scores = {layer: separability(x, feats.labels, k, metric) for layer, x in feats.features.items()}
    points, perp = {}, None
    for layer, x in feats.features.items():
        points[layer], perp = tsne_2d(x, seed, perplexity, metric)
    counts = {c: int((feats.labels == i).sum()) for i, c in enumerate(feats.classes)}
    title = (
        f"{vla.name}: t-SNE of {feature} features "
        f"({', '.join(f'{c} x{n}' for c, n in counts.items())}; perplexity {perp:.1f}, seed {seed})"
    )
    png = save_tsne_grid(points, feats.labels, feats.classes, scores, out, title=title)
    summary = {
        "model": vla.path,
        "adapter": vla.adapter,
        "feature": feature,
        "template": template,
        "classes": feats.classes,
        "counts": counts,
        "object_tokens": feats.object_tokens,
        "tsne": {"perplexity": perp, "seed": seed, "metric": metric},
        "cameras": {"num_images": vla.num_images, "images": cameras},
        "layers": {str(layer): s for layer, s in scores.items()},
        "images": feats.paths,
        "labels": feats.labels.tolist(),
        "points": {str(layer): np.round(p, 4).tolist() for layer, p in points.items()},
        "png": str(png),
    }
    atomic_write_bytes(out.with_suffix(".json"), json.dumps(summary, indent=2).encode())
    return summary


# --- CLI -------------------------------------------------------------------------------------------------------


def _cmd_tsne(args) -> int:
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out} should be a .png path (the JSON summary is written next to it).")
    classes = parse_classes(args.classes)
    find_images(args.data, classes)  # check the data before spending time loading the model
    class_prompt(classes[0], args.template)
    vla = MODEL.load(args)
    summary = run_tsne(
        vla,
        args.data,
        classes,
        args.layers,
        out,
        feature=args.feature,
        template=args.template,
        k=args.k,
        metric=args.metric,
        perplexity=args.perplexity,
        seed=args.seed,
        batch_size=args.batch_size,
        cameras=args.images,
    )
    if summary["object_tokens"]:
        print("object tokens: " + "; ".join(f"{c}: {t}" for c, t in summary["object_tokens"].items()))
    print(format_table({int(k): v for k, v in summary["layers"].items()}))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tsne", description=__doc__)
    MODEL.add(p)
    p.add_argument(
        "--data", type=existing_dir, required=True, help="directory with one subdirectory of images per class"
    )
    p.add_argument("--classes", required=True, help="comma-separated class subdirectories, e.g. cup,bottle,knife")
    p.add_argument(
        "--layers", type=layers_arg, required=True, help="decoder layers (1-based), e.g. '1,10,20' or '8-16'"
    )
    p.add_argument(
        "--feature",
        choices=FEATURES,
        default="object-token",
        help="object-token: the class word's hidden state (default); visual-mean: mean of the visual tokens",
    )
    p.add_argument(
        "--template",
        default=DEFAULT_TEMPLATE,
        help="question with {} for the class name, wrapped as 'In: ...\\nOut:' (default: %(default)r)",
    )
    p.add_argument("--k", type=positive_int, default=5, help="neighbours for the leave-one-out k-NN score (default 5)")
    p.add_argument("--metric", choices=METRICS, default="euclidean", help="distance for k-NN, silhouette and t-SNE")
    p.add_argument(
        "--perplexity", type=positive_float, default=30.0, help="t-SNE perplexity, clamped to (images - 1) / 3"
    )
    p.add_argument("--seed", type=int, default=0, help="t-SNE seed")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass")
    p.add_argument("--out", required=True, help="output PNG; a JSON summary goes next to it (same name, .json)")
    p.set_defaults(func=_cmd_tsne)
    return p
