"""The demo's statistics, table, verdict and picture, all computed from its results (nothing typed in by hand).

Questions per metric, each answered by a 95 % confidence interval over the seeds (Student's t, ``stats``):

- Does plain SFT lose what the base VLA knew? ``SFT - base`` per seed (the base VLA is one model).
- Does alignment beat plain SFT, at the paper's weight and at a stronger pull? ``Align - SFT`` for each aligned
  arm, paired by seed (seed ``i`` of every arm shares its LoRA init, projector seed and batch order), with its
  p-value.

A verdict is a word read from the interval: above 0, below 0, or across it ("no difference shown"). Never from SDs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Dict, List

import numpy as np

from ..stats import Interval, mean_interval, paired_interval

logger = logging.getLogger(__name__)

# (row label, metric key); every metric but the cosine is a share in [0, 1]; higher is better for all
METRICS = (
    ("cosine to the teacher, aligned layer", "cosine"),
    ("probe top-1, object tokens, aligned layer", "probe"),
    ("probe top-1, object's place (9 cells)", "probe_place"),
    ("probe top-1, all tokens, aligned layer", "probe_mean"),
    ("VL questions answered exactly", "vl"),
    ("sorting accuracy, in-distribution", "id"),
    ("sorting accuracy, OOD objects", "ood_objects"),
    ("sorting accuracy, OOD scenes", "ood_scenes"),
)
RUNS = ("sft", "align", "strong")  # plain SFT; alignment at the paper's weight (0.2); a stronger pull (1.0)
ALIGNED = {"align": "align_vs_sft", "strong": "strong_vs_sft"}  # aligned arm -> its paired comparison with SFT
LEVEL = 0.95


def arm_names(coeffs: Dict[str, float]) -> Dict[str, str]:
    """{"sft": "SFT", "align": "Align 0.2", "strong": "Align 1.0"} for the runs' coefficients."""
    return {"sft": "SFT", **{run: f"Align {float(coeffs[run])}" for run in ALIGNED}}


def figures_fingerprint(
    teacher_probe: Dict[str, float], base: Dict[str, float], per_seed: Dict[str, List[Dict]]
) -> str:
    """BLAKE2 of every figure the run measured (the teacher's and the base VLA's, each run's per seed), to the last
    bit: two runs print the same fingerprint only if every figure is the same (the README says which one it shows)."""
    figures = {"teacher_probe": teacher_probe, "base": base, "per_seed": per_seed}
    return hashlib.blake2b(json.dumps(figures, sort_keys=True).encode(), digest_size=8).hexdigest()


def summarize(base: Dict[str, float], per_seed: Dict[str, List[Dict[str, float]]]) -> Dict[str, Dict]:
    """Per metric: each arm's values and the interval of its mean, ``SFT - base`` and each aligned arm ``- SFT``
    (paired).

    ``per_seed[run]`` lists one dict of metrics per seed, in the same seed order for every arm.
    """
    seeds = {run: [row["seed"] for row in per_seed[run]] for run in RUNS}
    if any(s != seeds["sft"] for s in seeds.values()):
        raise ValueError(f"Every arm must run the same seeds in the same order, got {seeds}")
    out = {}
    for _, key in METRICS:
        values = {run: [float(row[key]) for row in per_seed[run]] for run in RUNS}
        out[key] = {
            **{run: {"values": v, "mean": mean_interval(v, LEVEL).to_dict()} for run, v in values.items()},
            "sft_vs_base": mean_interval(np.subtract(values["sft"], base[key]), LEVEL).to_dict(),
            **{kind: paired_interval(values["sft"], values[run], LEVEL).to_dict() for run, kind in ALIGNED.items()},
        }
    return out


def _iv(d: Dict) -> Interval:
    return Interval(**d)


def degradation_word(summary_row: Dict) -> str:
    return _iv(summary_row["sft_vs_base"]).word("improved", "no change shown", "degraded")


def align_word(summary_row: Dict, kind: str = "align_vs_sft") -> str:
    return _iv(summary_row[kind]).word("beats", "no difference shown", "worse")


def _ci(iv: Interval) -> str:
    return f"{iv.mean:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}]"


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


BORDER = 0.005  # an interval with an end this close to 0 gets a warning: its word may flip on another machine


def borderline(iv: Interval) -> bool:
    return iv.high > iv.low and min(abs(iv.low), abs(iv.high)) < BORDER


def verdict(summary: Dict[str, Dict], coeffs: Dict[str, float]) -> List[str]:
    """One line per metric: what SFT did to the base VLA, and what each aligned arm did against SFT, each from its
    interval. An interval ending within ``BORDER`` of 0 is marked "(borderline)"."""
    names = arm_names(coeffs)
    lines = []
    for label, key in METRICS:
        row = summary[key]
        down = _iv(row["sft_vs_base"])
        parts = [
            f"SFT vs base {degradation_word(row)}{' (borderline)' * borderline(down)} ({_ci(down)}, p {_p(down.p)})"
        ]
        for run, kind in ALIGNED.items():
            diff = _iv(row[kind])
            parts.append(
                f"{names[run]} vs SFT {align_word(row, kind)}{' (borderline)' * borderline(diff)} "
                f"({_ci(diff)}, p {_p(diff.p)})"
            )
        lines.append(f"{label}: " + "; ".join(parts))
    return lines


def words(summary: Dict[str, Dict]) -> Dict[str, Dict[str, str]]:
    """{metric: {"sft_vs_base": word, "align_vs_sft": word, "strong_vs_sft": word}}: the verdict as data (what must
    not flip)."""
    return {
        key: {
            "sft_vs_base": degradation_word(summary[key]),
            **{kind: align_word(summary[key], kind) for kind in ALIGNED.values()},
        }
        for _, key in METRICS
    }


def conclusion(summary: Dict[str, Dict], coeffs: Dict[str, float]) -> str:
    """The demo's last word, from the intervals."""
    labels = {key: label for label, key in METRICS}
    names = arm_names(coeffs)
    by = words(summary)

    def which(kind: str, word: str) -> List[str]:
        return [labels[k] for _, k in METRICS if by[k][kind] == word]

    n = len(next(iter(summary.values()))["sft"]["values"])
    degraded = which("sft_vs_base", "degraded")
    parts = [
        f"Plain SFT degraded the base VLA on: {'; '.join(degraded)}."
        if degraded
        else "Plain SFT did NOT degrade the base VLA on any metric beyond its 95% interval."
    ]
    for run, kind in ALIGNED.items():
        beats, worse = which(kind, "beats"), which(kind, "worse")
        parts.append(
            f"{names[run]} beat plain SFT on: {'; '.join(beats)}."
            if beats
            else f"{names[run]} did NOT beat plain SFT on any metric beyond its 95% interval."
        )
        if worse:
            parts.append(f"{names[run]} was worse than plain SFT on: {'; '.join(worse)}.")
    near = [labels[k] for _, k in METRICS if any(borderline(_iv(summary[k][kind])) for kind in by[k])]
    if near:
        parts.append(
            f"Borderline (an interval ends within {BORDER} of 0, so may read otherwise on another machine): "
            f"{'; '.join(near)}."
        )
    parts.append(f"({n} seeds per arm, 95% intervals, Student's t; paired by seed for Align - SFT.)")
    return " ".join(parts)


def table(teacher_probe: Dict[str, float], base: Dict[str, float], summary, seeds, coeffs: Dict[str, float]) -> str:
    names = arm_names(coeffs)
    head = (
        f"{'':<40}{'teacher':>8}{'base':>7}"
        + "".join(f"{names[r]:>16}" for r in RUNS)
        + f"{'SFT - base [95% CI]':>26}"
        + "".join(f"{names[r] + ' - SFT':>26}" for r in ALIGNED)
    )
    lines = [head, "-" * len(head)]
    for label, key in METRICS:
        row = summary[key]
        t = f"{teacher_probe[key]:.3f}" if key in teacher_probe else "-"
        means = "".join(
            f"{row[r]['mean']['mean']:.3f} ± {np.std(row[r]['values'], ddof=1):.3f}".rjust(16) for r in RUNS
        )
        diffs = "".join(f"{_ci(_iv(row[kind])):>26}" for kind in ALIGNED.values())
        lines.append(f"{label:<40}{t:>8}{base[key]:>7.3f}{means}{_ci(_iv(row['sft_vs_base'])):>26}{diffs}")
    lines.append(
        f"arms: mean ± SD over seeds {list(seeds)} (fixed before any run), alignment coefficient after 'Align'; "
        "differences: mean [95% CI], paired by seed (p-values in the verdict); chance: probe 1/12 = 0.083 "
        "(place 1/9), sorting 1/12 = 0.083; cosine: the aligned layer's visual tokens through seed i's frozen "
        "projector vs the teacher's features (the alignment loss's quantity), on held-out scenes"
    )
    lines.append("base: the VL-pretrained VLA, never trained on the robot task (its sorting is an untrained policy's)")
    return "\n".join(lines)


def stage_times(seconds: Dict[str, float]) -> str:
    return "time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
