"""One-sided paired Wilcoxon signed-rank test, without scipy.

Zero differences are dropped (Wilcoxon's original treatment, scipy's default), tied absolute differences get
average ranks. Without ties and with at most 50 pairs the p-value is exact (the null distribution of W+ by dynamic
programming over the ranks); otherwise it uses the normal approximation with the tie correction and, as
scipy.stats.wilcoxon by default, no continuity correction.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence


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
