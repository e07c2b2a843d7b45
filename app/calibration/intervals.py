"""Bootstrap intervals from a metric's resampled values: the percentile interval, BCa and the
basic interval, and `bias_corrected_interval`, the rule the binned calibration errors use.

Why the binned errors need their own rule: a resample duplicates items, which makes every
bin's gap |conf_b − acc_b| noisier, and the absolute value turns that noise into a larger
error, so the resampled errors run above the estimate — for a well-calibrated probe on a
couple of hundred items, nearly all of them. Their percentile interval then sits above the
estimate ("ECE 0.061 [0.062, 0.138]"). The plug-in estimate is itself biased upward in the
same way, so the shift measures that bias, and a bias-corrected interval moves down by it.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

from app.calibration.values import Interval, IntervalMethod

_NORMAL = NormalDist()


def percentile_interval(rows: np.ndarray | None, level: float) -> Interval | None:
    """The central `level` of the resampled values (Efron & Tibshirani 1993, ch. 13), NaN
    rows left out; None when no row is finite."""
    if rows is None or not np.isfinite(rows).any():
        return None
    lower, upper = np.nanpercentile(rows, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
    return float(lower), float(upper)


def basic_interval(rows: np.ndarray, estimate: float, level: float) -> Interval | None:
    """The percentile interval reflected about the estimate, [2θ̂ − q_upper, 2θ̂ − q_lower]
    (Davison & Hinkley 1997, "Bootstrap methods and their application", §5.2): it takes
    the resamples' spread around θ̂ for the estimate's spread around the truth, so a bias
    the resamples show is subtracted. None when no row is finite."""
    percentiles = percentile_interval(rows, level)
    if percentiles is None:
        return None
    lower, upper = percentiles
    return 2.0 * estimate - upper, 2.0 * estimate - lower


def bca_interval(rows: np.ndarray, estimate: float, leave_one_out: np.ndarray, level: float) -> Interval | None:
    """Bias-corrected and accelerated percentile interval (Efron 1987, "Better bootstrap
    confidence intervals"; Efron & Tibshirani 1993, §14.3): the resampled values'
    quantiles at α₁,₂ = Φ(z₀ + (z₀ + z)/(1 − a·(z₀ + z))) for z = Φ⁻¹((1 ∓ level)/2), with
    z₀ = Φ⁻¹(share of resamples below θ̂, ties counted half, as `scipy.stats.bootstrap`
    counts them) and the acceleration a = Σ dᵢ³ / (6·(Σ dᵢ²)^{3/2}), dᵢ = mean(θ₍ᵢ₎) − θ₍ᵢ₎,
    from the leave-one-out values θ₍ᵢ₎ (a = 0 when they do not vary).

    None where BCa is undefined or the resamples cannot resolve it: when no resample lies
    on one side of θ̂ (z₀ = ±∞), when 1 − a·(z₀ + z) ≤ 0, or when α₁ < 1/B or α₂ > 1 − 1/B
    for the B finite resamples, that is when the endpoint would be a quantile beyond the
    smallest or largest resample, which B resamples do not estimate."""
    finite = rows[np.isfinite(rows)]
    if len(finite) == 0 or not np.isfinite(leave_one_out).all():
        return None
    below = (np.count_nonzero(finite < estimate) + np.count_nonzero(finite <= estimate)) / (2.0 * len(finite))
    if not 0.0 < below < 1.0:
        return None
    bias = _NORMAL.inv_cdf(below)
    acceleration = _acceleration(leave_one_out)
    levels = []
    for tail in (0.5 * (1.0 - level), 0.5 * (1.0 + level)):
        shifted = bias + _NORMAL.inv_cdf(tail)
        stretch = 1.0 - acceleration * shifted
        if stretch <= 0.0:
            return None
        levels.append(_NORMAL.cdf(bias + shifted / stretch))
    smallest = 1.0 / len(finite)
    if levels[0] < smallest or levels[1] > 1.0 - smallest:
        return None
    lower, upper = np.percentile(finite, [100.0 * levels[0], 100.0 * levels[1]])
    return float(lower), float(upper)


def _acceleration(leave_one_out: np.ndarray) -> float:
    deviations = leave_one_out.mean() - leave_one_out
    spread = float(np.sum(deviations**2))
    if spread <= 0.0:
        return 0.0
    return float(np.sum(deviations**3)) / (6.0 * spread**1.5)


def bias_corrected_interval(
    rows: np.ndarray,
    estimate: float | None,
    leave_one_out: np.ndarray | None,
    level: float,
    bounds: Interval,
) -> tuple[Interval | None, IntervalMethod | None]:
    """BCa where the resamples resolve it (and `leave_one_out` is given), else the basic
    interval; then clipped to the metric's `bounds` and widened, where needed, to hold the
    estimate.

    Why the basic interval where BCa fails: BCa fails when the bias is large against the
    spread — when nearly all resamples exceed θ̂, z₀ → −∞ and both BCa endpoints fall to
    the smallest resample, an interval as far above θ̂ as the percentile one. BCa is exact
    when some monotone transform of θ̂ is normal with a bias z₀ (a = 0: in units of its
    spread); in that model its endpoints are θ̂ − bias ∓ z·spread, which is what the basic
    interval gives, and the basic interval needs no quantile beyond the resamples'.

    Why the interval is widened to hold θ̂: when fewer than (1 − level)/2 of the resamples
    lie below θ̂, the basic interval lies wholly below it. That claims the bias is known
    to within the interval, but near a gap of 0 — where the bias is largest — the bootstrap
    is not consistent for an absolute value (Andrews 2000, "Inconsistency of the bootstrap
    when a parameter is on the boundary of the parameter space"), so the bias estimate is
    the least trustworthy exactly then. Widening only ever raises the coverage, and a
    reader can check the value against its interval. A calibration error then reads, say,
    "0.061 [0.000, 0.061]": no evidence of miscalibration beyond the noise of n items.

    Returns the interval and its method, or (None, None) without a finite resample or an
    estimate."""
    if estimate is None or not np.isfinite(estimate) or not np.isfinite(rows).any():
        return None, None
    interval = None if leave_one_out is None else bca_interval(rows, estimate, leave_one_out, level)
    method: IntervalMethod = "bca"
    if interval is None:
        interval, method = basic_interval(rows, estimate, level), "basic"
    assert interval is not None
    low, high = bounds
    lower, upper = (min(max(bound, low), high) for bound in interval)
    return holding(estimate, (lower, upper)), method


def holding(estimate: float | None, interval: Interval | None) -> Interval | None:
    """`interval` widened, where needed, to hold `estimate` (a finite one)."""
    if interval is None or estimate is None or not np.isfinite(estimate):
        return interval
    lower, upper = interval
    return min(lower, estimate), max(upper, estimate)
