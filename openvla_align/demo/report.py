"""The demo's table, verdict and picture, all computed from its results dict (nothing typed in by hand)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

# (row label, metric key); every metric is a share in [0, 1], higher is better
METRICS = (
    ("probe top-1, object tokens, aligned layer", "probe"),
    ("probe top-1, all tokens, aligned layer", "probe_mean"),
    ("sorting accuracy, in-distribution", "id"),
    ("sorting accuracy, OOD objects", "ood_objects"),
    ("sorting accuracy, OOD scenes", "ood_scenes"),
)
RUNS = ("sft", "align")


def mean_sd(values: Sequence[float]) -> Dict[str, float]:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "values": v.tolist()}


def summarize(per_seed: Dict[str, List[Dict[str, float]]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{run: [metrics of each seed]} -> {run: {metric: mean/sd/values}}."""
    return {run: {key: mean_sd([m[key] for m in rows]) for _, key in METRICS} for run, rows in per_seed.items()}


def compare(summary, key: str):
    """(Align mean - SFT mean, the seed spread (the larger SD), clear): a difference is clear only when it is larger
    than the spread and at least 0.01."""
    sft, align = summary["sft"][key], summary["align"][key]
    diff = align["mean"] - sft["mean"]
    spread = max(sft["sd"], align["sd"])
    return diff, spread, abs(diff) > spread and abs(diff) >= 0.01


def verdict(summary: Dict[str, Dict[str, Dict[str, float]]]) -> List[str]:
    """One line per metric comparing SFT+Align with SFT; only a clear difference (``compare``) counts."""
    lines = []
    for label, key in METRICS:
        diff, spread, clear = compare(summary, key)
        if clear:
            word = "higher" if diff > 0 else "LOWER"
            lines.append(f"{label}: {word} with Align ({diff:+.3f}; seed SD up to {spread:.3f})")
        else:
            lines.append(f"{label}: no clear difference ({diff:+.3f} is within the seed SD of {spread:.3f})")
    return lines


def better_with_align(summary) -> List[str]:
    """Metric keys on which SFT+Align clearly beat SFT."""
    clear_gains = {key: compare(summary, key) for _, key in METRICS}
    return [key for key, (diff, _, clear) in clear_gains.items() if clear and diff > 0]


def conclusion(summary) -> str:
    """The demo's last word on the effect, from the numbers: which metrics Align improved, and which it did not."""
    labels = dict((key, label) for label, key in METRICS)
    won = better_with_align(summary)
    if not won:
        return (
            "At this scale alignment did NOT beat plain SFT beyond the seed spread on any metric: the run shows the "
            "mechanics, not the paper's effect."
        )
    rest = [labels[k] for _, k in METRICS if k not in won]
    return f"Alignment beat plain SFT beyond the seed spread on: {'; '.join(labels[k] for k in won)}. " + (
        f"Not on: {'; '.join(rest)}." if rest else ""
    )


def table(teacher_probe: Dict[str, float], base: Dict[str, float], summary, seconds: Dict[str, float], seeds) -> str:
    n = len(seeds)
    runs = f"{n} seed" + ("s" if n != 1 else "")
    head = f"{'':<42}{'teacher':>9}{'base VLA':>10}{f'SFT ({runs})':>18}{f'SFT+Align ({runs})':>24}"
    lines = [head, "-" * len(head)]
    for label, key in METRICS:
        t = f"{teacher_probe[key]:.3f}" if key in teacher_probe else "-"
        cells = [f"{summary[r][key]['mean']:.3f} ± {summary[r][key]['sd']:.3f}" for r in RUNS]
        lines.append(f"{label:<42}{t:>9}{base[key]:>10.3f}{cells[0]:>18}{cells[1]:>24}")
    per_run = [f"{seconds[r] / n:.0f} s/run" for r in RUNS]
    lines.append(
        f"{'training time':<42}{seconds['teacher']:>8.0f}s{seconds['base']:>9.0f}s{per_run[0]:>18}{per_run[1]:>24}"
    )
    lines.append(f"chance: probe 1/12 = 0.083, sorting 1/12 = 0.083; seeds {list(seeds)} (fixed before any run)")
    return "\n".join(lines)


def plot(path: Path, teacher_probe: Dict[str, float], base, summary, attention: Optional[dict] = None):
    """Bars (mean ± SD) per metric, plus one attention row per model when ``attention`` is given:
    {"images": (n, H, W, 3), "rows": {label: (n, h, w)}, "layer": L}."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; skipping %s (pip install 'openvla-align[demo]').", path.name)
        return None
    rows = attention["rows"] if attention else {}
    n_img = len(attention["images"]) if attention else 0
    fig = plt.figure(figsize=(12, 3.2 + 1.6 * len(rows)))
    grid = fig.add_gridspec(1 + len(rows), max(n_img, 1), height_ratios=[2.2] + [1] * len(rows))
    ax = fig.add_subplot(grid[0, :])
    x = np.arange(len(METRICS))
    width = 0.27
    ax.bar(x - width, [base[k] for _, k in METRICS], width, label="base VLA (VL-pretrained)", color="#999999")
    for i, (run, colour) in enumerate(zip(RUNS, ("#d95f02", "#1b9e77"))):
        means = [summary[run][k]["mean"] for _, k in METRICS]
        sds = [summary[run][k]["sd"] for _, k in METRICS]
        ax.bar(x + i * width, means, width, yerr=sds, capsize=3, color=colour, label=("SFT", "SFT+Align")[i])
    for i, (_, key) in enumerate(METRICS):
        if key in teacher_probe:
            ax.plot(
                [i - 1.5 * width, i + 1.5 * width],
                [teacher_probe[key]] * 2,
                color="black",
                ls="--",
                lw=1,
                label="teacher probe" if i == 0 else None,
            )
    ax.axhline(1 / 12, color="black", ls=":", lw=1, label="chance (1/12)")
    ax.set_xticks(x, [label.replace(", ", "\n", 1) for label, _ in METRICS], fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=3, loc="upper right")
    ax.set_title("openvla-align demo: tiny models, generated scenes (mean ± SD over seeds)", fontsize=10)
    for r, (label, maps) in enumerate(rows.items()):
        for c in range(n_img):
            a = fig.add_subplot(grid[1 + r, c])
            img = attention["images"][c]
            a.imshow(img)
            a.imshow(maps[c], cmap="inferno", alpha=0.55, extent=(0, img.shape[1], img.shape[0], 0))
            a.set_xticks([])
            a.set_yticks([])
            if c == 0:
                a.set_ylabel(label, fontsize=8)
    if rows:
        fig.text(
            0.5,
            0.01,
            f"attention of the prompt's last token over the visual tokens, layer {attention['layer']}",
            ha="center",
            fontsize=8,
        )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
