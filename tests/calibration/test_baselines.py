"""Baselines beside a probe: each baseline's report, the probe's paired differences from it,
and the verdict read off each difference's interval."""

import json

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score

from app.calibration.bootstrap import resampled_metrics
from app.calibration.reporting import (
    HIGHER_IS_BETTER,
    baseline_comparison,
    better_direction,
    calibration_report,
    paired_differences,
    verdict,
)
from app.calibration.values import Estimate


def items(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Labels, a probe that sees them through a little noise, and two baselines: one that
    sees them through more, and one that sees nothing."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    probe = np.clip(0.5 + (y - 0.5) * 0.6 + rng.normal(0, 0.15, n), 0.01, 0.99)
    weak = np.clip(0.5 + (y - 0.5) * 0.2 + rng.normal(0, 0.25, n), 0.01, 0.99)
    return y, probe, {"weak": weak, "blind": rng.uniform(0.01, 0.99, n)}


def test_each_baseline_gets_the_calibration_report_it_would_get_alone() -> None:
    y, probe, baselines = items(120, seed=1)
    comparison = baseline_comparison(y, probe, baselines, resamples=200, seed=5)
    assert list(comparison["baselines"]) == ["weak", "blind"]
    for name, confidence in baselines.items():
        assert comparison["baselines"][name] == calibration_report(y, confidence, resamples=200, seed=5).to_dict()


def test_the_probe_versus_a_baseline_is_probe_minus_baseline_on_the_resamples_of_the_reports() -> None:
    y, probe, baselines = items(150, seed=2)
    versus = baseline_comparison(y, probe, baselines, resamples=300, seed=7)["versus_baselines"]
    indices = np.random.default_rng(7).integers(0, len(y), size=(300, len(y)))
    probe_rows = resampled_metrics(y, probe, indices)
    for name, baseline in baselines.items():
        entries = versus[name]
        assert entries["auroc"]["value"] == pytest.approx(roc_auc_score(y, probe) - roc_auc_score(y, baseline))
        assert entries["brier"]["value"] == pytest.approx(brier_score_loss(y, probe) - brier_score_loss(y, baseline))
        baseline_rows = resampled_metrics(y, baseline, indices)
        for metric in ("auroc", "brier"):  # percentile intervals of the paired differences
            assert entries[metric]["interval_method"] == "percentile"
            assert entries[metric]["interval"] == pytest.approx(
                list(np.nanpercentile(probe_rows[metric] - baseline_rows[metric], [2.5, 97.5]))
            ), (name, metric)
        # ECE's difference is bias-corrected, as paired_differences corrects it on the same resamples
        paired = paired_differences(y, baseline, probe, resamples=300, seed=7).metrics["ece"]
        assert entries["ece"]["interval_method"] == paired.interval_method in {"bca", "basic"}
        assert entries["ece"]["interval"] == pytest.approx(list(paired.interval or ()))
        assert entries["smooth_ece"]["interval"] is None
        assert entries["smooth_ece"]["verdict"] == "no clear difference"
        assert entries["ece"]["label"] == calibration_report(y, probe, resamples=0).metrics["ece"].label
        assert "estimator" in entries["ece"] and "estimator" not in entries["auroc"]
    assert json.loads(json.dumps(versus, allow_nan=False)) == versus


def test_a_probe_that_sees_the_labels_beats_a_baseline_that_sees_nothing() -> None:
    y, probe, baselines = items(300, seed=3)
    versus = baseline_comparison(y, probe, baselines, resamples=300, seed=0)["versus_baselines"]["blind"]
    assert versus["auroc"]["better"] == "higher" and versus["auroc"]["verdict"] == "probe better"
    assert versus["brier"]["better"] == "lower" and versus["brier"]["verdict"] == "probe better"
    assert versus["nll"]["verdict"] == "probe better"


def test_a_baseline_identical_to_the_probe_shows_no_clear_difference() -> None:
    y, probe, _ = items(100, seed=4)
    versus = baseline_comparison(y, probe, {"same": probe.copy()}, resamples=100, seed=0)["versus_baselines"]["same"]
    assert {entry["verdict"] for entry in versus.values()} == {"no clear difference"}


def test_without_baselines_there_is_nothing_to_report() -> None:
    y, probe, _ = items(50, seed=5)
    assert baseline_comparison(y, probe, {}, resamples=100, seed=0) == {"baselines": {}, "versus_baselines": {}}


def test_ranking_and_accuracy_metrics_are_better_higher_and_losses_and_calibration_errors_lower() -> None:
    assert {"accuracy", "auroc", "auprc", "prr"} == HIGHER_IS_BETTER
    assert [better_direction(name) for name in ("accuracy", "auroc", "auprc", "prr")] == ["higher"] * 4
    assert [better_direction(name) for name in ("brier", "nll", "ece", "mce", "smooth_ece")] == ["lower"] * 5


@pytest.mark.parametrize(
    ("metric", "interval", "expected"),
    [
        ("auroc", (0.01, 0.2), "probe better"),
        ("auroc", (-0.2, -0.01), "baseline better"),
        ("auroc", (-0.05, 0.2), "no clear difference"),
        ("auroc", (0.0, 0.2), "no clear difference"),  # 0 itself is not excluded
        ("ece", (-0.2, -0.01), "probe better"),
        ("ece", (0.01, 0.2), "baseline better"),
        ("ece", (-0.2, 0.01), "no clear difference"),
        ("ece", None, "no clear difference"),
    ],
)
def test_the_verdict_says_better_only_where_the_interval_excludes_zero(
    metric: str, interval: tuple[float, float] | None, expected: str
) -> None:
    assert verdict(metric, Estimate(0.1, interval, "a metric")) == expected


def test_an_undefined_difference_has_no_clear_verdict() -> None:
    assert verdict("auroc", Estimate(None, (0.1, 0.2), "AUROC")) == "no clear difference"
