"""The demo's statistics, table, verdict and picture, all computed from its results (nothing typed in by hand).

Two questions per metric, each answered by a 95 % confidence interval over the seeds (Student's t, ``stats``):

- Does plain SFT lose what the base VLA knew? ``SFT - base`` per seed (the base VLA is one model).
- Does alignment beat plain SFT? ``Align - SFT`` paired by seed (seed ``i`` of both arms shares its LoRA init,
  projector seed and batch order), with its p-value.

A verdict is a word read from the interval: above 0, below 0, or across it ("no difference shown"). Never from SDs.
"""

from __future__ import annotations

import logging
from typing import Dict, List

import numpy as np

from ..stats import Interval, mean_interval, paired_interval

logger = logging.getLogger(__name__)

# (row label, metric key); every metric is a share in [0, 1], higher is better
METRICS = (
    ("probe top-1, object tokens, aligned layer", "probe"),
    ("probe top-1, object's place (9 cells)", "probe_place"),
    ("probe top-1, all tokens, aligned layer", "probe_mean"),
    ("VL questions answered exactly", "vl"),
    ("sorting accuracy, in-distribution", "id"),
    ("sorting accuracy, OOD objects", "ood_objects"),
    ("sorting accuracy, OOD scenes", "ood_scenes"),
)
RUNS = ("sft", "align")
LEVEL = 0.95


def summarize(base: Dict[str, float], per_seed: Dict[str, List[Dict[str, float]]]) -> Dict[str, Dict]:
    """Per metric: each arm's values and the interval of its mean, ``SFT - base`` and ``Align - SFT`` (paired).

    ``per_seed[run]`` lists one dict of metrics per seed, in the same seed order for both arms.
    """
    seeds = [[row["seed"] for row in per_seed[run]] for run in RUNS]
    if seeds[0] != seeds[1]:
        raise ValueError(f"SFT and Align must run the same seeds in the same order, got {seeds[0]} and {seeds[1]}")
    out = {}
    for _, key in METRICS:
        values = {run: [float(row[key]) for row in per_seed[run]] for run in RUNS}
        out[key] = {
            **{run: {"values": v, "mean": mean_interval(v, LEVEL).to_dict()} for run, v in values.items()},
            "sft_vs_base": mean_interval(np.subtract(values["sft"], base[key]), LEVEL).to_dict(),
            "align_vs_sft": paired_interval(values["sft"], values["align"], LEVEL).to_dict(),
        }
    return out


def _iv(d: Dict) -> Interval:
    return Interval(**d)


def degradation_word(summary_row: Dict) -> str:
    return _iv(summary_row["sft_vs_base"]).word("improved", "no change shown", "degraded")


def align_word(summary_row: Dict) -> str:
    return _iv(summary_row["align_vs_sft"]).word("beats", "no difference shown", "worse")


def _ci(iv: Interval) -> str:
    return f"{iv.mean:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}]"


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


BORDER = 0.005  # an interval with an end this close to 0 gets a warning: its word may flip on another machine


def borderline(iv: Interval) -> bool:
    return iv.high > iv.low and min(abs(iv.low), abs(iv.high)) < BORDER


def verdict(summary: Dict[str, Dict]) -> List[str]:
    """One line per metric: what SFT did to the base VLA, and what alignment did against SFT, each from its interval.
    An interval ending within ``BORDER`` of 0 is marked "(borderline)"."""
    lines = []
    for label, key in METRICS:
        row = summary[key]
        down, diff = _iv(row["sft_vs_base"]), _iv(row["align_vs_sft"])
        lines.append(
            f"{label}: SFT vs base {degradation_word(row)}{' (borderline)' * borderline(down)} "
            f"({_ci(down)}, p {_p(down.p)}); "
            f"Align vs SFT {align_word(row)}{' (borderline)' * borderline(diff)} ({_ci(diff)}, p {_p(diff.p)})"
        )
    return lines


def words(summary: Dict[str, Dict]) -> Dict[str, Dict[str, str]]:
    """{metric: {"sft_vs_base": word, "align_vs_sft": word}}: the verdict as data (what must not flip)."""
    return {
        key: {"sft_vs_base": degradation_word(summary[key]), "align_vs_sft": align_word(summary[key])}
        for _, key in METRICS
    }


def conclusion(summary: Dict[str, Dict]) -> str:
    """The demo's last word, from the intervals."""
    labels = {key: label for label, key in METRICS}
    by = words(summary)

    def which(kind: str, word: str) -> List[str]:
        return [labels[k] for _, k in METRICS if by[k][kind] == word]

    degraded, beats, worse = (
        which("sft_vs_base", "degraded"),
        which("align_vs_sft", "beats"),
        which("align_vs_sft", "worse"),
    )
    n = len(next(iter(summary.values()))["sft"]["values"])
    parts = [
        f"Plain SFT degraded the base VLA on: {'; '.join(degraded)}."
        if degraded
        else "Plain SFT did NOT degrade the base VLA on any metric beyond its 95% interval.",
        f"Alignment beat plain SFT on: {'; '.join(beats)}."
        if beats
        else "Alignment did NOT beat plain SFT on any metric beyond its 95% interval.",
    ]
    if worse:
        parts.append(f"Alignment was worse than plain SFT on: {'; '.join(worse)}.")
    rest = [labels[k] for _, k in METRICS if by[k]["align_vs_sft"] == "no difference shown"]
    if rest:
        parts.append(f"No difference shown on: {'; '.join(rest)}.")
    near = [labels[k] for _, k in METRICS if any(borderline(_iv(summary[k][kind])) for kind in by[k])]
    if near:
        parts.append(
            f"Borderline (an interval ends within {BORDER} of 0, so may read otherwise on another machine): "
            f"{'; '.join(near)}."
        )
    parts.append(f"({n} seeds per arm, 95% intervals, Student's t; paired by seed for Align - SFT.)")
    return " ".join(parts)


def table(teacher_probe: Dict[str, float], base: Dict[str, float], summary, seeds) -> str:
    n = len(seeds)
    head = (
        f"{'':<42}{'teacher':>8}{'base':>7}{f'SFT ({n} seeds)':>17}{f'Align ({n} seeds)':>17}"
        f"{'SFT - base [95% CI]':>26}{'Align - SFT [95% CI]':>26}{'p':>7}"
    )
    lines = [head, "-" * len(head)]
    for label, key in METRICS:
        row = summary[key]
        t = f"{teacher_probe[key]:.3f}" if key in teacher_probe else "-"
        means = [f"{row[r]['mean']['mean']:.3f} ± {np.std(row[r]['values'], ddof=1):.3f}" for r in RUNS]
        down, diff = _iv(row["sft_vs_base"]), _iv(row["align_vs_sft"])
        lines.append(
            f"{label:<42}{t:>8}{base[key]:>7.3f}{means[0]:>17}{means[1]:>17}{_ci(down):>26}{_ci(diff):>26}"
            f"{_p(diff.p):>7}"
        )
    lines.append(
        f"arms: mean ± SD over seeds {list(seeds)} (fixed before any run); chance: probe 1/12 = 0.083 (place 1/9), "
        "sorting 1/12 = 0.083; p: paired t-test of Align - SFT"
    )
    lines.append("base: the VL-pretrained VLA, never trained on the robot task (its sorting is an untrained policy's)")
    return "\n".join(lines)


def stage_times(seconds: Dict[str, float]) -> str:
    return "time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
