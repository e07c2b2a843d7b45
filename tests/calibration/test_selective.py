"""Selective prediction — AURC, PRR and the risk–coverage curve — against brute force: every
order of the tied items averaged for small cases, a plain loop over the kept items otherwise."""

import itertools
import math

import numpy as np
import pytest

from app.calibration.selective import aurc, prr, risk_coverage_curve

# Three tie groups: p = .9 holds 1 0 1, p = .5 holds 1 1 0, p = .2 holds 0.
TIED_Y = [1, 0, 1, 1, 0, 0, 1]
TIED_P = [0.9, 0.9, 0.5, 0.5, 0.5, 0.2, 0.9]


def risks_in_order(y: list[int] | np.ndarray, order: list[int] | np.ndarray) -> list[float]:
    """Fraction of y = 0 among the first k items of `order`, for k = 1 … n."""
    risks, errors = [], 0
    for kept, item in enumerate(order, start=1):
        errors += 1 - int(y[item])
        risks.append(errors / kept)
    return risks


def risks_over_every_order(y: list[int], p: list[float]) -> np.ndarray:
    """The risk at each k averaged over every permutation of the items, each sorted by
    decreasing p with ties left in the permutation's order: every order of each tie group
    equally often."""
    orders = [sorted(permutation, key=lambda item: -p[item]) for permutation in itertools.permutations(range(len(y)))]
    return np.mean([risks_in_order(y, order) for order in orders], axis=0)


def plain_aurc(y: np.ndarray, p: np.ndarray) -> float:
    """Distinct p: one order, the mean risk over k."""
    return float(np.mean(risks_in_order(y, np.argsort(-p))))


def distinct(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.random(n)
    y = (rng.random(n) < p).astype(int)
    assert len(np.unique(p)) == n
    return y, p


def test_aurc_is_the_mean_risk_averaged_over_every_order_of_tied_items() -> None:
    assert aurc(TIED_Y, TIED_P).value == pytest.approx(
        float(np.mean(risks_over_every_order(TIED_Y, TIED_P))), abs=1e-12
    )


def test_aurc_with_one_tie_group_of_everything_is_the_error_rate() -> None:
    # Every order equally likely: the expected risk at every k is the error rate.
    assert aurc([1, 0, 0, 1, 1], [0.7] * 5).value == pytest.approx(0.4, abs=1e-15)


def test_aurc_without_ties_is_the_mean_risk_of_a_plain_loop() -> None:
    y, p = distinct(3000, seed=1)
    assert aurc(y, p).value == pytest.approx(plain_aurc(y, p), abs=1e-12)


def test_aurc_does_not_depend_on_the_order_the_items_come_in() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 400)
    p = np.round(rng.random(400), 1)
    reordered = rng.permutation(400)
    assert aurc(y[reordered], p[reordered]).value == pytest.approx(aurc(y, p).value, abs=1e-14)


def test_prr_compares_the_area_with_a_random_and_an_oracle_order() -> None:
    y, p = distinct(2000, seed=3)
    random_area = 1.0 - y.mean()
    oracle_area = plain_aurc(y, y + 0.5 * p)  # every correct item kept before every wrong one
    assert prr(y, p).value == pytest.approx((random_area - plain_aurc(y, p)) / (random_area - oracle_area), abs=1e-10)


def test_prr_with_tied_predictions_uses_the_averaged_area() -> None:
    random_area = 3 / 7
    # The oracle keeps the four correct items, then the three wrong: risks 1/5, 2/6, 3/7.
    oracle_area = (1 / 5 + 2 / 6 + 3 / 7) / 7
    expected = (random_area - float(np.mean(risks_over_every_order(TIED_Y, TIED_P)))) / (random_area - oracle_area)
    assert prr(TIED_Y, TIED_P).value == pytest.approx(expected, abs=1e-12)


def test_prr_is_one_for_the_oracle_order_zero_for_no_ranking_and_negative_reversed() -> None:
    y = [1, 1, 0, 1, 0, 0, 1]
    assert prr(y, [0.9 if label else 0.1 for label in y]).value == pytest.approx(1.0)
    assert prr(y, [0.5] * 7).value == pytest.approx(0.0, abs=1e-15)
    # Wrong items first: risks 1, 1, 1, 3/4, 3/5, 3/6, 3/7; the oracle's 0, 0, 0, 0, 1/5, 2/6, 3/7.
    random_area, oracle_area = 3 / 7, (1 / 5 + 2 / 6 + 3 / 7) / 7
    reversed_area = (3 + 3 / 4 + 3 / 5 + 3 / 6 + 3 / 7) / 7
    assert prr(y, [0.1 if label else 0.9 for label in y]).value == pytest.approx(
        (random_area - reversed_area) / (random_area - oracle_area)
    )


def test_prr_is_none_when_y_holds_one_class() -> None:
    assert prr([1, 1, 1], [0.2, 0.5, 0.9]).value is None
    assert prr([0, 0], [0.2, 0.5]).value is None


def test_risk_coverage_curve_of_few_items_has_every_k_averaged_over_tie_orders() -> None:
    curve = risk_coverage_curve(TIED_Y, TIED_P)
    assert curve.coverage == pytest.approx([k / 7 for k in range(1, 8)])
    assert curve.risk == pytest.approx(list(risks_over_every_order(TIED_Y, TIED_P)), abs=1e-12)


def test_risk_coverage_curve_of_many_items_has_101_points_from_one_item_to_all() -> None:
    y, p = distinct(1234, seed=4)
    curve = risk_coverage_curve(y, p)
    kept = [1] + [math.ceil(1234 * step / 100) for step in range(1, 101)]
    assert curve.coverage == pytest.approx([k / 1234 for k in kept])
    risks = risks_in_order(y, np.argsort(-p))
    assert curve.risk == pytest.approx([risks[k - 1] for k in kept], abs=1e-12)
    assert curve.risk[-1] == pytest.approx(1.0 - y.mean())


def test_the_mean_of_the_full_risk_coverage_curve_is_the_aurc() -> None:
    y = np.random.default_rng(5).integers(0, 2, 90)
    p = np.round(np.random.default_rng(6).random(90), 1)
    assert float(np.mean(risk_coverage_curve(y, p).risk)) == pytest.approx(aurc(y, p).value, abs=1e-12)
