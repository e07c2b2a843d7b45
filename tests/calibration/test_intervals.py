"""Bootstrap intervals: BCa against scipy's, the basic interval by hand, and the rule the
binned calibration errors follow where nearly all resamples exceed the estimate."""

import numpy as np
import pytest
from scipy.stats import bootstrap

from app.calibration.bootstrap import resampled_metrics
from app.calibration.intervals import (
    basic_interval,
    bca_interval,
    bias_corrected_interval,
    percentile_interval,
)
from app.calibration.reporting import calibration_report, paired_differences


def calibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from the predictions themselves: the population's binned ECE is 0."""
    rng = np.random.default_rng(seed)
    p = rng.beta(2.0, 2.0, n)
    return (rng.random(n) < p).astype(np.int64), p


def equal_width_ece(labels: np.ndarray, confidences: np.ndarray, axis: int = -1) -> np.ndarray:
    """15-bin equal-width ECE along `axis`, for scipy's vectorised statistic (no p on a bin edge)."""
    ids = np.minimum((confidences * 15).astype(int), 14)
    gaps = [np.abs(np.sum((confidences - labels) * (ids == b), axis=axis)) for b in range(15)]
    return np.sum(gaps, axis=0) / labels.shape[axis]


def overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.beta(2.0, 2.0, n)
    y = (rng.random(n) < truth).astype(np.int64)
    return y, 1.0 / (1.0 + np.exp(-1.8 * np.log(truth / (1.0 - truth)) - 0.3))


# --- A well-calibrated probe on 200 items ------------------------------------------------


def test_ece_interval_holds_its_estimate_where_the_percentile_interval_lies_above_it() -> None:
    # ECE 0.045, and not one of the 1000 resamples below it: the percentile interval is [0.063, 0.141].
    y, p = calibrated(200, seed=9)
    report = calibration_report(y, p, resamples=1000, seed=0)
    estimate = report.metrics["ece"]
    assert estimate.value is not None and estimate.interval is not None
    rows = resampled_metrics(y, p, np.random.default_rng(0).integers(0, 200, size=(1000, 200)))["ece"]
    percentile = percentile_interval(rows, 0.95)
    assert percentile is not None and percentile[0] > estimate.value  # the interval readers used to get
    low, high = estimate.interval
    assert estimate.interval_method == "basic"
    assert 0.0 <= low < estimate.value <= high
    # The basic interval moves down by the resamples' bias: its lower end falls well below the estimate.
    assert low < estimate.value - (percentile[0] - estimate.value)


def test_every_binned_error_and_debiased_ece_hold_their_estimate_for_a_well_calibrated_probe() -> None:
    report = calibration_report(*calibrated(200, seed=2), resamples=500, seed=1)
    for name in ("ece", "ece_equal_mass", "ece_l2", "ece_equal_mass_l2", "ece_max_probability", "mce", "ace"):
        estimate = report.metrics[name]
        assert estimate.value is not None and estimate.interval is not None, name
        assert estimate.interval[0] <= estimate.value <= estimate.interval[1], name
        assert estimate.interval_method in ("bca", "basic"), name
    debiased = report.metrics["debiased_ece"]
    assert debiased.value is not None and debiased.interval is not None
    assert debiased.interval_method == "percentile" and debiased.interval[0] <= debiased.value <= debiased.interval[1]


# --- BCa ------------------------------------------------------------------------------------


def test_bca_of_a_clearly_miscalibrated_ece_agrees_with_scipy_bootstrap() -> None:
    # Overconfident on 3000 items: the bias is small against the spread, so BCa is resolved
    # here and in scipy. Different resamples, so the two agree to Monte-Carlo error: the
    # difference of two endpoints has a standard error of about 3% of the width at 1000
    # resamples each.
    y, p = overconfident(3000, seed=3)
    report = calibration_report(y, p, resamples=1000, seed=4)
    estimate = report.metrics["ece"]
    assert estimate.interval_method == "bca" and estimate.interval is not None
    assert equal_width_ece(y, p) == pytest.approx(estimate.value, abs=1e-12)
    scipy_interval = bootstrap(
        (y, p),
        equal_width_ece,
        paired=True,
        vectorized=True,
        n_resamples=1000,
        batch=200,
        method="BCa",
        confidence_level=0.95,
        rng=np.random.default_rng(5),
    ).confidence_interval
    width = scipy_interval.high - scipy_interval.low
    assert estimate.interval[0] == pytest.approx(scipy_interval.low, abs=0.12 * width)
    assert estimate.interval[1] == pytest.approx(scipy_interval.high, abs=0.12 * width)


def test_bca_of_a_skewed_mean_equals_scipys_on_the_same_resamples() -> None:
    # scipy draws its resamples as `rng.integers(0, n, (resamples, n))`, so with the same
    # generator both see the same resamples: only the BCa arithmetic can differ.
    sample = np.random.default_rng(6).exponential(1.0, 60)
    resamples = np.random.default_rng(7).integers(0, 60, size=(3000, 60))
    leave_one_out = (sample.sum() - sample) / 59
    ours = bca_interval(sample[resamples].mean(axis=1), float(sample.mean()), leave_one_out, 0.9)
    theirs = bootstrap(
        (sample,), np.mean, n_resamples=3000, method="BCa", confidence_level=0.9, rng=np.random.default_rng(7)
    ).confidence_interval
    assert ours is not None
    assert ours == pytest.approx((theirs.low, theirs.high), abs=0.03)


def test_bca_without_bias_or_acceleration_is_the_percentile_interval() -> None:
    rows = np.linspace(-1.0, 1.0, 2001)  # half below the estimate 0, symmetric
    assert bca_interval(rows, 0.0, np.ones(50), 0.9) == pytest.approx(percentile_interval(rows, 0.9))


def test_bca_moves_both_endpoints_down_when_most_resamples_exceed_the_estimate() -> None:
    rows = np.random.default_rng(8).normal(0.0, 1.0, 4000)
    # 30% of the resamples below the estimate: z0 = Φ⁻¹(0.3) = −0.5244, a = 0, so the
    # levels are Φ(2·z0 ∓ 1.96) = 0.001312 and 0.8189, both below Φ(∓1.96) = 0.025 and 0.975.
    estimate = float(np.quantile(rows, 0.3))
    interval = bca_interval(rows, estimate, np.ones(50), 0.95)
    assert interval == pytest.approx(tuple(np.quantile(rows, [0.0013116, 0.8188952])), abs=0.005)


def test_bca_is_unresolved_when_no_resample_lies_below_the_estimate() -> None:
    assert bca_interval(np.linspace(0.1, 0.2, 1000), 0.05, np.linspace(0.0, 0.1, 30), 0.95) is None


def test_bca_is_unresolved_when_its_lower_level_needs_a_quantile_below_the_smallest_resample() -> None:
    rows = np.random.default_rng(9).normal(0.0, 1.0, 1000)
    # 10% below: z0 ≈ −1.28, the lower level Φ(−2.56 − 1.96) ≈ 3e-6 < 1/1000.
    assert bca_interval(rows, float(np.quantile(rows, 0.1)), np.ones(50), 0.95) is None


# --- The rule for biased resamples -----------------------------------------------------------


def test_basic_interval_reflects_the_percentiles_about_the_estimate() -> None:
    rows = np.arange(1.0, 102.0)  # percentiles 2.5 and 97.5: 3.5 and 98.5
    assert basic_interval(rows, 40.0, 0.95) == pytest.approx((80.0 - 98.5, 80.0 - 3.5))


def test_when_every_resample_exceeds_the_estimate_the_interval_runs_from_the_floor_to_the_estimate() -> None:
    # Resamples 0.08 … 0.16 above an estimate of 0.06: basic gives [2·0.06 − 0.158, 2·0.06 − 0.082],
    # below 0 at one end and below the estimate at the other; clipped and widened: [0, 0.06].
    rows = np.linspace(0.08, 0.16, 1001)
    interval, method = bias_corrected_interval(rows, 0.06, np.linspace(0.05, 0.07, 200), 0.95, (0.0, 1.0))
    assert method == "basic"
    assert interval == (0.0, 0.06)


def test_a_bias_corrected_interval_keeps_a_resolved_bca_and_its_method() -> None:
    rows = np.linspace(-1.0, 1.0, 2001)
    interval, method = bias_corrected_interval(rows, 0.0, np.ones(50), 0.9, (-2.0, 2.0))
    assert method == "bca" and interval == pytest.approx(percentile_interval(rows, 0.9))


def test_without_leave_one_out_values_the_bias_corrected_interval_is_basic() -> None:
    rows = np.linspace(-1.0, 1.0, 2001)
    interval, method = bias_corrected_interval(rows, 0.1, None, 0.9, (-2.0, 2.0))
    assert method == "basic" and interval == pytest.approx((0.2 - 0.9, 0.2 + 0.9))


def test_a_bias_corrected_interval_needs_an_estimate_and_a_finite_resample() -> None:
    assert bias_corrected_interval(np.array([np.nan, np.nan]), 0.1, None, 0.95, (0.0, 1.0)) == (None, None)
    assert bias_corrected_interval(np.array([0.1, 0.2]), None, None, 0.95, (0.0, 1.0)) == (None, None)


def test_paired_differences_of_binned_errors_hold_their_point_difference() -> None:
    # A well-calibrated probe against an overconfident one on the same 300 items: their
    # ECEs are biased by different amounts, so the difference's resamples are biased too.
    y, p = calibrated(300, seed=10)
    sharper = 1.0 / (1.0 + np.exp(-1.8 * np.log(p / (1.0 - p))))
    differences = paired_differences(y, p, sharper, resamples=500, seed=11)
    for name in ("ece", "ece_equal_mass", "ece_l2", "ece_equal_mass_l2", "ece_max_probability", "mce", "ace"):
        difference = differences.metrics[name]
        assert difference.value is not None and difference.interval is not None, name
        assert difference.interval[0] <= difference.value <= difference.interval[1], name
        assert difference.interval_method in ("bca", "basic"), name
