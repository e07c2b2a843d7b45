"""Layer sweeps drawn: a probe run's page shows test AUROC and ECE against the layer, a curve
per method with interval bands, and every probe's metrics; the figure plots exactly the
probes' own numbers."""

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.calibration.sweeps import sweep_figure
from tests.api.test_models import register
from tests.api.test_probes import shared_rows, train, upload_rows
from tests.conftest import Stack


def estimate(value: float | None, low: float, high: float) -> dict[str, Any]:
    return {"value": value, "interval": [low, high]}


def test_the_sweep_figure_plots_each_curves_values_bands_and_chosen_layer() -> None:
    curves = {
        "logistic": {
            0: {"auroc": estimate(0.5, 0.4, 0.6), "ece": estimate(0.2, 0.1, 0.3)},
            4: {"auroc": estimate(0.9, 0.85, 0.95), "ece": estimate(0.05, 0.02, 0.09)},
            2: {"auroc": estimate(0.7, 0.6, 0.8), "ece": estimate(0.1, 0.05, 0.2)},
        },
        "mass_mean": {0: {"auroc": estimate(None, 0, 0), "ece": estimate(0.3, 0.2, 0.4)}},
    }
    figure = sweep_figure(curves, "run", {"logistic": 4})
    auroc_axes, ece_axes = figure.axes[:2]
    logistic, *rest = auroc_axes.get_lines()
    assert np.asarray(logistic.get_xdata()).tolist() == [0, 2, 4] and np.asarray(logistic.get_ydata()).tolist() == [
        0.5,
        0.7,
        0.9,
    ]
    ring = rest[0]
    assert np.asarray(ring.get_xdata()).tolist() == [4] and np.asarray(ring.get_ydata()).tolist() == [0.9]
    band = np.asarray(auroc_axes.collections[0].get_paths()[0].vertices)
    assert band[:, 1].min() == pytest.approx(0.4) and band[:, 1].max() == pytest.approx(0.95)
    assert np.asarray(ece_axes.get_lines()[0].get_ydata()).tolist() == [0.2, 0.1, 0.05]
    mass_mean = next(line for line in auroc_axes.get_lines() if line.get_label() == "mass_mean")
    assert np.isnan(np.asarray(mass_mean.get_ydata(), dtype=float)).all()  # a missing AUROC is a gap, not a zero


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_a_probe_runs_page_shows_the_layer_sweep_and_every_probe(stack: Stack, tiny_llama: Path) -> None:
    dataset = upload_rows(stack.client, shared_rows("geometry_of_truth/cities.jsonl", 120), "cities-120")
    model = register(stack.client, tiny_llama).json()
    run = train(
        stack.client, model=model["id"], dataset=dataset["id"], layers=[0, 1, 2], method=["logistic", "mass_mean"]
    )
    page = stack.client.get(f"/v1/probe-runs/{run['id']}/report.html")
    assert page.status_code == 200 and 'id="layer-sweep"' in page.text and "<svg" in page.text
    rows = re.findall(r"<tr><td>(\d+)</td><td>(\w+)</td><td>[^<]*</td><td>([^<]*)</td>", page.text)
    assert len(rows) == 6
    for layer, method, auroc in rows:
        probe = next(p for p in run["probes"] if p["layer"] == int(layer) and p["method"] == method)
        low, high = probe["metrics"]["auroc"]["interval"]
        assert auroc == f"{probe['metrics']['auroc']['value']:.3f} [{low:.3f}, {high:.3f}]"
    assert "★ best of the run" in page.text
    svg = stack.client.get(f"/v1/probe-runs/{run['id']}/layers.svg")
    assert svg.headers["content-type"].startswith("image/svg+xml") and "<svg" in svg.text
    assert stack.client.get(f"/v1/probe-runs/{run['id']}/layers.png").content.startswith(b"\x89PNG")
    assert stack.client.get("/v1/probe-runs/prr_nope/report.html").status_code == 404
