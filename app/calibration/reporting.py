"""Reports: `calibration_report` computes every metric of the table for one probe with
bootstrap intervals, `paired_differences` compares two probes on the same items, each
difference with a paired bootstrap interval, and `baseline_comparison` reports the
model's own confidences beside a probe, with the probe's difference from each and a
verdict (docs/concepts.md#baselines). `interval_of` picks each interval's method: the
table's (percentile, or bias-corrected for the binned calibration errors)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from app.calibration.binned import confidence_histogram, reliability_bins
from app.calibration.bootstrap import (
    bootstrap_settings,
    leave_one_out_values,
    resampled_values,
)
from app.calibration.inputs import checked, checked_labels
from app.calibration.intervals import bias_corrected_interval, holding, percentile_interval
from app.calibration.scoring import base_rate
from app.calibration.selective import risk_coverage_curve
from app.calibration.table import METRICS, point_metrics
from app.calibration.values import (
    BootstrapSettings,
    CalibrationReport,
    Estimate,
    Interval,
    IntervalMethod,
    Metric,
    PairedDifferences,
)

# Metrics where a larger value is better; for every other metric (the losses and the
# calibration errors) a smaller one is.
HIGHER_IS_BETTER = frozenset({"accuracy", "auroc", "auprc", "prr"})
Direction = Literal["higher", "lower"]
Verdict = Literal["probe better", "baseline better", "no clear difference"]


@dataclass(frozen=True)
class _Scored:
    """One prediction vector's point metrics and its metrics on every bootstrap resample."""

    probabilities: np.ndarray
    values: dict[str, Metric]
    resampled: dict[str, np.ndarray]
    left_out: dict[str, np.ndarray]  # leave-one-out values behind the BCa intervals (none without resamples)


def _scored(labels: np.ndarray, predictions: list[np.ndarray], bins: int, settings: BootstrapSettings) -> list[_Scored]:
    """Each prediction vector scored on the same items and the same resamples."""
    if not predictions:
        return []
    resampled = resampled_values(labels, predictions, bins, settings)
    return [
        _Scored(
            probabilities,
            point_metrics(labels, probabilities, bins),
            rows,
            leave_one_out_values(labels, probabilities, bins) if settings.resamples else {},
        )
        for probabilities, rows in zip(predictions, resampled, strict=True)
    ]


def calibration_report(
    y: npt.ArrayLike, p: npt.ArrayLike, *, bins: int = 15, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> CalibrationReport:
    """All report metrics (docs/concepts.md#reports) with bootstrap intervals; `resamples=0` skips them."""
    labels, probabilities = checked(y, p)
    settings = bootstrap_settings(resamples, seed, level)
    return _report(labels, _scored(labels, [probabilities], bins, settings)[0], bins, settings)


def _report(labels: np.ndarray, scored: _Scored, bins: int, settings: BootstrapSettings) -> CalibrationReport:
    probabilities = scored.probabilities
    return CalibrationReport(
        n=len(labels),
        base_rate=base_rate(labels).value,
        metrics={
            name: _estimate(
                metric.value,
                metric,
                *interval_of(name, scored.resampled.get(name), metric.value, scored.left_out.get(name), settings.level),
            )
            for name, metric in scored.values.items()
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
    scored_a, scored_b = _scored(labels, [first, second], bins, settings)
    return PairedDifferences(len(labels), _differences(scored_a, scored_b, level), settings)


def _differences(a: _Scored, b: _Scored, level: float) -> dict[str, Estimate]:
    """Each metric of b minus that of a, the interval from the same resamples' differences."""
    differences = {}
    for name, metric in b.values.items():
        value_a, value_b = a.values[name].value, metric.value
        difference = None if value_a is None or value_b is None else value_b - value_a
        rows = b.resampled[name] - a.resampled[name] if name in b.resampled else None
        left_out = b.left_out[name] - a.left_out[name] if name in b.left_out else None
        differences[name] = _estimate(
            difference, metric, *interval_of(name, rows, difference, left_out, level, difference=True)
        )
    return differences


def _estimate(
    value: float | None, metric: Metric, interval: Interval | None, method: IntervalMethod | None
) -> Estimate:
    """An estimate of `metric` (or, with its own value, of a difference of it)."""
    return Estimate(value, interval, metric.label, getattr(metric, "estimator", None), method)


# --- Baselines ---------------------------------------------------------------------------


def better_direction(metric: str) -> Direction:
    """Which way a metric improves: `higher` for those in `HIGHER_IS_BETTER`, else `lower`."""
    return "higher" if metric in HIGHER_IS_BETTER else "lower"


def verdict(metric: str, difference: Estimate) -> Verdict:
    """Whether the probe beats the baseline on `metric`, from the paired interval of probe −
    baseline: `probe better` when the interval excludes 0 on the metric's good side (above
    0 where higher is better, below 0 where lower is), `baseline better` when it excludes 0
    on the other side, and `no clear difference` when it holds 0 or there is none (smooth
    ECE, or an undefined difference)."""
    if difference.value is None or difference.interval is None:
        return "no clear difference"
    sign = 1.0 if better_direction(metric) == "higher" else -1.0
    lower, upper = sorted(sign * bound for bound in difference.interval)
    if lower > 0:
        return "probe better"
    if upper < 0:
        return "baseline better"
    return "no clear difference"


@dataclass(frozen=True)
class Baselines:
    """Baseline confidences on one set of items, scored once so that any number of probes
    on those items can be compared with them (docs/concepts.md#baselines)."""

    labels: np.ndarray
    scored: dict[str, _Scored]
    bins: int
    settings: BootstrapSettings

    @classmethod
    def of(
        cls,
        y: npt.ArrayLike,
        confidences: Mapping[str, npt.ArrayLike],
        *,
        bins: int = 15,
        resamples: int = 1000,
        seed: int = 0,
        level: float = 0.95,
    ) -> Baselines:
        labels = checked_labels(y)
        settings = bootstrap_settings(resamples, seed, level)
        predictions = [checked(labels, p)[1] for p in confidences.values()]
        return cls(
            labels, dict(zip(confidences, _scored(labels, predictions, bins, settings), strict=True)), bins, settings
        )

    def reports(self) -> dict[str, CalibrationReport]:
        """Each baseline's calibration report, as `calibration_report` makes it."""
        return {name: _report(self.labels, scored, self.bins, self.settings) for name, scored in self.scored.items()}

    def versus(self, p: npt.ArrayLike) -> dict[str, dict[str, dict[str, Any]]]:
        """For each baseline, each metric of the probe `p` minus the baseline's with its
        paired bootstrap interval — what `paired_differences(y, baseline, p)` gives — and
        which way the metric improves (`better`) and the `verdict`."""
        if not self.scored:
            return {}
        probe = _scored(self.labels, [checked(self.labels, p)[1]], self.bins, self.settings)[0]
        return {
            name: {
                metric: difference.to_dict()
                | {"better": better_direction(metric), "verdict": verdict(metric, difference)}
                for metric, difference in _differences(baseline, probe, self.settings.level).items()
            }
            for name, baseline in self.scored.items()
        }


def baseline_comparison(
    y: npt.ArrayLike,
    p: npt.ArrayLike,
    baselines: Mapping[str, npt.ArrayLike],
    *,
    bins: int = 15,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """A probe's predictions `p` beside the baseline confidences on the same items:
    `{"baselines": {name: calibration report}, "versus_baselines": {name: {metric: {"value",
    "interval", "label", "estimator"?, "better", "verdict"}}}}`, the intervals percentile
    bootstrap ones on the resamples `calibration_report` draws with the same `seed`."""
    scored = Baselines.of(y, baselines, bins=bins, resamples=resamples, seed=seed, level=level)
    return {
        "baselines": {name: report.to_dict() for name, report in scored.reports().items()},
        "versus_baselines": scored.versus(p),
    }


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
