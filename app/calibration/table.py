"""The one table of reported metrics: each name with its point function and, for every
metric but smooth ECE, its function of a block of bootstrap resamples. Reports list the
metrics in the table's order."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from app.calibration.binned import (
    BinSums,
    ace,
    bin_averaged_gap,
    count_weighted_gap,
    debiased_ece,
    debiased_l2_gap,
    ece,
    largest_gap,
    mce,
)
from app.calibration.scoring import (
    accuracy,
    auprc,
    auroc,
    auroc_of_tie_prefixes,
    average_precision_of_tie_prefixes,
    brier,
    nll,
)
from app.calibration.smooth import smooth_ece
from app.calibration.values import Metric


@dataclass(frozen=True)
class ResampledSums:
    """What a block of bootstrap resamples reduces to, one row per resample: the number of
    correct thresholded predictions; the prefix sums of positives and of items over the
    distinct p, as `scoring.tie_prefixes` gives them for one data set; the summed squared
    error and log loss; and the sums of the equal-width, equal-mass and max-probability
    (equal-width) bins."""

    n: int
    correct: np.ndarray
    tie_prefixes: tuple[np.ndarray, np.ndarray]
    squared_error: np.ndarray
    log_loss: np.ndarray
    equal_width: BinSums
    equal_mass: BinSums
    max_probability: BinSums


PointFunction = Callable[[np.ndarray, np.ndarray, int], Metric]
ResampledFunction = Callable[[ResampledSums], np.ndarray]


@dataclass(frozen=True)
class TableEntry:
    """A metric's value on (y, p) with `bins` bins, and its values on a block of resamples
    (None: the metric gets no bootstrap interval)."""

    point: PointFunction
    resampled: ResampledFunction | None


METRICS: Mapping[str, TableEntry] = {
    "accuracy": TableEntry(
        lambda y, p, bins: accuracy(y, p),
        lambda sums: sums.correct / sums.n,
    ),
    "auroc": TableEntry(
        lambda y, p, bins: auroc(y, p),
        lambda sums: auroc_of_tie_prefixes(*sums.tie_prefixes),
    ),
    "auprc": TableEntry(
        lambda y, p, bins: auprc(y, p),
        lambda sums: average_precision_of_tie_prefixes(*sums.tie_prefixes),
    ),
    "brier": TableEntry(
        lambda y, p, bins: brier(y, p),
        lambda sums: sums.squared_error / sums.n,
    ),
    "nll": TableEntry(
        lambda y, p, bins: nll(y, p),
        lambda sums: sums.log_loss / sums.n,
    ),
    "ece": TableEntry(
        lambda y, p, bins: ece(y, p, bins),
        lambda sums: count_weighted_gap(sums.equal_width, "l1"),
    ),
    "ece_equal_mass": TableEntry(
        lambda y, p, bins: ece(y, p, bins, "equal_mass"),
        lambda sums: count_weighted_gap(sums.equal_mass, "l1"),
    ),
    "ece_l2": TableEntry(
        lambda y, p, bins: ece(y, p, bins, norm="l2"),
        lambda sums: count_weighted_gap(sums.equal_width, "l2"),
    ),
    "ece_equal_mass_l2": TableEntry(
        lambda y, p, bins: ece(y, p, bins, "equal_mass", "l2"),
        lambda sums: count_weighted_gap(sums.equal_mass, "l2"),
    ),
    "ece_max_probability": TableEntry(
        lambda y, p, bins: ece(y, p, bins, form="max_probability"),
        lambda sums: count_weighted_gap(sums.max_probability, "l1"),
    ),
    "mce": TableEntry(
        lambda y, p, bins: mce(y, p, bins),
        lambda sums: largest_gap(sums.equal_width),
    ),
    "ace": TableEntry(
        lambda y, p, bins: ace(y, p, bins),
        lambda sums: bin_averaged_gap(sums.equal_mass),
    ),
    # The bandwidth search per resample would cost more than every other metric together.
    "smooth_ece": TableEntry(
        lambda y, p, bins: smooth_ece(y, p),
        None,
    ),
    "debiased_ece": TableEntry(
        lambda y, p, bins: debiased_ece(y, p, bins),
        lambda sums: debiased_l2_gap(sums.equal_mass),
    ),
}

BOOTSTRAPPED = tuple(name for name, entry in METRICS.items() if entry.resampled is not None)


def point_metrics(labels: np.ndarray, probabilities: np.ndarray, bins: int) -> dict[str, Metric]:
    """Every metric of the table on one data set."""
    return {name: entry.point(labels, probabilities, bins) for name, entry in METRICS.items()}


def resampled_values_of(sums: ResampledSums) -> dict[str, np.ndarray]:
    """Every bootstrapped metric of the table on each resample of a block."""
    return {name: entry.resampled(sums) for name, entry in METRICS.items() if entry.resampled is not None}
