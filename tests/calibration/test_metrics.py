"""Report metrics: each against an independent computation — scikit-learn, hand-worked cases,
the authors' packages (`relplot` for smooth ECE, Kumar et al.'s `calibration` for the
binned and debiased ECE) — the vectorised bootstrap and jackknife against slow loops, and
the report's intervals against the resamples they come from."""

import json
import math
from typing import Any, Literal

import calibration as kumar
import numpy as np
import pytest
import relplot
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    log_loss,
    roc_auc_score,
)

from app.calibration import bootstrap as metrics
from app.calibration.binned import ace, confidence_histogram, debiased_ece, ece, mce, reliability_bins
from app.calibration.bootstrap import leave_one_out_values, resampled_metrics
from app.calibration.intervals import bias_corrected_interval
from app.calibration.reporting import calibration_report, paired_differences
from app.calibration.scoring import accuracy, auprc, auroc, base_rate, brier, nll
from app.calibration.selective import aurc, prr
from app.calibration.smooth import smooth_ece

REPORTED = (
    "accuracy",
    "auroc",
    "auprc",
    "aurc",
    "prr",
    "brier",
    "nll",
    "ece",
    "ece_equal_mass",
    "ece_l2",
    "ece_equal_mass_l2",
    "ece_max_probability",
    "mce",
    "ace",
    "smooth_ece",
    "debiased_ece",
)
CALIBRATION_ERRORS = REPORTED[7:]
BOOTSTRAPPED = tuple(name for name in REPORTED if name != "smooth_ece")
# The binned errors whose resamples run above the estimate: BCa falling back to basic, or basic.
WITH_BCA = ("ece", "ece_equal_mass", "ece_l2", "ece_equal_mass_l2", "ece_max_probability", "ace")
BIAS_CORRECTED = (*WITH_BCA, "mce")
PERCENTILE = tuple(name for name in BOOTSTRAPPED if name not in BIAS_CORRECTED)
BCA_POINT_FUNCTIONS: dict[str, Any] = {
    "ece": lambda y, p, bins: ece(y, p, bins),
    "ece_equal_mass": lambda y, p, bins: ece(y, p, bins, "equal_mass"),
    "ece_l2": lambda y, p, bins: ece(y, p, bins, norm="l2"),
    "ece_equal_mass_l2": lambda y, p, bins: ece(y, p, bins, "equal_mass", "l2"),
    "ece_max_probability": lambda y, p, bins: ece(y, p, bins, form="max_probability"),
    "ace": lambda y, p, bins: ace(y, p, bins),
}


def overconfident(n: int, seed: int, decimals: int | None = 2) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from a true probability, predictions pushed away from it towards 0 and 1
    and, by default, rounded so that many are tied."""
    rng = np.random.default_rng(seed)
    truth = rng.beta(2.0, 2.0, n)
    y = (rng.random(n) < truth).astype(np.int64)
    p = 1.0 / (1.0 + np.exp(-1.8 * np.log(truth / (1.0 - truth)) - 0.3))
    return y, (p if decimals is None else np.round(p, decimals))


def distinct(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Predictions with no ties and none at 0.5, so every binning convention agrees."""
    y, p = overconfident(n, seed, decimals=None)
    assert len(np.unique(p)) == n and not np.any(p == 0.5)
    return y, p


# --- Discrimination and proper scores against scikit-learn ---------------------------------


def test_accuracy_equals_scikit_learn_on_predictions_thresholded_at_one_half() -> None:
    y, p = overconfident(500, seed=1)
    p[:10] = 0.5  # says "correct"
    assert accuracy(y, p).value == pytest.approx(accuracy_score(y, p >= 0.5), abs=1e-15)


def test_base_rate_is_the_fraction_correct() -> None:
    assert base_rate([1, 0, 1, 1]).value == 0.75


def test_auroc_equals_roc_auc_score_with_tied_predictions() -> None:
    y, p = overconfident(2000, seed=2, decimals=1)
    assert auroc(y, p).value == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_auprc_equals_average_precision_score_with_tied_predictions() -> None:
    y, p = overconfident(2000, seed=3, decimals=1)
    assert auprc(y, p).value == pytest.approx(average_precision_score(y, p), abs=1e-12)


def test_brier_equals_brier_score_loss() -> None:
    y, p = overconfident(1000, seed=4)
    assert brier(y, p).value == pytest.approx(brier_score_loss(y, p), abs=1e-15)


def test_nll_equals_log_loss_away_from_the_clipping() -> None:
    y, p = overconfident(1000, seed=5, decimals=None)
    assert nll(y, p).value == pytest.approx(log_loss(y, p), abs=1e-12)


def test_nll_clips_a_certain_mistake_at_1e_minus_15() -> None:
    # One item correct but given p = 0, one incorrect given p = 0.5:
    # (−ln 1e-15 − ln 0.5) / 2 = (34.539 + 0.693) / 2.
    assert nll([1, 0], [0.0, 0.5]).value == pytest.approx((-math.log(1e-15) - math.log(0.5)) / 2)


def test_auroc_and_auprc_are_none_when_y_holds_one_class() -> None:
    assert auroc([1, 1, 1], [0.2, 0.5, 0.9]).value is None
    assert auprc([0, 0, 0], [0.2, 0.5, 0.9]).value is None


# --- Binned calibration error by hand ------------------------------------------------------

# Five equal-width bins, edges 0, .2, .4, .6, .8, 1: p = .2 opens bin 1, p = 1 closes bin 4.
HAND_Y = [0, 1, 0, 0, 1, 1, 1, 1, 0]
HAND_P = [0.1, 0.1, 0.2, 0.3, 0.5, 0.5, 0.9, 1.0, 0.85]
# bin 0: p .1 .1    → conf .10, y 0 1   → acc .5,  gap .40, n 2
# bin 1: p .2 .3    → conf .25, y 0 0   → acc 0,   gap .25, n 2
# bin 2: p .5 .5    → conf .50, y 1 1   → acc 1,   gap .50, n 2
# bin 3: empty
# bin 4: p .9 1 .85 → conf 2.75/3 = .91667, y 1 1 0 → acc 2/3, gap .25, n 3


def test_equal_width_ece_weights_each_bin_gap_by_its_count() -> None:
    # (2·.40 + 2·.25 + 2·.50 + 3·.25) / 9 = 3.05 / 9
    assert ece(HAND_Y, HAND_P, bins=5).value == pytest.approx(3.05 / 9)


def test_l2_ece_is_the_root_of_the_count_weighted_mean_squared_gap() -> None:
    # √((2·.16 + 2·.0625 + 2·.25 + 3·.0625) / 9) = √(1.1325 / 9)
    assert ece(HAND_Y, HAND_P, bins=5, norm="l2").value == pytest.approx(math.sqrt(1.1325 / 9))


def test_mce_is_the_largest_gap_over_non_empty_bins() -> None:
    assert mce(HAND_Y, HAND_P, bins=5).value == pytest.approx(0.5)


def test_reliability_bins_list_every_equal_width_bin_with_none_means_when_empty() -> None:
    bins = reliability_bins(HAND_Y, HAND_P, bins=5)
    assert [b.lower for b in bins] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    assert [b.upper for b in bins] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert [b.count for b in bins] == [2, 2, 2, 0, 3]
    assert [b.mean_confidence for b in bins] == pytest.approx([0.1, 0.25, 0.5, None, 2.75 / 3])
    assert [b.accuracy for b in bins] == pytest.approx([0.5, 0.0, 1.0, None, 2 / 3])


def test_max_probability_form_compares_confidence_with_thresholded_accuracy() -> None:
    # p .15 .3 .7 .9 with y 0 1 1 0: confidence max(p, 1−p) = .85 .7 .7 .9, and the
    # prediction (p ≥ .5) is right, wrong, right, wrong.
    # bin 3 [.6, .8): conf .7,   acc 1/2 → gap .2
    # bin 4 [.8, 1]:  conf .875, acc 1/2 → gap .375;   ECE = (2·.2 + 2·.375) / 4
    assert ece([0, 1, 1, 0], [0.15, 0.3, 0.7, 0.9], bins=5, form="max_probability").value == pytest.approx(1.15 / 4)


# Seven items in three equal-mass bins of sizes 3, 2, 2 (as numpy.array_split makes them).
# The two items at p = .2 straddle the first cut; sorted by (p, y), the incorrect one comes
# first, whatever order they are given in.
MASS_Y = [1, 0, 1, 0, 0, 1, 0]
MASS_P = [0.4, 0.6, 0.2, 0.15, 0.1, 0.9, 0.2]
# bin 0: p .1 .15 .2 → conf .15, y 0 0 0 → acc 0, gap .15, n 3
# bin 1: p .2 .4     → conf .30, y 1 1   → acc 1, gap .70, n 2
# bin 2: p .6 .9     → conf .75, y 0 1   → acc .5, gap .25, n 2


def test_equal_mass_ece_splits_the_sorted_predictions_as_array_split_does() -> None:
    # (3·.15 + 2·.70 + 2·.25) / 7 = 2.35 / 7
    assert ece(MASS_Y, MASS_P, bins=3, binning="equal_mass").value == pytest.approx(2.35 / 7)


def test_ace_is_the_unweighted_mean_gap_over_equal_mass_bins() -> None:
    # (.15 + .70 + .25) / 3
    assert ace(MASS_Y, MASS_P, bins=3).value == pytest.approx(1.1 / 3)


def test_equal_mass_bins_do_not_depend_on_the_order_of_tied_items() -> None:
    reordered = np.random.default_rng(0).permutation(len(MASS_Y))
    shuffled_y, shuffled_p = np.array(MASS_Y)[reordered], np.array(MASS_P)[reordered]
    assert ece(shuffled_y, shuffled_p, bins=3, binning="equal_mass").value == pytest.approx(2.35 / 7)


def test_equal_mass_reliability_bins_span_their_smallest_and_largest_prediction() -> None:
    bins = reliability_bins(MASS_Y, MASS_P, bins=3, binning="equal_mass")
    assert [(b.lower, b.upper, b.count, b.accuracy) for b in bins] == [
        (0.1, 0.2, 3, 0.0),
        (0.2, 0.4, 2, 1.0),
        (0.6, 0.9, 2, 0.5),
    ]


def test_confidence_histogram_counts_p_in_equal_width_bins() -> None:
    histogram = confidence_histogram(HAND_P, bins=5)
    assert histogram.edges == pytest.approx((0.0, 0.2, 0.4, 0.6, 0.8, 1.0))
    assert histogram.counts == (2, 2, 2, 0, 3)


def test_every_calibration_error_names_its_variant() -> None:
    y, p = overconfident(100, seed=6)
    assert ece(y, p).label == "ECE — 15 equal-width bins, L1, binary P(y=1)"
    assert ece(y, p, 10, "equal_mass", "l2").label == "ECE — 10 equal-mass bins, L2, binary P(y=1)"
    assert ece(y, p, form="max_probability").label == "ECE — 15 equal-width bins, L1, max-probability confidence"
    assert mce(y, p).label == "MCE — 15 equal-width bins, max gap, binary P(y=1)"
    assert ace(y, p).label == "ACE — 15 equal-mass bins, L1, binary P(y=1)"
    assert debiased_ece(y, p).label == "Debiased ECE — 15 equal-mass bins, L2, binary P(y=1)"
    assert (
        smooth_ece(y, p).label == "Smooth ECE — reflected Gaussian kernel, self-consistent bandwidth, L1, binary P(y=1)"
    )


# --- Against Kumar, Liang & Ma's package -----------------------------------------------------


def test_binned_ece_equals_kumars_package_with_the_same_bins() -> None:
    # With distinct predictions their bins (edges k/15, closed on the right; equal-mass
    # edges halfway between neighbours) hold the same items as ours.
    y, p = distinct(3000, seed=7)
    assert ece(y, p).value == pytest.approx(kumar.get_ece(p, y), abs=1e-12)
    assert ece(y, p, binning="equal_mass").value == pytest.approx(kumar.get_ece_em(p, y), abs=1e-12)
    schemes: tuple[tuple[Literal["equal_width", "equal_mass"], Any], ...] = (
        ("equal_width", kumar.get_equal_prob_bins),
        ("equal_mass", kumar.get_equal_bins),
    )
    for binning, scheme in schemes:
        expected = kumar.lower_bound_scaling_ce(p, y, p=2, debias=False, num_bins=15, binning_scheme=scheme)
        assert ece(y, p, binning=binning, norm="l2").value == pytest.approx(expected, abs=1e-12)


def test_max_probability_ece_equals_kumars_top_label_ece() -> None:
    y, p = distinct(3000, seed=8)
    assert ece(y, p, form="max_probability").value == pytest.approx(
        kumar.get_ece(np.column_stack([1 - p, p]), y), abs=1e-12
    )


def test_debiased_ece_equals_kumars_debiased_l2_estimate() -> None:
    y, p = distinct(3000, seed=9)
    assert debiased_ece(y, p).value == pytest.approx(kumar.get_calibration_error(p, y, p=2, debias=True), abs=1e-12)
    equal_width = kumar.lower_bound_scaling_ce(
        p, y, p=2, debias=True, num_bins=15, binning_scheme=kumar.get_equal_prob_bins
    )
    assert debiased_ece(y, p, binning="equal_width").value == pytest.approx(equal_width, abs=1e-12)


# --- Smooth ECE --------------------------------------------------------------------------------


def reflected_kernel_integral(y: np.ndarray, p: np.ndarray, bandwidth: float, nodes: int = 20001) -> float:
    """∫₀¹ |(1/n)·Σᵢ K(t, pᵢ)·(pᵢ − yᵢ)| dt with K(t, x) = Σⱼ φ(t − x − 2j) + φ(t + x − 2j),
    summed item by item and integrated by the trapezoid rule."""
    t = np.linspace(0.0, 1.0, nodes)[:, None]
    images = np.concatenate([p + 2 * j for j in range(-4, 5)] + [-p + 2 * j for j in range(-4, 5)])[None, :]
    residuals = np.tile(p - y, 18)[None, :]
    smoothed = np.abs((np.exp(-0.5 * ((t - images) / bandwidth) ** 2) * residuals).sum(axis=1))
    smoothed /= math.sqrt(2 * math.pi) * bandwidth * len(p)
    return float((smoothed.sum() - 0.5 * (smoothed[0] + smoothed[-1])) / (nodes - 1))


@pytest.mark.parametrize("shape", [0.4, 0.7, 1.0, 1.5])
def test_smooth_ece_agrees_with_relplot(shape: float) -> None:
    # Predictions away from 0 and 1, where relplot's coarser grid is exact enough; its
    # bandwidth search stops within 2⁻¹⁰ of σ*.
    rng = np.random.default_rng(10)
    truth = rng.uniform(0.02, 0.98, 3000)
    y = (rng.random(3000) < truth).astype(float)
    p = truth**shape
    assert smooth_ece(y, p).value == pytest.approx(relplot.smECE(p, y), abs=1e-3)


def test_smooth_ece_is_its_own_bandwidth() -> None:
    y, p = overconfident(1000, seed=11)
    result = smooth_ece(y, p)
    assert result.value == pytest.approx(result.bandwidth, abs=1e-6)


def test_smooth_ece_is_the_reflected_kernel_integral_at_its_bandwidth() -> None:
    # Anti-calibrated, with predictions exactly at 0 and 1: the boundary is where
    # reflection matters most.
    rng = np.random.default_rng(12)
    truth = rng.random(40)
    y = (rng.random(40) < truth).astype(float)
    p = np.concatenate([1.0 - truth[:30], [0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.25, 0.75, 1.0]])
    result = smooth_ece(y, p)
    assert result.value == pytest.approx(reflected_kernel_integral(y, p, result.bandwidth), abs=1e-5)


# --- The vectorised bootstrap ----------------------------------------------------------------


def slow_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """One resample's metrics, from scikit-learn where it has them."""
    return {
        "accuracy": accuracy_score(y, p >= 0.5),
        "auroc": roc_auc_score(y, p),
        "auprc": average_precision_score(y, p),
        "aurc": aurc(y, p).value,
        "prr": prr(y, p).value,
        "brier": brier_score_loss(y, p),
        "nll": log_loss(y, p),
        "ece": ece(y, p).value,
        "ece_equal_mass": ece(y, p, binning="equal_mass").value,
        "ece_l2": ece(y, p, norm="l2").value,
        "ece_equal_mass_l2": ece(y, p, binning="equal_mass", norm="l2").value,
        "ece_max_probability": ece(y, p, form="max_probability").value,
        "mce": mce(y, p).value,
        "ace": ace(y, p).value,
        "debiased_ece": debiased_ece(y, p).value,
    }


def test_resampled_metrics_equal_a_slow_loop_over_the_same_indices() -> None:
    y, p = overconfident(400, seed=13)
    p[:20] = 0.5
    indices = np.random.default_rng(0).integers(0, len(y), size=(6, len(y)))
    fast = resampled_metrics(y, p, indices)
    assert set(fast) == set(BOOTSTRAPPED)
    for row, drawn in enumerate(indices):
        slow = slow_metrics(y[drawn], p[drawn])
        for name in BOOTSTRAPPED:
            assert fast[name][row] == pytest.approx(slow[name], rel=1e-9, abs=1e-12), (name, row)


def slow_leave_one_out(y: np.ndarray, p: np.ndarray, name: str, bins: int = 15) -> np.ndarray:
    """The metric recomputed without each item in turn."""
    keep = ~np.eye(len(y), dtype=bool)
    return np.array([BCA_POINT_FUNCTIONS[name](y[kept], p[kept], bins).value for kept in keep])


@pytest.mark.parametrize(("n", "bins"), [(61, 15), (45, 15), (23, 4), (7, 3)])
def test_leave_one_out_values_equal_the_metrics_recomputed_without_each_item(n: int, bins: int) -> None:
    # Rounded to one decimal, so many items tie and equal-mass cuts fall inside tie runs;
    # n mod bins varies, so leaving an item out moves the cuts differently.
    y, p = overconfident(n, seed=n, decimals=1)
    fast = leave_one_out_values(y.astype(float), p, bins)
    assert set(fast) == set(WITH_BCA)
    for name in WITH_BCA:
        assert fast[name] == pytest.approx(slow_leave_one_out(y, p, name, bins), rel=1e-9, abs=1e-12), name


def test_report_intervals_come_from_default_rng_resamples_by_each_metrics_method(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics, "BOOTSTRAP_BLOCK_ITEMS", 700)  # three resamples per block
    y, p = overconfident(200, seed=14)
    report = calibration_report(y, p, resamples=40, seed=5, level=0.9)
    rows = resampled_metrics(y, p, np.random.default_rng(5).integers(0, 200, size=(40, 200)))
    for name in PERCENTILE:
        value, (low, high) = report.metrics[name].value, np.nanpercentile(rows[name], [5, 95])
        assert report.metrics[name].interval == pytest.approx((min(low, value), max(high, value))), name
        assert report.metrics[name].interval_method == "percentile"
    for name in BIAS_CORRECTED:
        estimate = report.metrics[name]
        left_out = slow_leave_one_out(y, p, name) if name in WITH_BCA else None
        expected, method = bias_corrected_interval(rows[name], estimate.value, left_out, 0.9, (0.0, 1.0))
        assert expected is not None, name
        assert (estimate.interval, estimate.interval_method) == (pytest.approx(expected), method), name
    assert report.metrics["mce"].interval_method == "basic"


def test_resampled_percentile_metrics_fall_about_as_often_below_their_estimate_as_above() -> None:
    # Why these keep the percentile interval: about half their resamples lie below the
    # estimate, where nearly all of a binned error's lie above it.
    below: dict[str, list[float]] = {}
    for seed in range(4):
        y, p = overconfident(300, seed=40 + seed)
        report = calibration_report(y, p, resamples=0)
        rows = resampled_metrics(y, p, np.random.default_rng(seed).integers(0, 300, size=(400, 300)))
        for name in (*PERCENTILE, "ece"):
            value = report.metrics[name].value
            below.setdefault(name, []).append(float(np.mean(rows[name] < value)))
    for name in PERCENTILE:
        if name != "debiased_ece":
            assert 0.4 < np.mean(below[name]) < 0.6, (name, below[name])
    assert np.mean(below["ece"]) < 0.25, below["ece"]


def test_resamples_with_one_class_give_nan_auroc_and_auprc() -> None:
    rows = resampled_metrics([0, 1], [0.3, 0.8], np.array([[0, 0], [1, 1], [0, 1]]))
    assert np.isnan(rows["auroc"][:2]).all() and np.isnan(rows["auprc"][:2]).all()
    assert (rows["auroc"][2], rows["auprc"][2]) == (1.0, 1.0)


def test_bootstrap_intervals_contain_the_point_estimate() -> None:
    y, p = overconfident(2000, seed=15)
    report = calibration_report(y, p, resamples=300)
    for name in BOOTSTRAPPED:
        estimate = report.metrics[name]
        assert estimate.value is not None and estimate.interval is not None, name
        low, high = estimate.interval
        assert low <= estimate.value <= high, name


def test_bootstrap_intervals_shrink_as_n_grows() -> None:
    small = calibration_report(*overconfident(200, seed=16), resamples=300)
    large = calibration_report(*overconfident(5000, seed=16), resamples=300)
    for name in BOOTSTRAPPED:
        small_interval, large_interval = small.metrics[name].interval, large.metrics[name].interval
        assert small_interval is not None and large_interval is not None, name
        (small_low, small_high), (large_low, large_high) = small_interval, large_interval
        assert large_high - large_low < small_high - small_low, name


def test_the_same_seed_gives_the_same_intervals_and_another_seed_others() -> None:
    y, p = overconfident(500, seed=17)
    first, again, other = (calibration_report(y, p, resamples=200, seed=seed) for seed in (1, 1, 2))
    for name in BOOTSTRAPPED:
        assert first.metrics[name].interval == again.metrics[name].interval
        # A bias-corrected interval can be pinned to the metric's floor and its estimate
        # whatever the seed (here MCE's, whose resamples lie far above the estimate).
        pinned = (0.0, first.metrics[name].value)
        if name not in BIAS_CORRECTED or first.metrics[name].interval != pinned:
            assert first.metrics[name].interval != other.metrics[name].interval, name


def test_smooth_ece_is_reported_without_an_interval() -> None:
    report = calibration_report(*overconfident(300, seed=18), resamples=50)
    assert report.metrics["smooth_ece"].value is not None and report.metrics["smooth_ece"].interval is None


def test_paired_differences_of_identical_predictions_are_exactly_zero() -> None:
    y, p = overconfident(300, seed=19)
    differences = paired_differences(y, p, p.copy(), resamples=200, seed=3)
    for name, difference in differences.metrics.items():
        assert difference.value == 0.0, name
        assert difference.interval == ((0.0, 0.0) if name in BOOTSTRAPPED else None), name


def test_paired_differences_are_b_minus_a_on_the_same_resamples_by_the_metrics_own_method() -> None:
    y, p_a = overconfident(300, seed=20)
    p_b = np.clip(p_a + np.random.default_rng(1).normal(0.0, 0.1, len(p_a)), 0.0, 1.0)
    differences = paired_differences(y, p_a, p_b, resamples=100, seed=4)
    indices = np.random.default_rng(4).integers(0, len(y), size=(100, len(y)))
    rows_a, rows_b = resampled_metrics(y, p_a, indices), resampled_metrics(y, p_b, indices)
    report_a, report_b = calibration_report(y, p_a, resamples=0), calibration_report(y, p_b, resamples=0)
    for name in BOOTSTRAPPED:
        value_a, value_b = report_a.metrics[name].value, report_b.metrics[name].value
        assert value_a is not None and value_b is not None, name
        difference = differences.metrics[name]
        assert difference.value == pytest.approx(value_b - value_a)
        rows = rows_b[name] - rows_a[name]
        if name in PERCENTILE:
            low, high = np.nanpercentile(rows, [2.5, 97.5])
            percentile = (min(low, value_b - value_a), max(high, value_b - value_a))
            assert (difference.interval, difference.interval_method) == (pytest.approx(percentile), "percentile"), name
        else:
            left_out = slow_leave_one_out(y, p_b, name) - slow_leave_one_out(y, p_a, name) if name in WITH_BCA else None
            corrected, method = bias_corrected_interval(rows, value_b - value_a, left_out, 0.95, (-1.0, 1.0))
            assert (difference.interval, difference.interval_method) == (pytest.approx(corrected), method), name


# --- The report's JSON -------------------------------------------------------------------------


def test_report_dict_has_the_documented_shape_and_plain_json_values() -> None:
    y, p = overconfident(300, seed=21)
    shape = calibration_report(y, p, resamples=100, seed=7).to_dict()
    decoded = json.loads(json.dumps(shape, allow_nan=False))
    assert decoded == shape
    assert set(shape) == {"n", "base_rate", "metrics", "bins", "histogram", "risk_coverage", "bootstrap"}
    assert (shape["n"], shape["bootstrap"]) == (300, {"resamples": 100, "seed": 7, "level": 0.95})
    assert list(shape["metrics"]) == list(REPORTED)
    for name, entry in shape["metrics"].items():
        assert set(entry) == (
            {"value", "interval", "interval_method", "label", "estimator"}
            if name in CALIBRATION_ERRORS
            else {"value", "interval", "interval_method", "label"}
        ), name
    assert {name: entry["interval_method"] for name, entry in shape["metrics"].items()} == {
        name: "percentile" for name in PERCENTILE
    } | {name: shape["metrics"][name]["interval_method"] for name in WITH_BCA} | {"mce": "basic", "smooth_ece": None}
    assert all(shape["metrics"][name]["interval_method"] in ("bca", "basic") for name in WITH_BCA)
    assert shape["metrics"]["ece"]["estimator"] == {
        "name": "ece",
        "bins": 15,
        "binning": "equal_width",
        "norm": "l1",
        "form": "binary",
    }
    assert len(shape["bins"]["equal_width"]) == 15 and len(shape["bins"]["equal_mass"]) == 15
    assert set(shape["bins"]["equal_width"][0]) == {"lower", "upper", "count", "mean_confidence", "accuracy"}
    assert len(shape["histogram"]["edges"]) == 16 and len(shape["histogram"]["counts"]) == 15
    curve = shape["risk_coverage"]
    assert set(curve) == {"coverage", "risk"} and len(curve["coverage"]) == len(curve["risk"]) == 101
    assert (curve["coverage"][0], curve["coverage"][-1]) == (1 / 300, 1.0)


def test_report_of_one_class_has_null_auroc_and_stays_valid_json() -> None:
    shape = calibration_report([1] * 50, np.linspace(0.1, 0.9, 50), resamples=20).to_dict()
    json.dumps(shape, allow_nan=False)
    assert shape["metrics"]["auroc"] == {
        "value": None,
        "interval": None,
        "interval_method": None,
        "label": "AUROC (ties count half)",
    }
    assert (shape["metrics"]["prr"]["value"], shape["metrics"]["prr"]["interval"]) == (None, None)
    assert shape["risk_coverage"]["risk"] == [0.0] * 50
    assert any(bin_["mean_confidence"] is None for bin_ in shape["bins"]["equal_width"])


# --- Inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("y", "p", "message"),
    [
        ([0, 1], [0.2, 1.2], "p must hold probabilities"),
        ([0, 1], [0.2, float("nan")], "p must hold probabilities"),
        ([0, 2], [0.2, 0.4], "y must hold only 0 and 1"),
        ([0, 1, 1], [0.2, 0.4], "same length"),
        ([], [], "y must be a non-empty"),
    ],
)
def test_invalid_inputs_are_rejected_naming_the_argument(y: list[float], p: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        calibration_report(y, p)
