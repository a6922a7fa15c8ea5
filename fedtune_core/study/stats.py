"""Paired interval estimates over seeds: the rule every verdict uses.

Two sides of a comparison share their seeds (the same seed gives the same partition,
client sampling and data order), so they are compared per seed: the differences
``a - b``, their mean and a 95% Student-t interval over the seeds. The claim "a is above
b" is *supported* when the interval lies above zero, *not supported* when it lies below,
and *inconclusive* when it contains zero (or fewer than two seeds exist). The interval's
half-width is the smallest difference these seeds could have resolved: an observed mean
difference smaller than it cannot exclude zero.

Why t and not a bootstrap: with three to five seeds a bootstrap has only a handful of
distinct resamples and its percentile interval is far too narrow; the t interval is exact
for normal differences and widens honestly with few seeds (rliable, Agarwal et al. 2021,
recommends interval estimates over point estimates; Bouthillier et al. 2021 show that
seeds, data order and splits are real sources of variance, which pairing by seed removes
from the comparison). See docs/protocol.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
from scipy import stats as sp

LEVEL = 0.95
SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"


@dataclass(frozen=True)
class Paired:
    """The paired comparison of two sides over their common seeds."""

    mean: float  # mean of the per-seed differences a - b
    low: float  # the 95% interval of that mean (NaN with fewer than two seeds)
    high: float
    seeds: int  # seeds both sides ran

    @property
    def half_width(self) -> float:
        """The smallest difference these seeds could resolve (NaN below two seeds)."""
        return (self.high - self.low) / 2

    @property
    def verdict(self) -> str:
        """Supported above zero, not supported below, inconclusive across it."""
        if self.seeds < 2 or math.isnan(self.low):
            return INCONCLUSIVE
        if self.low > 0:
            return SUPPORTED
        return NOT_SUPPORTED if self.high < 0 else INCONCLUSIVE

    def text(self, digits: int = 3) -> str:
        """``+0.012 [-0.010, +0.034], 3 seeds, resolves ±0.022``."""
        if self.seeds < 2:
            return f"{self.mean:+.{digits}f}, {self.seeds} seed: no interval"
        return (f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}], "
                f"{self.seeds} seeds, resolves ±{self.half_width:.{digits}f}")


def paired(a: pd.Series, b: pd.Series) -> Paired:
    """Paired differences ``a - b`` over the seeds (index) both series hold."""
    both = pd.concat({"a": a, "b": b}, axis=1, join="inner").dropna()
    diff = both["a"] - both["b"]
    n, mean = len(diff), float(diff.mean()) if len(diff) else math.nan
    if n < 2:
        return Paired(mean, math.nan, math.nan, n)
    half = float(sp.t.ppf(0.5 + LEVEL / 2, n - 1) * diff.std(ddof=1) / math.sqrt(n))
    return Paired(mean, mean - half, mean + half, n)
