"""The paired accuracy difference of two models on the same questions, and its interval,
checked against SciPy's paired bootstrap."""

import numpy as np
import pytest
from scipy import stats

from app.calibration.reporting import paired_rate_difference


def test_the_paired_difference_and_its_interval_match_scipys_paired_percentile_bootstrap() -> None:
    rng = np.random.default_rng(7)
    a = (rng.random(400) < 0.4).astype(int)
    b = np.where(rng.random(400) < 0.8, a, 1 - a)  # mostly the same answers: pairing narrows the interval
    b[:30] = 1
    ours = paired_rate_difference(a, b, resamples=4000, seed=1)
    assert ours["value"] == pytest.approx(b.mean() - a.mean())
    reference = stats.bootstrap(
        (a, b),
        lambda x, y: np.mean(y - x),
        paired=True,
        vectorized=False,
        n_resamples=4000,
        method="percentile",
        random_state=2,
    ).confidence_interval
    assert ours["interval"] == pytest.approx([reference.low, reference.high], abs=0.01)
    unpaired_width = 2 * 1.96 * np.sqrt(a.var() / 400 + b.var() / 400)
    assert ours["interval"][1] - ours["interval"][0] < unpaired_width


def test_outcomes_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="same items"):
        paired_rate_difference([1, 0], [1])
