"""The one table of reported metrics: each name with its point function, for every metric
but smooth ECE its function of a block of bootstrap resamples, and the method of its
interval. Reports list the metrics in the table's order.

Which interval: `bench/interval_coverage.py` measures how often each covers the metric's
value on 2·10⁶ items, over 50 data sets each of 200, 1,000 and 3,000 items from a
calibrated, a mildly and a strongly overconfident probe, at 95%:

- Percentile for accuracy, AUROC, AUPRC, AURC, PRR, Brier score and NLL: 46–51% of their
  resamples fall below the estimate on average, their intervals cover 86–96% of the time,
  and the basic interval covers no better (82–98%).
- BCa, falling back to basic where BCa is unresolved, for ECE and its variants and ACE:
  only 5–44% of their resamples fall below the estimate, and the percentile interval
  covers in none of the data sets of a calibrated probe (nor, but for the top-label ECE,
  of a mildly miscalibrated one up to 1,000 items). Where the bias is small against the
  spread (overconfident, 3,000 items) BCa is resolved in 74–100% of the data sets and
  covers 92–98% of the time, the basic interval 92–94%; where it is not, basic takes over.
- Basic for MCE: where BCa is resolved for a maximum over bins it covers 0–65% of the
  time, against basic's 82–96% over all data sets.
- Percentile for debiased ECE: its resamples run above it too (3–31% below), but its
  estimate is already debiased and its interval reaches 0 near it: it covers 78–98% of the
  time, the basic interval 32–88%.

Every interval is widened, where needed, to hold its estimate (`reporting.interval_of`).
Near perfect calibration no bootstrap interval covers the population's binned error as
often as its level says — the report's cover 36–86% of the time there — as the bootstrap
is not consistent at the boundary of an absolute value
(`intervals.bias_corrected_interval`); debiased and smooth ECE are the estimates to read
there.
"""

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
from app.calibration.selective import aurc, aurc_of_tie_prefixes, prr, prr_of_tie_prefixes
from app.calibration.smooth import smooth_ece
from app.calibration.values import Interval, IntervalMethod, Metric


@dataclass(frozen=True)
class BinnedSums:
    """The sums of the equal-width, equal-mass and max-probability (equal-width) bins, one
    row per resample or leave-one-out sample."""

    equal_width: BinSums
    equal_mass: BinSums
    max_probability: BinSums


@dataclass(frozen=True)
class ResampledSums:
    """What a block of bootstrap resamples reduces to, one row per resample: the number of
    correct thresholded predictions; the prefix sums of positives and of items over the
    distinct p, as `scoring.tie_prefixes` gives them for one data set; the summed squared
    error and log loss; and the bin sums."""

    n: int
    correct: np.ndarray
    tie_prefixes: tuple[np.ndarray, np.ndarray]
    squared_error: np.ndarray
    log_loss: np.ndarray
    binned: BinnedSums


PointFunction = Callable[[np.ndarray, np.ndarray, int], Metric]
ResampledFunction = Callable[[ResampledSums], np.ndarray]
BinnedFunction = Callable[[BinnedSums], np.ndarray]


@dataclass(frozen=True)
class TableEntry:
    """A metric's value on (y, p) with `bins` bins, its values on a block of resamples
    (None: the metric gets no bootstrap interval), and the method of its interval. A
    "bca" or "basic" interval is clipped to `bounds`, the values the metric can take;
    "bca" needs the metric on leave-one-out bin sums for its acceleration."""

    point: PointFunction
    resampled: ResampledFunction | None
    interval: IntervalMethod = "percentile"
    leave_one_out: BinnedFunction | None = None
    bounds: Interval = (0.0, 1.0)


def _binned(point: PointFunction, of_bins: BinnedFunction, interval: IntervalMethod = "bca") -> TableEntry:
    """A binned calibration error: the same function of bin sums for resamples and for
    the leave-one-out samples of BCa's acceleration."""
    return TableEntry(point, lambda sums: of_bins(sums.binned), interval, of_bins if interval == "bca" else None)


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
    "aurc": TableEntry(
        lambda y, p, bins: aurc(y, p),
        lambda sums: aurc_of_tie_prefixes(*sums.tie_prefixes),
    ),
    "prr": TableEntry(
        lambda y, p, bins: prr(y, p),
        lambda sums: prr_of_tie_prefixes(*sums.tie_prefixes),
    ),
    "brier": TableEntry(
        lambda y, p, bins: brier(y, p),
        lambda sums: sums.squared_error / sums.n,
    ),
    "nll": TableEntry(
        lambda y, p, bins: nll(y, p),
        lambda sums: sums.log_loss / sums.n,
    ),
    "ece": _binned(
        lambda y, p, bins: ece(y, p, bins),
        lambda sums: count_weighted_gap(sums.equal_width, "l1"),
    ),
    "ece_equal_mass": _binned(
        lambda y, p, bins: ece(y, p, bins, "equal_mass"),
        lambda sums: count_weighted_gap(sums.equal_mass, "l1"),
    ),
    "ece_l2": _binned(
        lambda y, p, bins: ece(y, p, bins, norm="l2"),
        lambda sums: count_weighted_gap(sums.equal_width, "l2"),
    ),
    "ece_equal_mass_l2": _binned(
        lambda y, p, bins: ece(y, p, bins, "equal_mass", "l2"),
        lambda sums: count_weighted_gap(sums.equal_mass, "l2"),
    ),
    "ece_max_probability": _binned(
        lambda y, p, bins: ece(y, p, bins, form="max_probability"),
        lambda sums: count_weighted_gap(sums.max_probability, "l1"),
    ),
    # A maximum over bins suits BCa badly: where it is resolved it covers the truth far less
    # often than the basic interval does (the module's docstring).
    "mce": _binned(
        lambda y, p, bins: mce(y, p, bins),
        lambda sums: largest_gap(sums.equal_width),
        "basic",
    ),
    "ace": _binned(
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
        lambda sums: debiased_l2_gap(sums.binned.equal_mass),
    ),
}

BOOTSTRAPPED = tuple(name for name, entry in METRICS.items() if entry.resampled is not None)
BIAS_CORRECTED = tuple(name for name, entry in METRICS.items() if entry.interval != "percentile")


def point_metrics(labels: np.ndarray, probabilities: np.ndarray, bins: int) -> dict[str, Metric]:
    """Every metric of the table on one data set."""
    return {name: entry.point(labels, probabilities, bins) for name, entry in METRICS.items()}


def resampled_values_of(sums: ResampledSums) -> dict[str, np.ndarray]:
    """Every bootstrapped metric of the table on each resample of a block."""
    return {name: entry.resampled(sums) for name, entry in METRICS.items() if entry.resampled is not None}


def leave_one_out_values_of(sums: BinnedSums) -> dict[str, np.ndarray]:
    """Every metric of the table with a BCa interval on each leave-one-out sample of a block."""
    return {name: entry.leave_one_out(sums) for name, entry in METRICS.items() if entry.leave_one_out is not None}
