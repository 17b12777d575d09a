"""The demo's picture: each arm's mean with its 95 % interval, the two differences with theirs, and where each model
looks (attention maps with titled columns, the object outlined and one colour bar)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from .report import ALIGNED, METRICS, RUNS, arm_names

logger = logging.getLogger(__name__)
COLOURS = {"base": "#999999", "sft": "#d95f02", "align": "#1b9e77", "strong": "#7570b3"}


def plot(
    path: Path,
    teacher_probe: Dict[str, float],
    base,
    summary,
    coeffs: Dict[str, float],
    attention: Optional[dict] = None,
):
    """``summary`` as ``report.summarize`` returns it; ``attention``: {"scenes", "splits", "instruction", "layer",
    "rows": {model label: (n, h, w) attention over the visual grid}}. Returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; skipping %s (pip install 'openvla-align[demo]').", path.name)
        return None
    rows = attention["rows"] if attention else {}
    top_height, row_height = 6.0, 2.1
    fig = plt.figure(figsize=(12, top_height + row_height * len(rows)), layout="constrained")
    if rows:
        top, bottom = fig.subfigures(2, 1, height_ratios=[top_height, row_height * len(rows)])
    else:
        top, bottom = fig, None
    means, differences = top.subplots(2, 1, height_ratios=[1.3, 1])
    names = arm_names(coeffs)
    _means(means, teacher_probe, base, summary, names)
    _differences(differences, summary, names)
    if bottom is not None:
        _attention(bottom, attention)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _labels():
    return [label.replace(", ", "\n", 1) for label, _ in METRICS]


def _means(ax, teacher_probe, base, summary, names) -> None:
    x = np.arange(len(METRICS))
    width = 0.2
    n = len(summary[METRICS[0][1]]["sft"]["values"])
    ax.bar(x - width, [base[k] for _, k in METRICS], width, color=COLOURS["base"], label="base VLA (VL-pretrained)")
    for i, run in enumerate(RUNS):
        iv = [summary[k][run]["mean"] for _, k in METRICS]
        means = np.array([d["mean"] for d in iv])
        err = np.array([[d["mean"] - d["low"] for d in iv], [d["high"] - d["mean"] for d in iv]])
        ax.bar(
            x + i * width, means, width, yerr=err, capsize=3, color=COLOURS[run], label=f"{names[run]} (mean, 95% CI)"
        )
        for j, (_, key) in enumerate(METRICS):  # each seed as a dot
            ax.plot([x[j] + i * width] * n, summary[key][run]["values"], ".", color="black", ms=3, alpha=0.6)
    for i, (_, key) in enumerate(METRICS):
        if key in teacher_probe:
            ax.plot(
                [i - 1.5 * width, i + 2.5 * width],
                [teacher_probe[key]] * 2,
                color="black",
                ls="--",
                lw=1,
                label="teacher probe" if i == 0 else None,
            )
    ax.axhline(1 / 12, color="black", ls=":", lw=1, label="chance (1/12)")
    ax.set_xticks(x, _labels(), fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share correct (cosine: mean cosine)")
    ax.legend(fontsize=7, ncol=3, loc="upper right")
    ax.set_title(f"openvla-align demo: tiny models, generated scenes ({n} seeds per arm; dots: seeds)", fontsize=10)


def _differences(ax, summary, names) -> None:
    x = np.arange(len(METRICS))
    series = [("sft_vs_base", COLOURS["sft"], "SFT - base VLA")] + [
        (kind, COLOURS[run], f"{names[run]} - SFT (paired)") for run, kind in ALIGNED.items()
    ]
    for i, (kind, colour, label) in enumerate(series):
        iv = [summary[k][kind] for _, k in METRICS]
        mid = np.array([d["mean"] for d in iv])
        err = np.array([[d["mean"] - d["low"] for d in iv], [d["high"] - d["mean"] for d in iv]])
        ax.errorbar(x + (i - 1) * 0.22, mid, yerr=err, fmt="o", color=colour, capsize=4, label=f"{label}, 95% CI")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, _labels(), fontsize=8)
    ax.set_ylabel("difference")
    ax.legend(fontsize=7, loc="best")
    ax.set_title(
        "differences: an interval that misses 0 is a finding; one that crosses 0 shows no difference", fontsize=9
    )


def _attention(fig, attention) -> None:
    rows, scenes = attention["rows"], attention["scenes"]
    axes = fig.subplots(len(rows), len(scenes), squeeze=False)
    vmax = max(float(np.max(m)) for m in rows.values())
    image = None
    for r, (label, maps) in enumerate(rows.items()):
        for c, scene in enumerate(scenes):
            a = axes[r, c]
            img = scene.image
            a.imshow(img)
            image = a.imshow(
                maps[c], cmap="inferno", alpha=0.6, vmin=0, vmax=vmax, extent=(0, img.shape[1], img.shape[0], 0)
            )
            a.contour((scene.cover == 1 + scene.label).astype(float), levels=[0.5], colors="cyan", linewidths=1.2)
            a.set_xticks([])
            a.set_yticks([])
            if r == 0:
                colour, shade = scene.target
                extra = " + plate" if len(scene.objects) > 1 else ""
                a.set_title(f"{attention['splits'][c]}: {shade} {colour}{extra}", fontsize=9)
            if c == 0:
                a.set_ylabel(label, fontsize=10)
    bar = fig.colorbar(image, ax=axes, shrink=0.9, pad=0.01)
    bar.set_label("attention weight", fontsize=8)
    instruction = attention["instruction"].replace("\n", " ")
    fig.suptitle(
        f"Where each model looks: attention of the prompt's last token over the 8x8 visual tokens at LLM layer "
        f"{attention['layer']} (heads averaged, seed {attention.get('seed', 0)}); cyan: the object's outline\n"
        f'prompt: "{instruction}"',
        fontsize=9,
    )
