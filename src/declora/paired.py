"""Paired comparisons over seeds: the difference of two methods, its standard error and a verdict.

Two methods run with the same seed share the partition, the batch order and the evaluation set, so most of
the run-to-run noise is common to both; the difference *per seed* removes it. For seeds s = 1..n:

    d_s = m_A(s) - m_B(s),   mean d̄,   SE = sd(d) / sqrt(n),   95% interval d̄ ± t_{0.975, n-1} · SE

(Student's t, because n is a handful of seeds: with 3 seeds t = 4.30, not 2.) A verdict is given only
where the interval excludes the other answer:

- ``greater`` (A beats B): holds if the interval lies above 0, does not hold if it lies below 0.
- ``less`` (A costs against B): the mirror image.
- ``equivalent`` within ±margin: holds if the interval lies inside [-margin, margin], does not hold if it
  lies wholly outside it; otherwise undecided.

When every seed gives the same difference there is no interval (``lo``/``hi`` are NaN): a spread of zero
over a handful of seeds says the metric is coarse (a small test set moves in steps of one example), not
that the difference is exact, so the verdict is "undecided". The exception is a metric fixed by arithmetic
(``exact``: the bytes a run sends depend on its shapes and schedule, not on the data): there a zero spread
is the exact difference, and the interval is that one value.

Everything else is "undecided", with the number of seeds at which the interval would decide if the mean
and the per-seed spread stayed as measured (``seeds_to_decide``). That is a coin flip's chance when the
true difference is the measured one; a 80 % chance takes about twice as many seeds.

Each interval is at 95 % on its own. A page of many contrasts should say how many it makes, or widen them
together: ``t_quantile(n, family=m)`` gives the Bonferroni quantile for m contrasts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

KINDS = ("greater", "less", "equivalent")


@dataclass(frozen=True)
class PairedDiff:
    diffs: tuple[float, ...]  # d_s, in the order of ``seeds``
    seeds: tuple[int, ...]
    mean: float
    se: float  # NaN with fewer than 2 seeds
    lo: float  # the 95% t-interval of the mean difference; NaN with fewer than 2 seeds or no spread
    hi: float
    family: int = 1  # the Bonferroni family the interval was widened for (t_quantile)


EXACT_PREFIXES = ("bytes",)  # metrics fixed by arithmetic: the same on every seed by construction


def is_exact(metric: str) -> bool:
    return metric.startswith(EXACT_PREFIXES)


def t_quantile(n: int, family: int = 1) -> float:
    """t_{1 - 0.025/family, n-1}: the half-width of a 95% interval in standard errors (with ``family`` > 1,
    of each of ``family`` Bonferroni-corrected intervals, which all hold together with 95%)."""
    return float(stats.t.ppf(1 - 0.025 / family, n - 1)) if n >= 2 else math.inf


def paired_difference(
    a: dict[int, float], b: dict[int, float], exact: bool = False, family: int = 1
) -> PairedDiff:
    """A - B over the seeds both have (keys: seed, values: the metric). ``exact``: a metric fixed by
    arithmetic (``is_exact``), whose zero spread is an exact difference; ``family``: see ``t_quantile``."""
    seeds = tuple(sorted(set(a) & set(b)))
    d = np.asarray([a[s] - b[s] for s in seeds], dtype=float)
    if not len(d):
        raise ValueError(f"no common seed: {sorted(a)} against {sorted(b)}")
    mean = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
    # The same difference on every seed, up to float rounding: 0.55 - 0.50 and 0.60 - 0.55 differ in the
    # last bits, and a spread of 1e-17 would give a zero-width interval and a verdict from no information.
    # Metrics are logged from fp32 tensors (a relative step of 6e-8), so rounding reaches 1e-7 of the
    # values there: relative to them, not to 1, or a real spread of a metric near 1e-9 would be rounding.
    scale = max(abs(v) for v in (*a.values(), *b.values()))
    if se <= 1e-6 * scale:
        se = 0.0
    if len(d) > 1 and se == 0 and exact:
        return PairedDiff(tuple(d.tolist()), seeds, mean, 0.0, mean, mean, family)
    half = t_quantile(len(d), family) * se if len(d) > 1 and se > 0 else math.nan  # no spread: no interval
    return PairedDiff(tuple(d.tolist()), seeds, mean, se, mean - half, mean + half, family)


def verdict(diff: PairedDiff, kind: str, margin: float = 0.0) -> str:
    """ "holds", "does not hold" or "undecided" (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {list(KINDS)}")
    lo, hi = diff.lo, diff.hi
    if math.isnan(lo):
        return "undecided"
    if kind == "greater":
        return "holds" if lo > 0 else "does not hold" if hi < 0 else "undecided"
    if kind == "less":
        return "holds" if hi < 0 else "does not hold" if lo > 0 else "undecided"
    if -margin <= lo and hi <= margin:
        return "holds"
    return "does not hold" if lo > margin or hi < -margin else "undecided"


def seeds_to_decide(diff: PairedDiff, kind: str, margin: float = 0.0, most: int = 1000) -> int | None:
    """The fewest seeds whose interval (same mean, same per-seed spread, same Bonferroni family) would
    decide; None if none up to ``most`` would (a mean on the boundary, or no spread measured)."""
    if len(diff.diffs) < 2 or not diff.se > 0:
        return None
    sd = diff.se * math.sqrt(len(diff.diffs))
    for n in range(len(diff.diffs), most + 1):
        half = t_quantile(n, diff.family) * sd / math.sqrt(n)
        trial = PairedDiff(
            diff.diffs,
            diff.seeds,
            diff.mean,
            sd / math.sqrt(n),
            diff.mean - half,
            diff.mean + half,
            diff.family,
        )
        if verdict(trial, kind, margin) != "undecided":
            return n
    return None
