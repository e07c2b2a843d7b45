"""Probes, their recalibration and storage, checked against independent computations."""

import json
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
from safetensors.numpy import load_file
from scipy.optimize import minimize
from scipy.special import expit
from sklearn.base import clone
from sklearn.covariance import LedoitWolf
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import check_estimator

from app.schemas.probes import Recalibration
from workers import probes, splits
from workers.probes import (
    IsotonicRecalibration,
    LogisticProbe,
    MassMeanProbe,
    PlattScaling,
    TemperatureScaling,
)


def planted_direction_data(n: int, d: int, *, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features whose class-1 mean sits `shift` further along a random unit direction, on top of
    per-feature offsets and scales, so standardisation matters."""
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(d)
    direction /= np.linalg.norm(direction)
    y = rng.integers(0, 2, n)
    X = rng.normal(0.0, 5.0, d) + rng.standard_normal((n, d)) + shift * y[:, None] * direction
    return X, y, direction


def over_confident_logits(n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(z), logits reported as 4·z: calibrated at temperature 4."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0.0, 2.0, n)
    return 4.0 * true_logits, (rng.random(n) < expit(true_logits)).astype(np.int64)


def mean_nll(probabilities: np.ndarray, y: np.ndarray) -> float:
    return float(log_loss(y, probabilities, labels=[0, 1]))


def fitted_probes() -> list[probes.Probe]:
    X, y, _ = planted_direction_data(400, 12, shift=2.0, seed=3)
    return [LogisticProbe(C=0.5).fit(X, y), MassMeanProbe().fit(X, y), MassMeanProbe(whiten=True).fit(X, y)]


def fitted_recalibrators() -> list[probes.Recalibrator | None]:
    logits, y = over_confident_logits(300, seed=4)
    return [
        None,
        TemperatureScaling().fit(logits, y),
        PlattScaling().fit(logits, y),
        IsotonicRecalibration().fit(logits, y),
    ]


def test_split_parts_are_sorted_disjoint_and_cover_every_index() -> None:
    y = np.random.default_rng(0).integers(0, 2, 101)
    split = splits.stratified_split(y, seed=1)
    parts = [split.train, split.validation, split.test]
    assert all(np.array_equal(part, np.sort(part)) and part.dtype.kind == "i" for part in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(101))


@pytest.mark.parametrize("class_sizes", [(3, 3), (3, 97), (4, 11), (50, 50), (17, 230), (333, 667)])
def test_split_holds_each_class_within_one_item_of_its_fractions(class_sizes: tuple[int, int]) -> None:
    y = np.repeat([0, 1], class_sizes)
    split = splits.stratified_split(y, seed=7)
    for part, fraction in zip([split.train, split.validation, split.test], splits.DEFAULT_FRACTIONS, strict=False):
        for label, class_size in zip([0, 1], class_sizes, strict=False):
            assert abs(np.sum(y[part] == label) - fraction * class_size) <= 1


def test_split_gives_every_part_both_classes_when_a_class_has_three_members() -> None:
    y = np.repeat([0, 1], [3, 40])
    for seed in range(20):
        split = splits.stratified_split(y, seed=seed)
        assert all(set(y[part]) == {0, 1} for part in [split.train, split.validation, split.test])


def test_split_is_the_same_for_the_same_seed() -> None:
    y = np.random.default_rng(0).integers(0, 2, 200)
    first, second = splits.stratified_split(y, seed=5), splits.stratified_split(y, seed=5)
    assert all(np.array_equal(getattr(first, part), getattr(second, part)) for part in ["train", "validation", "test"])


def test_split_differs_between_seeds() -> None:
    y = np.random.default_rng(0).integers(0, 2, 200)
    assert not np.array_equal(splits.stratified_split(y, seed=5).test, splits.stratified_split(y, seed=6).test)


def test_split_refuses_a_class_with_fewer_than_three_members() -> None:
    with pytest.raises(ValueError, match="class 1 has 2 member"):
        splits.stratified_split(np.repeat([0, 1], [30, 2]), seed=0)


def test_split_refuses_labels_of_a_single_class() -> None:
    with pytest.raises(ValueError, match="exactly two classes"):
        splits.stratified_split(np.zeros(30, dtype=int), seed=0)


def test_logistic_probe_recovers_a_planted_direction() -> None:
    X, y, direction = planted_direction_data(3000, 20, shift=3.0, seed=0)
    probe = LogisticProbe().fit(X[:2000], y[:2000])
    raw_space_weights = probe.coef_ / probe.scale_
    assert roc_auc_score(y[2000:], probe.predict_proba(X[2000:])[:, 1]) > 0.9
    assert raw_space_weights @ direction / np.linalg.norm(raw_space_weights) > 0.95


def test_logistic_probe_probabilities_equal_a_scaler_and_logistic_regression_pipeline() -> None:
    X, y, _ = planted_direction_data(600, 30, shift=1.5, seed=1)
    probe = LogisticProbe(C=0.05).fit(X[:400], y[:400])
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.05)).fit(X[:400], y[:400])
    np.testing.assert_allclose(probe.predict_proba(X[400:]), reference.predict_proba(X[400:]), rtol=0, atol=1e-6)


def test_logistic_probe_gives_a_constant_feature_scale_one() -> None:
    X, y, _ = planted_direction_data(200, 5, shift=2.0, seed=2)
    X[:, 0] = 7.25
    probe = LogisticProbe().fit(X, y)
    assert probe.scale_[0] == 1.0
    assert np.isfinite(probe.predict_proba(X)).all()


def test_fit_logistic_probe_chooses_strong_regularisation_on_noisy_high_dimensional_data() -> None:
    X, y, _ = planted_direction_data(400, 600, shift=1.0, seed=3)
    _, choice = probes.fit_logistic_probe(X[:200], y[:200], X[200:], y[200:])
    assert choice["chosen_C"] <= 1e-2


def test_fit_logistic_probe_chooses_weak_regularisation_on_clean_data() -> None:
    X, y, _ = planted_direction_data(2000, 5, shift=4.0, seed=4)
    _, choice = probes.fit_logistic_probe(X[:1000], y[:1000], X[1000:], y[1000:])
    assert choice["chosen_C"] >= 1.0


def test_fit_logistic_probe_chooses_the_argmin_of_independently_computed_validation_log_loss() -> None:
    X, y, _ = planted_direction_data(600, 80, shift=1.5, seed=5)
    x_train, y_train, x_val, y_val = X[:300], y[:300], X[300:], y[300:]
    independent_losses = [
        log_loss(
            y_val,
            make_pipeline(StandardScaler(), LogisticRegression(C=strength)).fit(x_train, y_train).predict_proba(x_val),
        )
        for strength in probes.DEFAULT_C_GRID
    ]
    probe, choice = probes.fit_logistic_probe(x_train, y_train, x_val, y_val)
    assert choice["chosen_C"] == probes.DEFAULT_C_GRID[int(np.argmin(independent_losses))] == probe.C


def test_fit_logistic_probe_breaks_a_tie_towards_stronger_regularisation() -> None:
    # constant features carry nothing: every C gives the same base-rate prediction
    x_train, x_val = np.ones((40, 3)), np.ones((20, 3))
    y_train, y_val = np.tile([0, 1, 1, 1], 10), np.tile([0, 1, 1, 1], 5)
    _, choice = probes.fit_logistic_probe(x_train, y_train, x_val, y_val, grid=[10.0, 0.01, 1.0])
    assert len(set(choice["validation_log_loss"].values())) == 1
    assert choice["chosen_C"] == 0.01


def test_fit_logistic_probe_report_is_json_ready() -> None:
    X, y, _ = planted_direction_data(200, 10, shift=2.0, seed=6)
    _, choice = probes.fit_logistic_probe(X[:100], y[:100], X[100:], y[100:])
    assert json.loads(json.dumps(choice)) == choice
    assert list(choice["validation_log_loss"]) == [str(strength) for strength in probes.DEFAULT_C_GRID]


def test_mass_mean_direction_is_the_difference_of_class_means() -> None:
    X, y, _ = planted_direction_data(300, 8, shift=2.0, seed=7)
    probe = MassMeanProbe().fit(X, y)
    np.testing.assert_allclose(probe.direction_, X[y == 1].mean(axis=0) - X[y == 0].mean(axis=0), rtol=1e-12)


def test_whitened_mass_mean_direction_solves_the_ledoit_wolf_covariance_of_class_centred_features() -> None:
    X, y, _ = planted_direction_data(300, 8, shift=2.0, seed=8)
    mu0, mu1 = X[y == 0].mean(axis=0), X[y == 1].mean(axis=0)
    centred = np.where(y[:, None] == 1, X - mu1, X - mu0)
    expected = np.linalg.solve(LedoitWolf().fit(centred).covariance_, mu1 - mu0)
    np.testing.assert_allclose(MassMeanProbe(whiten=True).fit(X, y).direction_, expected, rtol=1e-10)


def test_mass_mean_probabilities_beat_the_base_rate_on_held_out_data() -> None:
    X, y, _ = planted_direction_data(2000, 20, shift=2.0, seed=9)
    probe = MassMeanProbe().fit(X[:1000], y[:1000])
    base_rate = np.full(1000, y[:1000].mean())
    assert mean_nll(probe.predict_proba(X[1000:])[:, 1], y[1000:]) < mean_nll(base_rate, y[1000:]) - 0.2


@pytest.mark.parametrize("probe", [LogisticProbe(), MassMeanProbe(), MassMeanProbe(whiten=True)], ids=repr)
def test_probes_trained_on_shuffled_labels_score_near_chance(probe: probes.Probe) -> None:
    X, y, _ = planted_direction_data(3000, 200, shift=1.5, seed=10)
    shuffled = np.random.default_rng(11).permutation(y[:1000])
    probe.fit(X[:1000], shuffled)
    assert abs(roc_auc_score(y[1000:], probe.predict_proba(X[1000:])[:, 1]) - 0.5) < 0.06


def test_temperature_scaling_lowers_the_nll_of_over_confident_logits() -> None:
    logits, y = over_confident_logits(2000, seed=12)
    scaling = TemperatureScaling().fit(logits, y)
    assert scaling.temperature_ > 1.0
    assert mean_nll(scaling.transform(logits), y) < mean_nll(expit(logits), y) - 0.1


def test_temperature_matches_a_brute_force_grid_search() -> None:
    logits, y = over_confident_logits(1000, seed=13)
    temperatures = np.exp(np.linspace(np.log(0.5), np.log(50.0), 10_001))
    signed_logits = np.where(y == 1, logits, -logits)
    grid_nll = -np.mean(np.log(expit(signed_logits / temperatures[:, None])), axis=1)
    best_on_grid = temperatures[int(np.argmin(grid_nll))]
    assert TemperatureScaling().fit(logits, y).temperature_ == pytest.approx(best_on_grid, rel=1e-3)


def test_platt_scaling_is_the_maximum_likelihood_logistic_fit_on_the_logit() -> None:
    logits, y = over_confident_logits(1000, seed=14)

    def nll_and_gradient(ab: np.ndarray) -> tuple[float, np.ndarray]:
        scores = ab[0] * logits + ab[1]
        residual = expit(scores) - y
        return float(np.mean(np.logaddexp(0.0, scores) - y * scores)), np.array(
            [np.mean(residual * logits), np.mean(residual)]
        )

    a, b = minimize(nll_and_gradient, x0=np.zeros(2), jac=True, method="BFGS", options={"gtol": 1e-10}).x
    scaling = PlattScaling().fit(logits, y)
    assert (scaling.a_, scaling.b_) == pytest.approx((a, b), abs=1e-5)


def test_isotonic_recalibration_predicts_what_scikit_learns_isotonic_regression_predicts() -> None:
    logits, y = over_confident_logits(1000, seed=19)
    reference = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(logits, y)
    recalibration = IsotonicRecalibration().fit(logits, y)
    np.testing.assert_array_equal(recalibration.x_thresholds_, reference.X_thresholds_)
    np.testing.assert_array_equal(recalibration.y_thresholds_, reference.y_thresholds_)
    # new logits, some beyond the fitted ones on both sides, where `clip` holds the end values
    unseen = np.concatenate([np.random.default_rng(20).normal(0.0, 12.0, 500), [logits.min() - 5, logits.max() + 5]])
    np.testing.assert_allclose(recalibration.transform(unseen), reference.predict(unseen), rtol=0, atol=1e-12)


def test_isotonic_recalibration_keeps_each_fitted_block_at_the_mean_of_its_labels() -> None:
    """Pool adjacent violators, by hand on a case small enough to follow: sorted logits with
    labels 0, 1, 0, 1, 1 pool the middle violators (1, 0) into one block of mean 1/2."""
    recalibration = IsotonicRecalibration().fit(np.array([-2.0, -1.0, 0.0, 1.0, 2.0]), np.array([0, 1, 0, 1, 1]))
    np.testing.assert_allclose(recalibration.transform(np.array([-2.0, -1.0, 0.0, 1.0, 2.0])), [0, 0.5, 0.5, 1, 1])
    assert recalibration.transform(np.array([-0.5]))[0] == pytest.approx(0.5)  # inside a block: its value
    assert recalibration.transform(np.array([0.5]))[0] == pytest.approx(0.75)  # between blocks: linear


def test_isotonic_recalibration_is_stored_as_its_thresholds_in_safetensors(tmp_path: Path) -> None:
    probe, recalibrator = fitted_probes()[0], fitted_recalibrators()[3]
    assert isinstance(recalibrator, IsotonicRecalibration)
    probes.save_probe(tmp_path, probe, recalibrator)
    arrays = load_file(tmp_path / "probe.safetensors")
    np.testing.assert_array_equal(arrays["recalibrator.x_thresholds"], recalibrator.x_thresholds_)
    np.testing.assert_array_equal(arrays["recalibrator.y_thresholds"], recalibrator.y_thresholds_)
    assert json.loads((tmp_path / "probe.json").read_text())["recalibrator"] == {"kind": "isotonic"}


@pytest.mark.parametrize("recalibrator", fitted_recalibrators(), ids=repr)
@pytest.mark.parametrize("probe", fitted_probes(), ids=repr)
def test_a_loaded_probe_predicts_bit_identically_to_the_saved_one(
    tmp_path: Path, probe: probes.Probe, recalibrator: probes.Recalibrator | None
) -> None:
    X, _, _ = planted_direction_data(50, 12, shift=2.0, seed=15)
    probes.save_probe(tmp_path, probe, recalibrator)
    loaded_probe, loaded_recalibrator = probes.load_probe(tmp_path)
    assert type(loaded_probe) is type(probe) and loaded_probe.get_params() == probe.get_params()
    assert type(loaded_recalibrator) is type(recalibrator)
    assert np.array_equal(loaded_probe.predict_proba(X), probe.predict_proba(X))
    assert np.array_equal(loaded_probe.predict(X), probe.predict(X))
    assert np.array_equal(
        probes.probability_of_correct(loaded_probe, loaded_recalibrator, X),
        probes.probability_of_correct(probe, recalibrator, X),
    )


def test_a_saved_probe_folder_holds_only_safetensors_and_plain_json(tmp_path: Path) -> None:
    probe, recalibrator = fitted_probes()[0], fitted_recalibrators()[1]
    probes.save_probe(tmp_path, probe, recalibrator)

    def only_plain_values(value: Any) -> bool:
        if isinstance(value, dict):
            return all(isinstance(key, str) and only_plain_values(item) for key, item in value.items())
        if isinstance(value, list):
            return all(only_plain_values(item) for item in value)
        return value is None or isinstance(value, str | int | float | bool)

    assert sorted(path.name for path in tmp_path.iterdir()) == ["probe.json", "probe.safetensors"]
    assert set(load_file(tmp_path / "probe.safetensors")) == {
        "probe.mean",
        "probe.scale",
        "probe.coef",
        "probe.classes",
    }
    params = json.loads((tmp_path / "probe.json").read_text())
    assert only_plain_values(params)
    assert params["probe"]["kind"] == "logistic" and params["recalibrator"]["kind"] == "temperature"


def test_an_unknown_probe_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown probe kind 'svm'"):
        probes.probe_from_state({}, {"kind": "svm"})


@pytest.mark.parametrize("probe", fitted_probes(), ids=repr)
def test_a_cloned_probe_keeps_its_parameters_and_drops_its_learned_state(probe: probes.Probe) -> None:
    copy = clone(probe)
    assert copy.get_params() == probe.get_params()
    assert not any(name.endswith("_") and not name.startswith("_") for name in vars(copy))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.SkipTestWarning")
@pytest.mark.parametrize("probe", [LogisticProbe(), MassMeanProbe(), MassMeanProbe(whiten=True)], ids=repr)
def test_probes_pass_the_scikit_learn_estimator_checks_for_binary_classifiers(probe: probes.Probe) -> None:
    check_estimator(probe)


@pytest.mark.parametrize("probe", [LogisticProbe(), MassMeanProbe(), MassMeanProbe(whiten=True)], ids=repr)
def test_probes_work_in_cross_val_score(probe: probes.Probe) -> None:
    X, y, _ = planted_direction_data(600, 10, shift=3.0, seed=16)
    assert cross_val_score(probe, X, y, cv=3, scoring="roc_auc").min() > 0.9
    assert cross_val_score(probe, X, y, cv=3).min() > 0.8


def test_probability_of_correct_without_a_recalibrator_is_the_probe_probability_of_class_one() -> None:
    X, y, _ = planted_direction_data(200, 6, shift=2.0, seed=17)
    probe = LogisticProbe().fit(X, y)
    assert np.array_equal(probes.probability_of_correct(probe, None, X), probe.predict_proba(X)[:, 1])


def test_probability_of_correct_with_a_recalibrator_recalibrates_the_probe_logits() -> None:
    X, y, _ = planted_direction_data(200, 6, shift=2.0, seed=18)
    probe = MassMeanProbe().fit(X, y)
    scaling = TemperatureScaling().fit(probe.decision_function(X), y)
    expected = expit(probe.decision_function(X) / scaling.temperature_)
    np.testing.assert_allclose(probes.probability_of_correct(probe, scaling, X), expected, rtol=1e-15)


def test_every_recalibration_a_request_may_name_has_a_recalibrator() -> None:
    assert set(probes.RECALIBRATOR_KINDS) == set(get_args(Recalibration))
