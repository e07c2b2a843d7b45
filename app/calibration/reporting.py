"""Reports: `calibration_report` computes every metric of the table for one probe with
percentile bootstrap intervals, and `paired_differences` compares two probes on the same
items, each difference with a paired percentile bootstrap interval."""

from __future__ import annotations

from typing import Any

import numpy.typing as npt

from app.calibration.binned import confidence_histogram, reliability_bins
from app.calibration.bootstrap import (
    bootstrap_settings,
    percentile_interval,
    resampled_values,
)
from app.calibration.inputs import checked
from app.calibration.scoring import base_rate
from app.calibration.table import point_metrics
from app.calibration.values import (
    CalibrationReport,
    Estimate,
    Interval,
    Metric,
    PairedDifferences,
)


def calibration_report(
    y: npt.ArrayLike, p: npt.ArrayLike, *, bins: int = 15, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> CalibrationReport:
    """All report metrics (docs/concepts.md#reports) with percentile bootstrap intervals; `resamples=0` skips them."""
    labels, probabilities = checked(y, p)
    settings = bootstrap_settings(resamples, seed, level)
    values = point_metrics(labels, probabilities, bins)
    resampled = resampled_values(labels, [probabilities], bins, settings)[0]
    return CalibrationReport(
        n=len(labels),
        base_rate=base_rate(labels).value,
        metrics={
            name: _estimate(metric, percentile_interval(resampled.get(name), level)) for name, metric in values.items()
        },
        bins={
            "equal_width": tuple(reliability_bins(labels, probabilities, bins, "equal_width")),
            "equal_mass": tuple(reliability_bins(labels, probabilities, bins, "equal_mass")),
        },
        histogram=confidence_histogram(probabilities, bins),
        bootstrap=settings,
    )


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
    differences = {}
    for name, metric in values_b.items():
        value_a, value_b = values_a[name].value, metric.value
        difference = None if value_a is None or value_b is None else value_b - value_a
        rows = resampled_b[name] - resampled_a[name] if name in resampled_b else None
        differences[name] = Estimate(
            difference, percentile_interval(rows, level), metric.label, getattr(metric, "estimator", None)
        )
    return PairedDifferences(len(labels), differences, settings)


def _estimate(metric: Metric, interval: Interval | None) -> Estimate:
    return Estimate(metric.value, interval, metric.label, getattr(metric, "estimator", None))


def paired_rate_difference(
    a: npt.ArrayLike, b: npt.ArrayLike, *, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """The mean of the 0/1 outcomes `b` minus that of `a` on the same items (how much more
    often model b answers right than model a, on the same questions), with a paired
    percentile bootstrap interval: items are resampled with replacement, both outcomes of an
    item together (Efron & Tibshirani 1993, ch. 13)."""
    import numpy as np

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
