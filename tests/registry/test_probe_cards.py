"""A probe's exported arrays, applied with numpy as its card's formula says, give the
probabilities the service computes with the probe itself, for every method and
recalibration."""

from pathlib import Path

import numpy as np
import pytest

from app.registry.probe_cards import PROBABILITIES, PROBE_ARRAYS, RECALIBRATION_ARRAYS, exported_arrays
from app.registry.tables import Probe
from app.storage.folder import FolderStore
from tests.workers.test_probes import fitted_probes, fitted_recalibrators, planted_direction_data
from workers import probes


def probability_by_the_card(
    arrays: dict[str, np.ndarray], method: str, recalibration: str | None, h: np.ndarray
) -> np.ndarray:
    """What a user writes from the card's formula, with numpy alone."""
    if method == "logistic":
        logit = (((h - arrays["mean"]) / arrays["scale"]) * arrays["coef"]).sum(axis=1) + arrays["intercept"]
    else:
        logit = arrays["slope"] * (arrays["direction"] * h).sum(axis=1) + arrays["bias"]
    if recalibration is None:
        return 1 / (1 + np.exp(-logit))
    if recalibration == "temperature":
        return 1 / (1 + np.exp(-logit / arrays["temperature"]))
    if recalibration == "platt":
        return 1 / (1 + np.exp(-(arrays["platt_a"] * logit + arrays["platt_b"])))
    return np.interp(logit, arrays["isotonic_x"], arrays["isotonic_y"])


@pytest.mark.parametrize("recalibrator", fitted_recalibrators(), ids=repr)
@pytest.mark.parametrize("probe", fitted_probes(), ids=repr)
def test_exported_arrays_applied_as_the_formula_says_give_the_probes_probabilities(
    tmp_path: Path, probe: probes.Probe, recalibrator: probes.Recalibrator | None
) -> None:
    store = FolderStore(tmp_path)
    probes.save_probe(tmp_path / "probes" / "prb_x", probe, recalibrator)
    method = probe.to_state()[1]["kind"]
    recalibration = recalibrator.kind if recalibrator is not None else None
    arrays = exported_arrays(store, Probe(artifact="probes/prb_x", method=method, recalibration=recalibration))
    assert set(arrays) == set(PROBE_ARRAYS[method]) | set(RECALIBRATION_ARRAYS[recalibration])
    assert all(array.dtype == np.float64 for array in arrays.values())
    h, _, _ = planted_direction_data(200, 12, shift=2.0, seed=21)
    np.testing.assert_allclose(
        probability_by_the_card(arrays, method, recalibration, h.astype(np.float32)),
        probes.probability_of_correct(probe, recalibrator, h.astype(np.float32)),
        rtol=0,
        atol=1e-12,
    )


def test_every_recalibration_has_its_formula_and_arrays() -> None:
    assert set(PROBABILITIES) == set(RECALIBRATION_ARRAYS) == {None} | set(probes.RECALIBRATOR_KINDS)
