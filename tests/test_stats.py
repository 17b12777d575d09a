"""Student's t in closed form against scipy, and the intervals the demo's verdict is read from."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from openvla_align.stats import mean_interval, paired_interval, t_central, t_quantile


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 7, 10, 29])
def test_t_distribution_matches_scipy(df):
    for t in (0.0, 0.1, 0.7, 1.5, 2.776, 4.0, 12.0, 300.0):
        assert t_central(t, df) == pytest.approx(sps.t.cdf(t, df) - sps.t.cdf(-t, df), abs=1e-12)
    for q in (0.6, 0.9, 0.975, 0.995):
        assert t_quantile(q, df) == pytest.approx(sps.t.ppf(q, df), rel=1e-9)


def test_bad_degrees_of_freedom_and_levels_are_refused():
    with pytest.raises(ValueError, match="positive integer"):
        t_central(1.0, 0)
    with pytest.raises(ValueError, match="positive integer"):
        t_central(1.0, 2.5)
    with pytest.raises(ValueError, match=r"\(0.5, 1\)"):
        t_quantile(0.3, 4)


def test_paired_interval_is_scipys_paired_t_test():
    rng = np.random.default_rng(0)
    a = rng.normal(0.5, 0.05, 5)
    b = a + rng.normal(0.03, 0.02, 5)
    iv = paired_interval(a, b)
    ref = sps.ttest_rel(b, a)
    assert iv.p == pytest.approx(ref.pvalue, rel=1e-9)
    lo, hi = ref.confidence_interval(0.95)
    assert (iv.low, iv.high) == (pytest.approx(lo, rel=1e-9), pytest.approx(hi, rel=1e-9))
    assert iv.mean == pytest.approx(float(np.mean(b - a))) and iv.n == 5


def test_words_come_from_the_interval():
    above = mean_interval([0.02, 0.03, 0.025, 0.04, 0.03])
    across = mean_interval([0.05, -0.04, 0.01, 0.03, -0.02])
    below = mean_interval([-0.02, -0.03, -0.025, -0.04, -0.03])
    assert [iv.word("beats", "no difference shown", "worse") for iv in (above, across, below)] == [
        "beats",
        "no difference shown",
        "worse",
    ]
    assert above.p < 0.05 < across.p and below.p < 0.05


def test_constant_differences_and_too_few_seeds():
    zero = mean_interval([0.0] * 5)
    assert (zero.low, zero.high, zero.p) == (0.0, 0.0, 1.0)
    same = mean_interval([0.1] * 5)
    assert (same.low, same.high, same.p) == (pytest.approx(0.1), pytest.approx(0.1), 0.0)
    assert same.word("up", "none", "down") == "up"
    with pytest.raises(ValueError, match="at least two values"):
        mean_interval([0.3])
    with pytest.raises(ValueError, match="same seeds"):
        paired_interval([1, 2, 3], [1, 2])
    assert math.isclose(t_central(float("inf"), 3), 1.0)
