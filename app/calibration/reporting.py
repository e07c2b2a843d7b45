"""Reports: `calibration_report` computes every metric of the table for one probe with
bootstrap intervals, and `paired_differences` compares two probes on the same items, each
difference with a paired bootstrap interval. `interval_of` picks each interval's method:
the table's (percentile, or bias-corrected for the binned calibration errors)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from app.calibration.binned import confidence_histogram, reliability_bins
from app.calibration.bootstrap import (
    bootstrap_settings,
    leave_one_out_values,
    resampled_values,
)
from app.calibration.inputs import checked
from app.calibration.intervals import bias_corrected_interval, holding, percentile_interval
from app.calibration.scoring import base_rate
from app.calibration.selective import risk_coverage_curve
from app.calibration.table import METRICS, point_metrics
from app.calibration.values import (
    CalibrationReport,
    Estimate,
    Interval,
    IntervalMethod,
    Metric,
    PairedDifferences,
)


def calibration_report(
    y: npt.ArrayLike, p: npt.ArrayLike, *, bins: int = 15, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> CalibrationReport:
    """All report metrics (docs/concepts.md#reports) with bootstrap intervals; `resamples=0` skips them."""
    labels, probabilities = checked(y, p)
    settings = bootstrap_settings(resamples, seed, level)
    values = point_metrics(labels, probabilities, bins)
    resampled = resampled_values(labels, [probabilities], bins, settings)[0]
    left_out = leave_one_out_values(labels, probabilities, bins) if settings.resamples else {}
    return CalibrationReport(
        n=len(labels),
        base_rate=base_rate(labels).value,
        metrics={
            name: _estimate(
                metric.value, metric, *interval_of(name, resampled.get(name), metric.value, left_out.get(name), level)
            )
            for name, metric in values.items()
        },
        bins={
            "equal_width": tuple(reliability_bins(labels, probabilities, bins, "equal_width")),
            "equal_mass": tuple(reliability_bins(labels, probabilities, bins, "equal_mass")),
        },
        histogram=confidence_histogram(probabilities, bins),
        risk_coverage=risk_coverage_curve(labels, probabilities),
        bootstrap=settings,
    )


def interval_of(
    name: str,
    rows: np.ndarray | None,
    estimate: float | None,
    leave_one_out: np.ndarray | None,
    level: float,
    *,
    difference: bool = False,
) -> tuple[Interval | None, IntervalMethod | None]:
    """The interval of metric `name` (or of a difference of it) and its method: the
    percentile interval, or for the metrics the table bias-corrects
    `intervals.bias_corrected_interval` (BCa falling back to basic, or basic alone where
    the table gives no leave-one-out values), clipped to the metric's range (for a
    difference, ± its width). Either is widened, where needed, to hold the estimate, so a
    reader never finds a value outside its own interval; for the percentile metrics that
    happens rarely (debiased ECE's resamples, too, run above it near 0). A difference takes
    its metric's method: it inherits the bias of both estimates, which cancels only where
    the two are alike."""
    if rows is None:
        return None, None
    entry = METRICS[name]
    if entry.interval == "percentile":
        interval = holding(estimate, percentile_interval(rows, level))
        return interval, ("percentile" if interval is not None else None)
    low, high = entry.bounds
    bounds = (low - high, high - low) if difference else entry.bounds
    return bias_corrected_interval(rows, estimate, leave_one_out, level, bounds)


def paired_differences(
    y: npt.ArrayLike,
    p_a: npt.ArrayLike,
    p_b: npt.ArrayLike,
    *,
    bins: int = 15,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedDifferences:
    """Each metric of `p_b` minus the same metric of `p_a` on the same items and labels."""
    labels, first = checked(y, p_a)
    second = checked(labels, p_b)[1]
    settings = bootstrap_settings(resamples, seed, level)
    values_a, values_b = point_metrics(labels, first, bins), point_metrics(labels, second, bins)
    resampled_a, resampled_b = resampled_values(labels, [first, second], bins, settings)
    left_out_a, left_out_b = (
        (leave_one_out_values(labels, first, bins), leave_one_out_values(labels, second, bins))
        if settings.resamples
        else ({}, {})
    )
    differences = {}
    for name, metric in values_b.items():
        value_a, value_b = values_a[name].value, metric.value
        difference = None if value_a is None or value_b is None else value_b - value_a
        rows = resampled_b[name] - resampled_a[name] if name in resampled_b else None
        left_out = left_out_b[name] - left_out_a[name] if name in left_out_b else None
        differences[name] = _estimate(
            difference, metric, *interval_of(name, rows, difference, left_out, level, difference=True)
        )
    return PairedDifferences(len(labels), differences, settings)


def _estimate(
    value: float | None, metric: Metric, interval: Interval | None, method: IntervalMethod | None
) -> Estimate:
    """An estimate of `metric` (or, with its own value, of a difference of it)."""
    return Estimate(value, interval, metric.label, getattr(metric, "estimator", None), method)


def paired_rate_difference(
    a: npt.ArrayLike, b: npt.ArrayLike, *, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """The mean of the 0/1 outcomes `b` minus that of `a` on the same items (how much more
    often model b answers right than model a, on the same questions), with a paired
    percentile bootstrap interval: items are resampled with replacement, both outcomes of an
    item together (Efron & Tibshirani 1993, ch. 13)."""
    first, second = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if first.shape != second.shape or first.ndim != 1 or len(first) == 0:
        raise ValueError("a and b must be non-empty 1-D outcomes of the same items")
    settings = bootstrap_settings(resamples, seed, level)
    difference = second - first
    interval = None
    if settings.resamples:
        rng = np.random.default_rng(settings.seed)
        means = np.array(
            [difference[rng.integers(0, len(difference), len(difference))].mean() for _ in range(settings.resamples)]
        )
        interval = percentile_interval(means, level)
    return {
        "value": float(difference.mean()),
        "interval": list(interval) if interval else None,
        "estimator": f"paired percentile bootstrap over items ({settings.resamples} resamples, {level:.0%})",
    }
