"""Confidence intervals and p-values for small numbers of seeds: Student's t on per-seed differences.

A comparison of two arms run with the same seeds is paired: seed ``i`` of both arms shares its data order and
initialisations, so the per-seed differences ``b_i - a_i`` carry the effect and cancel what the seed alone does. The
interval is ``mean ± t(1 - alpha/2, n - 1) * sd / sqrt(n)``, the p-value the two-sided one of ``mean = 0``.

Student's t is computed in closed form for integer degrees of freedom (Abramowitz & Stegun 26.7.3-4), so the
package needs no scipy; the tests check it against scipy.

For success rates over many (environment, seed) pairs, ``wilcoxon_greater`` is the one-sided paired Wilcoxon
signed-rank test (``eval report``): zero differences dropped (Wilcoxon's original treatment, scipy's default), tied
absolute differences given average ranks; exact without ties up to 50 pairs (the null distribution of W+ by dynamic
programming over the ranks), else the normal approximation with the tie correction and, as scipy's default, no
continuity correction.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Sequence

import numpy as np


def t_central(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` (a positive integer) degrees of freedom."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df!r}")
    t = abs(float(t))
    if math.isinf(t):
        return 1.0
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:  # 2/pi * (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(df-3)))
        total, term = (1.0, 1.0) if df > 1 else (0.0, 0.0)
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return min(1.0, 2 / math.pi * (theta + s * math.cos(theta) * total))
    total, term = 1.0, 1.0  # sin * (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2))
    for k in range(1, df // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return min(1.0, s * total)


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile (0.5 < q < 1) of Student's t with ``df`` degrees of freedom, by bisection."""
    if not 0.5 < q < 1:
        raise ValueError(f"q must lie in (0.5, 1), got {q}")
    central = 2 * q - 1
    lo, hi = 0.0, 1.0
    while t_central(hi, df) < central:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_central(mid, df) < central else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Interval:
    """The mean of ``n`` values (per-seed differences), its confidence interval and the p-value of mean = 0."""

    mean: float
    low: float
    high: float
    p: float
    n: int
    level: float = 0.95

    def word(self, above: str, none: str, below: str) -> str:
        """``above`` when the whole interval is above 0, ``below`` when below it, else ``none``."""
        return above if self.low > 0 else below if self.high < 0 else none

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Student's t interval of the mean of ``values`` (at least two) and the two-sided p-value of mean = 0.

    Values all alike give a zero-width interval: p = 1 when they are all 0, else p = 0.
    """
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or len(v) < 2:
        raise ValueError(f"an interval needs at least two values (seeds), got {len(v.reshape(-1))}")
    n, mean = len(v), float(v.mean())
    se = float(v.std(ddof=1)) / math.sqrt(n)
    if se <= 1e-12 * max(1.0, abs(mean)):
        return Interval(mean, mean, mean, 1.0 if mean == 0 else 0.0, n, level)
    half = t_quantile(0.5 + level / 2, n - 1) * se
    p = 1.0 - t_central(mean / se, n - 1)
    return Interval(mean, mean - half, mean + half, max(p, 0.0), n, level)


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """The interval of ``b - a`` paired by position (seed ``i`` of both arms)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same seeds in both arms, got {len(a)} and {len(b)}")
    return mean_interval(np.asarray(b, dtype=float) - np.asarray(a, dtype=float), level)


def _ranks(values: Sequence[float]) -> list:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def wilcoxon_greater(x: Sequence[float], y: Sequence[float], exact_max: int = 50) -> Dict[str, float]:
    """Test H1: x tends to be greater than y (pairs x[i], y[i]). Returns n (non-zero pairs), W+ and p."""
    if len(x) != len(y):
        raise ValueError(f"paired samples differ in length: {len(x)} vs {len(y)}")
    d = [a - b for a, b in zip(x, y) if a != b]
    n = len(d)
    if n == 0:
        return {"n": 0, "w_plus": 0.0, "p": 1.0, "method": "no non-zero differences"}
    absd = [abs(v) for v in d]
    ranks = _ranks(absd)
    w_plus = sum(r for r, v in zip(ranks, d) if v > 0)
    ties = len(set(absd)) != n
    if not ties and n <= exact_max:
        # counts[s] = number of sign assignments with W+ = s, over ranks 1..n
        total = n * (n + 1) // 2
        counts = [0] * (total + 1)
        counts[0] = 1
        for r in range(1, n + 1):
            for s in range(total, r - 1, -1):
                counts[s] += counts[s - r]
        w = int(round(w_plus))
        p = sum(counts[w:]) / 2**n
        return {"n": n, "w_plus": w_plus, "p": min(1.0, p), "method": "exact"}
    mean = n * (n + 1) / 4
    tie_groups: Dict[float, int] = {}
    for v in absd:
        tie_groups[v] = tie_groups.get(v, 0) + 1
    var = n * (n + 1) * (2 * n + 1) / 24 - sum(t**3 - t for t in tie_groups.values()) / 48
    if var <= 0:
        return {"n": n, "w_plus": w_plus, "p": 1.0, "method": "degenerate"}
    z = (w_plus - mean) / math.sqrt(var)  # no continuity correction (as scipy.stats.wilcoxon by default)
    p = 0.5 * math.erfc(z / math.sqrt(2))
    return {"n": n, "w_plus": w_plus, "p": p, "method": "normal"}
