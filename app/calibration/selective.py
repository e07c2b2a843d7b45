"""Selective prediction: keep the most confident items, abstain on the rest. The risk–coverage
curve, its area AURC (Geifman & El-Yaniv 2017) and the prediction–rejection ratio PRR
(Malinin et al. 2017), as LM-Polygraph reports them (Fadeeva et al. 2023).

Items tied in p are taken in every order equally likely, so nothing depends on the order the
items came in. By linearity the expected number of errors among the first j of a tie group
of c items with e errors is j·e/c, so each quantity has a closed form per tie group; each is
a function of `scoring.tie_prefixes`, which the bootstrap computes for every resample at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from app.calibration.inputs import checked
from app.calibration.scoring import tie_prefixes
from app.calibration.values import (
    RISK_COVERAGE_POINTS,
    AreaUnderRiskCoverage,
    PredictionRejectionRatio,
    RiskCoverageCurve,
    finite_or_none,
)


def aurc(y: npt.ArrayLike, p: npt.ArrayLike) -> AreaUnderRiskCoverage:
    return AreaUnderRiskCoverage(float(aurc_of_tie_prefixes(*tie_prefixes(*checked(y, p)))))


def prr(y: npt.ArrayLike, p: npt.ArrayLike) -> PredictionRejectionRatio:
    return PredictionRejectionRatio(finite_or_none(prr_of_tie_prefixes(*tie_prefixes(*checked(y, p)))))


def risk_coverage_curve(y: npt.ArrayLike, p: npt.ArrayLike, points: int = RISK_COVERAGE_POINTS) -> RiskCoverageCurve:
    """The expected risk of keeping the k most confident items, at the coverages
    `RiskCoverageCurve` names: every k for n ≤ `points`, else k = 1 and, for each of
    1/(points − 1), …, 1, the smallest k with k/n at least that."""
    positive_prefix, count_prefix = tie_prefixes(*checked(y, p))
    n = int(count_prefix[-1])
    if n <= points:
        kept = np.arange(1, n + 1)
    else:
        steps = points - 1
        kept = np.unique(np.concatenate([[1], (n * np.arange(1, steps + 1) + steps - 1) // steps]))
    groups = _Groups.of(positive_prefix[::-1], count_prefix[::-1])
    # The group that holds position k: the first whose items, with those kept before it, reach k.
    group = np.searchsorted(groups.kept_before + groups.count, kept, side="left")
    within = kept - groups.kept_before[group]
    errors = groups.errors_before[group] + within * groups.errors[group] / groups.count[group]
    return RiskCoverageCurve(tuple((kept / n).tolist()), tuple((errors / kept).tolist()))


@lru_cache(maxsize=4)
def harmonic_numbers(largest: int) -> np.ndarray:
    """H_0 = 0, H_1, …, H_largest, where H_m = 1 + 1/2 + … + 1/m; read-only and kept,
    since every block of resamples of n items asks for the same ones."""
    numbers = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, largest + 1))])
    numbers.flags.writeable = False
    return numbers


def aurc_of_tie_prefixes(positive_prefix: np.ndarray, count_prefix: np.ndarray) -> np.ndarray:
    """AURC along the last axis from `tie_prefixes`-shaped arrays (counts may be the
    weights of a resample, a distinct p drawn no time adding nothing). A tie group of c
    items with e errors, after N kept items with E errors, adds Σ_{j=1..c} (E + j·e/c)/(N + j)
    = e + (E − N·e/c)·(H_{N+c} − H_N)."""
    # Keeping the most confident first walks the distinct p from the largest down.
    groups = _Groups.of(positive_prefix[..., ::-1], count_prefix[..., ::-1])
    total = count_prefix[..., -1]
    harmonic = harmonic_numbers(int(np.max(total)))
    with np.errstate(invalid="ignore", divide="ignore"):
        error_rate = np.where(groups.count > 0, groups.errors / groups.count, 0.0)
    gained = (
        harmonic[(groups.kept_before + groups.count).astype(np.intp)] - harmonic[groups.kept_before.astype(np.intp)]
    )
    areas = groups.errors + (groups.errors_before - groups.kept_before * error_rate) * gained
    return np.sum(areas, axis=-1) / total


def prr_of_tie_prefixes(positive_prefix: np.ndarray, count_prefix: np.ndarray) -> np.ndarray:
    """(AURC_random − AURC)/(AURC_random − AURC_oracle) along the last axis. With n₁ correct
    and n₀ wrong items, n·AURC_random = n₀ and n·AURC_oracle = n₀ − n₁·(H_n − H_{n₁}) (the
    correct items as one group, then the wrong ones), so the ratio is
    (n₀ − n·AURC)/(n₁·(H_n − H_{n₁})). NaN without both classes."""
    total, correct = count_prefix[..., -1], positive_prefix[..., -1]
    harmonic = harmonic_numbers(int(np.max(total)))
    oracle_gain = correct * (harmonic[total.astype(np.intp)] - harmonic[correct.astype(np.intp)])
    random_area = total - correct
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = (random_area - total * aurc_of_tie_prefixes(positive_prefix, count_prefix)) / oracle_gain
    return np.where((correct > 0) & (random_area > 0), ratio, np.nan)


@dataclass(frozen=True)
class _Groups:
    """Tie groups in the order they are kept, along the last axis: each group's items and
    errors (y = 0), and the items and errors kept before it."""

    count: np.ndarray
    errors: np.ndarray
    kept_before: np.ndarray
    errors_before: np.ndarray

    @classmethod
    def of(cls, positives_after: np.ndarray, items_after: np.ndarray) -> _Groups:
        """From `tie_prefixes` reversed along the last axis: `items_after[..., g]` and
        `positives_after[..., g]` count the items, and the correct ones, in the g-th group
        kept and after it, from the totals down to 0."""
        total = items_after[..., :1]
        correct = positives_after[..., :1]
        kept_before = total - items_after[..., :-1]
        errors_before = kept_before - (correct - positives_after[..., :-1])
        count = -np.diff(items_after, axis=-1)
        errors = count + np.diff(positives_after, axis=-1)
        return cls(count, errors, kept_before, errors_before)
