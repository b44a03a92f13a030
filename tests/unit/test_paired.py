"""Paired comparisons over seeds (declora.paired): numbers against scipy and a hand computation, verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from declora.paired import PairedDiff, is_exact, paired_difference, seeds_to_decide, t_quantile, verdict

pytestmark = pytest.mark.unit


def test_paired_difference_equals_hand_computation_and_scipy():
    a = {0: 0.80, 1: 0.78, 2: 0.83, 7: 0.5}  # seed 7 has no partner: left out
    b = {0: 0.76, 1: 0.77, 2: 0.78}
    d = paired_difference(a, b)
    assert d.seeds == (0, 1, 2)
    assert d.diffs == pytest.approx((0.04, 0.01, 0.05))
    assert d.mean == pytest.approx(0.10 / 3)
    sd = math.sqrt(((0.04 - 0.1 / 3) ** 2 + (0.01 - 0.1 / 3) ** 2 + (0.05 - 0.1 / 3) ** 2) / 2)
    assert d.se == pytest.approx(sd / math.sqrt(3))
    # the t statistic and the interval of scipy's paired t-test
    t = stats.ttest_rel([0.80, 0.78, 0.83], [0.76, 0.77, 0.78])
    assert d.mean / d.se == pytest.approx(t.statistic)
    ci = t.confidence_interval(0.95)
    assert (d.lo, d.hi) == pytest.approx((ci.low, ci.high))
    assert d.hi - d.mean == pytest.approx(4.302653 * d.se, rel=1e-6)  # t_{0.975, 2}, not 2


def test_no_common_seed_is_an_error_and_one_seed_is_undecided():
    with pytest.raises(ValueError, match="no common seed"):
        paired_difference({0: 1.0}, {1: 1.0})
    one = paired_difference({0: 0.9}, {0: 0.1})
    assert math.isnan(one.se) and verdict(one, "greater") == "undecided"


def test_equal_differences_on_every_seed_give_no_interval_and_no_verdict():
    # coarse accuracies (16 test examples: steps of 6.25 points) often give the same difference twice;
    # a spread of zero is no evidence, not an exact difference
    d = paired_difference({0: 0.5625, 1: 0.5625}, {0: 0.5, 1: 0.5})
    assert d.mean == pytest.approx(0.0625) and d.se == 0.0
    assert math.isnan(d.lo) and math.isnan(d.hi)
    for kind in ("greater", "less", "equivalent"):
        assert verdict(d, kind, margin=0.1) == "undecided"
    assert seeds_to_decide(d, "greater") is None


def _diff(lo: float, hi: float) -> PairedDiff:
    return PairedDiff((0.0, 0.0), (0, 1), (lo + hi) / 2, 1.0, lo, hi)


@pytest.mark.parametrize(
    ("lo", "hi", "kind", "margin", "expected"),
    [
        (0.5, 2.0, "greater", 0, "holds"),
        (-2.0, -0.5, "greater", 0, "does not hold"),
        (-0.5, 2.0, "greater", 0, "undecided"),
        (-2.0, -0.5, "less", 0, "holds"),
        (0.5, 2.0, "less", 0, "does not hold"),
        (-0.8, 0.9, "equivalent", 1.0, "holds"),
        (1.2, 3.0, "equivalent", 1.0, "does not hold"),
        (-3.0, -1.1, "equivalent", 1.0, "does not hold"),
        (-1.5, 0.5, "equivalent", 1.0, "undecided"),
    ],
)
def test_verdict_only_where_the_interval_excludes_the_other_answer(lo, hi, kind, margin, expected):
    assert verdict(_diff(lo, hi), kind, margin) == expected


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind='bigger' is not one of"):
        verdict(_diff(0, 1), "bigger")


def test_seeds_to_decide_shrinks_the_interval_at_the_measured_spread():
    d = paired_difference({0: 2.0, 1: 3.0, 2: 2.5}, {0: 0.0, 1: 0.0, 2: 0.0})  # mean 2.5, sd 0.5
    assert verdict(d, "greater") == "holds"
    assert seeds_to_decide(d, "greater") == 3  # already decided
    close = paired_difference({0: 0.5, 1: -0.3, 2: 0.7}, {0: 0.0, 1: 0.0, 2: 0.0})  # mean 0.3, sd 0.53
    n = seeds_to_decide(close, "greater")
    sd = close.se * math.sqrt(3)
    assert n is not None and n > 3
    assert 0.3 - stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) > 0  # n seeds decide ...
    assert 0.3 - stats.t.ppf(0.975, n - 2) * sd / math.sqrt(n - 1) <= 0  # ... and n - 1 do not
    flat = paired_difference({0: 1.0, 1: 1.0}, {0: 1.0, 1: 1.0})  # mean 0, no spread: never decided
    assert seeds_to_decide(flat, "greater") is None


def test_a_metric_fixed_by_arithmetic_gives_its_exact_difference():
    # Bytes are the same on every seed by construction: zero spread is the exact difference, not coarseness.
    sent = paired_difference({0: 76.200, 1: 76.200, 2: 76.200}, {0: 76.192, 1: 76.192, 2: 76.192}, exact=True)
    assert sent.lo == sent.hi == pytest.approx(0.008) and sent.se == 0
    assert verdict(sent, "equivalent", 0.1) == "holds" and verdict(sent, "greater") == "holds"
    coarse = paired_difference({0: 76.200, 1: 76.200}, {0: 76.192, 1: 76.192})  # an accuracy would not be
    assert math.isnan(coarse.lo) and verdict(coarse, "equivalent", 0.1) == "undecided"
    assert is_exact("bytes_total") and not is_exact("acc_avg_factors")


def test_seeds_to_decide_in_the_equivalence_and_cost_directions():
    small = paired_difference({0: -0.5, 1: -1.5, 2: -1.0}, {0: 0.0, 1: 0.0, 2: 0.0})  # mean -1, sd 0.5
    assert verdict(small, "equivalent", 2.0) == "undecided"  # -1 ± 4.30 * 0.29 reaches below -2
    n = seeds_to_decide(small, "equivalent", 2.0)
    assert n is not None and -1 - stats.t.ppf(0.975, n - 1) * 0.5 / math.sqrt(n) >= -2
    assert -1 - stats.t.ppf(0.975, n - 2) * 0.5 / math.sqrt(n - 1) < -2
    assert verdict(small, "less") == "undecided"  # -1 + 4.30 * 0.29 = +0.24: the interval reaches 0
    assert seeds_to_decide(small, "less") == 4  # -1 + 3.18 * 0.5 / 2 = -0.20


def test_a_family_of_contrasts_widens_each_interval_by_bonferroni():
    a, b = {0: 2.0, 1: 3.0, 2: 2.5}, {0: 0.0, 1: 0.0, 2: 0.0}
    one, six = paired_difference(a, b), paired_difference(a, b, family=6)
    assert t_quantile(3, 6) == pytest.approx(stats.t.ppf(1 - 0.05 / 12, 2))  # 8.88 against 4.30
    assert six.hi - six.lo == pytest.approx((one.hi - one.lo) * t_quantile(3, 6) / t_quantile(3))


def test_equal_differences_up_to_float_rounding_give_no_verdict_either():
    """0.55 - 0.50, 0.60 - 0.55 and 0.65 - 0.60 are one example of a 20-row test set each, but as floats
    they differ in the last bits: that spread is rounding, not a measurement, and decides nothing."""
    diff = paired_difference({0: 0.55, 1: 0.60, 2: 0.65}, {0: 0.50, 1: 0.55, 2: 0.60})
    assert len(set(diff.diffs)) > 1  # the floats do not cancel exactly
    assert diff.se == 0 and math.isnan(diff.lo) and math.isnan(diff.hi)
    assert diff.mean == pytest.approx(0.05)
    assert verdict(diff, "greater") == "undecided" and seeds_to_decide(diff, "greater") is None
    # accuracies are logged from fp32: 76/80 - 70/80 and 68/80 - 62/80 differ by about 6e-8 there
    f32 = {k: float(np.float32(k / 80)) for k in (76, 70, 68, 62)}
    logged = paired_difference({0: f32[76], 1: f32[68]}, {0: f32[70], 1: f32[62]})
    assert len(set(logged.diffs)) > 1 and logged.se == 0 and verdict(logged, "greater") == "undecided"
    exact = paired_difference(
        {0: 1.3e6, 1: 1.4e6}, {0: 0.3e6, 1: 0.4e6}, exact=True
    )  # bytes: the exact value
    assert (exact.lo, exact.hi) == (pytest.approx(1e6), pytest.approx(1e6))


def test_a_spread_is_judged_against_the_values_not_against_1():
    """A consensus metric near 1e-9 with a real spread between seeds gets scipy's interval and a verdict,
    the one the same numbers get in units of 1e-9 (the rounding cut-off was 1e-6 for every value below 1,
    which called this spread none)."""
    a = {0: 1.37e-9, 1: 1.52e-9, 2: 1.29e-9}
    b = {0: 3.10e-9, 1: 3.35e-9, 2: 2.95e-9}
    d = paired_difference(a, b)
    ref = stats.ttest_rel([a[s] for s in a], [b[s] for s in b]).confidence_interval()
    assert math.isclose(d.lo, ref.low, rel_tol=1e-9) and math.isclose(d.hi, ref.high, rel_tol=1e-9)
    scaled = paired_difference({s: v * 1e9 for s, v in a.items()}, {s: v * 1e9 for s, v in b.items()})
    assert verdict(d, "less") == verdict(scaled, "less") == "holds"
    same = paired_difference({0: 1e-9, 1: 2e-9}, {0: 0.5e-9, 1: 1.5e-9})  # the same 5e-10 on both seeds
    assert same.se == 0 and math.isnan(same.lo)  # rounding, not spread: no interval


def test_seeds_to_decide_keeps_the_bonferroni_family():
    """A difference widened for a family of 4 contrasts needs more seeds to decide than the same
    difference alone (it was answered with the single contrast's count)."""
    a, b = {0: 1.0, 1: 2.2, 2: 0.4, 3: 1.9, 4: 0.6}, {s: 0.0 for s in range(5)}
    alone, widened = paired_difference(a, b), paired_difference(a, b, family=4)
    assert verdict(alone, "greater") == "holds" and verdict(widened, "greater") == "undecided"
    assert seeds_to_decide(alone, "greater") == 5
    n = seeds_to_decide(widened, "greater")
    assert n is not None and n > 5 and widened.family == 4
    sd = widened.se * math.sqrt(5)
    assert widened.mean - t_quantile(n, 4) * sd / math.sqrt(n) > 0  # decided at n ...
    assert widened.mean - t_quantile(n - 1, 4) * sd / math.sqrt(n - 1) <= 0  # ... and not one seed sooner
