"""The training library: probes fit on one BLAS thread, and give what the estimator gives alone."""

from typing import Any

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from workers import training
from workers.probes import fit_logistic_probe
from workers.splits import stratified_split


def blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray, Any]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 24)).astype(np.float32)
    y = (x @ rng.normal(size=24) + rng.normal(size=300) > 0).astype(np.int64)
    return x, y, stratified_split(y, fractions=(0.6, 0.2, 0.2), seed=0)


def test_a_probe_fits_on_one_blas_thread_and_the_process_keeps_its_own_afterwards(
    data: tuple[np.ndarray, np.ndarray, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = blas_threads()
    seen: list[list[int]] = []

    def recording_fit(*args: Any, **options: Any) -> Any:
        seen.append(blas_threads())
        return fit_logistic_probe(*args, **options)

    monkeypatch.setattr(training, "fit_logistic_probe", recording_fit)
    training.train_probe("logistic", *data, whiten=False, recalibration=None)
    assert seen and all(threads == [1] * len(threads) for threads in seen)
    assert blas_threads() == before


def test_the_probe_is_the_one_the_estimator_fits_with_every_thread(data: tuple[np.ndarray, np.ndarray, Any]) -> None:
    x, y, split = data
    probe, _, search = training.train_probe("logistic", x, y, split, whiten=False, recalibration=None)
    alone, alone_search = fit_logistic_probe(x[split.train], y[split.train], x[split.validation], y[split.validation])
    assert probe.C == alone.C and search["chosen_C"] == alone_search["chosen_C"]
    assert search["validation_log_loss"] == pytest.approx(alone_search["validation_log_loss"])
    np.testing.assert_allclose(probe.decision_function(x), alone.decision_function(x), rtol=1e-5, atol=1e-5)
