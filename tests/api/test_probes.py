"""Probes through the service: training on statements and on the model's own
multiple-choice answers, held-out reports checked against scikit-learn, recalibration,
export with cards, scoring, rendering."""

import io
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

from tests.api.test_models import register
from tests.conftest import SHARED_DATA, Stack, require, wait_for_job

MMLU = "mmlu/mmlu_test_sample.jsonl"
CITIES = "geometry_of_truth/cities.jsonl"
only_sqlite = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)


def upload_rows(client: Any, rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    content = "\n".join(json.dumps(row) for row in rows).encode()
    response = client.post("/v1/datasets", files={"file": (f"{name}.jsonl", content)})
    assert response.status_code in (200, 201), response.json()
    return response.json()


def shared_rows(relative: str, limit: int | None = None) -> list[dict[str, Any]]:
    path = SHARED_DATA / relative
    require(path.is_file(), f"{path} is not here")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def train(client: Any, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/probes", json=body)
    assert response.status_code == 202, response.json()
    job = wait_for_job(client, response.json()["job"]["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    return client.get(f"/v1/probe-runs/{job['result']['run_id']}").json()


def test_statement_probes_train_per_layer_and_method_with_one_best(stack: Stack, tiny_llama: Path) -> None:
    rows = shared_rows("geometry_of_truth/cities.jsonl", 120)
    dataset = upload_rows(stack.client, rows, "cities-120")
    model = register(stack.client, tiny_llama).json()
    run = train(
        stack.client, model=model["id"], dataset=dataset["id"], layers=[1, -1], method=["logistic", "mass_mean"], seed=3
    )
    assert run["status"] == "succeeded"
    assert sorted((p["layer"], p["method"]) for p in run["probes"]) == [
        (1, "logistic"),
        (1, "mass_mean"),
        (2, "logistic"),
        (2, "mass_mean"),
    ]
    best = [p for p in run["probes"] if p["is_best"]]
    assert len(best) == 1 and best[0]["id"] == run["best_probe_id"]
    chosen_on = max(run["probes"], key=lambda p: (p["validation"]["auroc"], -p["validation"]["nll"]))
    assert chosen_on["id"] == run["best_probe_id"]


def test_held_out_metrics_match_scikit_learn_on_the_test_predictions(stack: Stack, tiny_llama: Path) -> None:
    dataset = upload_rows(stack.client, shared_rows("geometry_of_truth/cities.jsonl", 120), "cities-120")
    model = register(stack.client, tiny_llama).json()
    run = train(stack.client, model=model["id"], dataset=dataset["id"], layers=[2], recalibration="temperature")
    probe = run["probes"][0]
    predictions = json.loads(
        (stack.settings.resolved_artifact_dir / "probes" / probe["id"] / "predictions.json").read_text()
    )
    y, p = np.array(predictions["labels"]), np.array(predictions["confidences"])
    assert len(y) == 24  # 20% of 120, stratified
    assert [rows_label for rows_label in y] == [
        [row["label"] for row in shared_rows("geometry_of_truth/cities.jsonl", 120)][i]
        for i in predictions["test_indices"]
    ]
    report = stack.client.get(f"/v1/probes/{probe['id']}/report").json()
    assert report["probe"]["id"] == probe["id"] and report["report"]["n"] == 24
    assert report["report"]["metrics"]["auroc"]["value"] == pytest.approx(roc_auc_score(y, p))
    assert report["report"]["metrics"]["brier"]["value"] == pytest.approx(brier_score_loss(y, p))
    low, high = report["report"]["metrics"]["auroc"]["interval"]
    assert low <= roc_auc_score(y, p) <= high
    assert probe["metrics"]["auroc"]["value"] == pytest.approx(roc_auc_score(y, p))
    assert report["baseline"] is None

    # the model asked whether each statement is true, reported and compared on the same items
    labels = json.loads((stack.settings.resolved_artifact_dir / "probe_runs" / run["id"] / "labels.json").read_text())
    p_true = np.array([labels["baselines"]["p_true"][i] for i in predictions["test_indices"]])
    assert list(report["baselines"]) == list(report["versus_baselines"]) == ["p_true"]
    baseline, versus = report["baselines"]["p_true"], report["versus_baselines"]["p_true"]
    assert baseline["metrics"]["auroc"]["value"] == pytest.approx(roc_auc_score(y, p_true))
    assert baseline["metrics"]["brier"]["value"] == pytest.approx(brier_score_loss(y, p_true))
    assert versus["auroc"]["value"] == pytest.approx(roc_auc_score(y, p) - roc_auc_score(y, p_true))
    assert versus["brier"]["value"] == pytest.approx(brier_score_loss(y, p) - brier_score_loss(y, p_true))
    low, high = versus["auroc"]["interval"]
    assert low <= versus["auroc"]["value"] <= high and versus["auroc"]["better"] == "higher"
    expected = "probe better" if low > 0 else "baseline better" if high < 0 else "no clear difference"
    assert versus["auroc"]["verdict"] == expected


def test_the_report_route_documents_named_report_schemas_that_a_real_report_validates_against_as_stored(
    stack: Stack, tiny_llama: Path
) -> None:
    import jsonschema_rs

    dataset = upload_rows(stack.client, shared_rows("geometry_of_truth/cities.jsonl", 120), "cities-120")
    model = register(stack.client, tiny_llama).json()
    probe = train(stack.client, model=model["id"], dataset=dataset["id"], layers=[2])["probes"][0]
    document = stack.client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    answer = document["paths"]["/v1/probes/{probe_id}/report"]["get"]["responses"]["200"]["content"]
    assert answer["application/json"]["schema"] == {"$ref": "#/components/schemas/ProbeReportOut"}
    assert schemas["ProbeReportOut"]["properties"]["report"] == {"$ref": "#/components/schemas/CalibrationReport"}
    assert set(schemas["CalibrationReport"]["required"]) == {
        "n",
        "base_rate",
        "metrics",
        "bins",
        "histogram",
        "bootstrap",
    }
    assert schemas["CalibrationReport"]["properties"]["metrics"]["additionalProperties"] == {
        "$ref": "#/components/schemas/Estimate"
    }
    assert {"value", "interval", "label", "estimator"} <= set(schemas["Estimate"]["properties"])
    assert "ComparisonReport" in json.dumps(schemas["ComparisonOut"]["properties"]["report"])

    served = stack.client.get(f"/v1/probes/{probe['id']}/report")
    validator = jsonschema_rs.validator_for(
        {"$ref": "#/components/schemas/ProbeReportOut", "components": document["components"]}
    )
    errors = [error.message for error in validator.iter_errors(served.json())]
    assert not errors, errors
    stored = json.loads((stack.settings.resolved_artifact_dir / "probes" / probe["id"] / "report.json").read_text())
    # served as stored: the same keys in the same order, the same nulls and numbers
    assert json.dumps(served.json()["report"]) == json.dumps(stored["probe"])
    assert served.json()["baseline"] is None and stored["baseline"] is None
    assert served.json()["uncalibrated"] is None and stored["uncalibrated"] is None  # not recalibrated
    assert json.dumps(served.json()["versus_baselines"]) == json.dumps(stored["versus_baselines"])


@pytest.mark.slow
def test_minilm_probes_find_the_truth_of_city_statements_and_not_of_shuffled_labels(stack: Stack) -> None:
    from tests.tiny_models import minilm_folder

    rows = shared_rows("geometry_of_truth/cities.jsonl")
    model = register(stack.client, minilm_folder()).json()
    layers = {"layers": [3, 4, 5], "token_position": "last"}
    real = train(stack.client, model=model["id"], dataset=upload_rows(stack.client, rows, "cities")["id"], **layers)
    labels = [row["label"] for row in rows]
    random.Random(0).shuffle(labels)
    shuffled_rows = [{"text": row["text"], "label": label} for row, label in zip(rows, labels, strict=True)]
    shuffled = train(
        stack.client,
        model=model["id"],
        dataset=upload_rows(stack.client, shuffled_rows, "cities-shuffled")["id"],
        **layers,
    )
    real_best = next(p for p in real["probes"] if p["is_best"])["metrics"]["auroc"]
    shuffled_best = next(p for p in shuffled["probes"] if p["is_best"])["metrics"]["auroc"]
    assert real_best["interval"][0] > 0.6, real_best  # 300 held-out statements: well clear of chance
    assert (
        abs(shuffled_best["value"] - 0.5) < 0.1 and shuffled_best["interval"][0] < 0.5 < shuffled_best["interval"][1]
    ), shuffled_best


def test_multiple_choice_probes_use_the_models_own_labels_and_report_its_confidence(
    stack: Stack, tiny_llama: Path
) -> None:
    rows = shared_rows("mmlu/mmlu_test_sample.jsonl", 80)
    dataset = upload_rows(
        stack.client, [{key: row[key] for key in ("question", "choices", "answer")} for row in rows], "mmlu-80"
    )
    model = register(stack.client, tiny_llama).json()
    run = train(stack.client, model=model["id"], dataset=dataset["id"], layers=[2])
    probe = run["probes"][0]
    labels = json.loads((stack.settings.resolved_artifact_dir / "probe_runs" / run["id"] / "labels.json").read_text())
    assert labels["labels"] == [
        int(chosen == row["answer"]) for chosen, row in zip(labels["chosen"], rows, strict=True)
    ]
    report = stack.client.get(f"/v1/probes/{probe['id']}/report").json()
    test = labels["split"]["test"]
    y = np.array([labels["labels"][i] for i in test])
    baseline = np.array([labels["baseline_confidence"][i] for i in test])
    assert report["baseline"]["metrics"]["brier"]["value"] == pytest.approx(brier_score_loss(y, baseline))
    assert list(report["baselines"]) == ["own_probability", "entropy", "margin"]
    assert report["baselines"]["own_probability"] == report["baseline"]
    predictions = json.loads(
        (stack.settings.resolved_artifact_dir / "probes" / probe["id"] / "predictions.json").read_text()
    )
    p = np.array(predictions["confidences"])
    for name in ("entropy", "margin"):
        confidence = np.array([labels["baselines"][name][i] for i in test])
        assert report["baselines"][name]["metrics"]["auroc"]["value"] == pytest.approx(roc_auc_score(y, confidence))
        assert report["versus_baselines"][name]["brier"]["value"] == pytest.approx(
            brier_score_loss(y, p) - brier_score_loss(y, confidence)
        )


def test_a_multiple_choice_run_reports_the_models_accuracy_and_the_letters_it_picked(
    stack: Stack, tiny_llama: Path
) -> None:
    rows = [{key: row[key] for key in ("question", "choices", "answer")} for row in shared_rows(MMLU, 80)]
    rows[0]["choices"] = rows[0]["choices"][:3]  # one question with three choices: still four letters counted
    rows[0]["answer"] = min(rows[0]["answer"], 2)
    dataset = upload_rows(stack.client, rows, "mmlu-80")
    model = register(stack.client, tiny_llama).json()
    response = stack.client.post("/v1/probes", json={"model": model["id"], "dataset": dataset["id"], "layers": [2]})
    job = wait_for_job(stack.client, response.json()["job"]["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    run_id = job["result"]["run_id"]
    labels = json.loads((stack.settings.resolved_artifact_dir / "probe_runs" / run_id / "labels.json").read_text())
    picked = Counter("ABCD"[index] for index in labels["chosen"])
    gold = Counter("ABCD"[row["answer"]] for row in rows)
    correct = sum(chosen == row["answer"] for chosen, row in zip(labels["chosen"], rows, strict=True))
    assert job["result"]["self_labels"] == {
        "n": 80,
        "accuracy": pytest.approx(correct / 80),
        "picks": {letter: picked[letter] for letter in "ABCD"},
        "answers": {letter: gold[letter] for letter in "ABCD"},
    }
    assert list(job["result"]["self_labels"]["picks"]) == ["A", "B", "C", "D"]


def test_a_statement_run_has_no_self_labels(stack: Stack, tiny_llama: Path) -> None:
    dataset = upload_rows(stack.client, shared_rows("geometry_of_truth/cities.jsonl", 120), "cities-120")
    model = register(stack.client, tiny_llama).json()
    response = stack.client.post("/v1/probes", json={"model": model["id"], "dataset": dataset["id"], "layers": [1]})
    job = wait_for_job(stack.client, response.json()["job"]["id"], timeout=300)
    assert job["status"] == "succeeded" and "self_labels" not in job["result"], job


def test_scoring_gives_the_probes_confidence_for_new_texts(stack: Stack, tiny_llama: Path) -> None:
    rows = shared_rows("geometry_of_truth/cities.jsonl", 120)
    dataset = upload_rows(stack.client, rows, "cities-120")
    model = register(stack.client, tiny_llama).json()
    probe = train(stack.client, model=model["id"], dataset=dataset["id"], layers=[2])["probes"][0]
    predictions = json.loads(
        (stack.settings.resolved_artifact_dir / "probes" / probe["id"] / "predictions.json").read_text()
    )
    texts = [rows[i]["text"] for i in predictions["test_indices"][:5]]
    response = stack.client.post(f"/v1/probes/{probe['id']}/score", json={"texts": texts})
    assert response.status_code == 200, response.json()
    np.testing.assert_allclose(response.json()["confidences"], predictions["confidences"][:5], atol=1e-6)


def test_reports_render_as_svg_png_and_html(stack: Stack, tiny_llama: Path) -> None:
    dataset = upload_rows(stack.client, shared_rows("geometry_of_truth/cities.jsonl", 120), "cities-120")
    model = register(stack.client, tiny_llama).json()
    probe = train(stack.client, model=model["id"], dataset=dataset["id"], layers=[1])["probes"][0]
    svg = stack.client.get(f"/v1/probes/{probe['id']}/report.svg")
    assert svg.headers["content-type"].startswith("image/svg+xml") and "<svg" in svg.text
    png = stack.client.get(f"/v1/probes/{probe['id']}/report.png")
    assert png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG")
    html = stack.client.get(f"/v1/probes/{probe['id']}/report.html")
    assert 'id="metrics"' in html.text and 'id="reliability-diagram"' in html.text
    assert 'id="versus-baselines"' in html.text and "baseline: P(True)" in html.text
    assert 'id="curve-1"' in svg.text  # the baseline's curve beside the probe's

    # each is rendered once and kept beside the report: a later request reads the kept copy
    from app.api.render_cache import RENDER_VERSION
    from app.storage import open_store

    store = open_store(stack.settings)
    folder = f"probes/{probe['id']}/rendered/v{RENDER_VERSION}"
    assert (
        store.read_bytes(f"{folder}/report.png") == png.content
        and store.read_bytes(f"{folder}/report.html") == html.content
    )
    store.write_bytes(f"{folder}/report.svg", b"<svg>kept</svg>")
    assert stack.client.get(f"/v1/probes/{probe['id']}/report.svg").text == "<svg>kept</svg>"
    store.delete(f"{folder}/report.svg")
    assert stack.client.get(f"/v1/probes/{probe['id']}/report.svg").text == svg.text  # rendered again, the same

    # the probe's files removed from under its row: the record still reads, its data is gone (410, not a 500)
    store.delete_prefix(f"probes/{probe['id']}")
    assert stack.client.get(f"/v1/probes/{probe['id']}").status_code == 200
    assert stack.client.get(f"/v1/probes/{probe['id']}/card").status_code == 200  # the registry's alone
    weights = stack.client.get(f"/v1/probes/{probe['id']}/weights")
    assert (weights.status_code, weights.json()["error"]["code"]) == (410, "artifact_missing")
    for suffix in ["report", "report.svg", "report.png", "report.html"]:
        response = stack.client.get(f"/v1/probes/{probe['id']}/{suffix}")
        assert response.status_code == 410 and response.json()["error"]["code"] == "artifact_missing", (
            suffix,
            response.text,
        )
        assert response.json()["error"]["details"]["key"] == f"probes/{probe['id']}/report.json"


# --- recalibrated probes, before and after; exported probes and their cards -----------------


@dataclass
class RecalibratedRun:
    model: dict[str, Any]
    dataset: dict[str, Any]
    probes: list[dict[str, Any]]
    test_states: np.ndarray  # (test texts, hidden): the test split's states at the probes' layer, extracted anew


@pytest.fixture(scope="module")
def isotonic_run(stack: Stack, tiny_llama_template: Path) -> RecalibratedRun:
    """A logistic and a mass-mean probe at layer 2, recalibrated by isotonic regression, and
    the hidden states of their test texts as a user gets them: through an extraction."""
    rows = shared_rows(CITIES, 120)
    dataset = upload_rows(stack.client, rows, "cities-120")
    model = register(stack.client, tiny_llama_template).json()
    run = train(
        stack.client,
        model=model["id"],
        dataset=dataset["id"],
        layers=[2],
        method=["logistic", "mass_mean"],
        recalibration="isotonic",
    )
    test_indices = predictions_of(stack, run["probes"][0])["test_indices"]
    response = stack.client.post(
        "/v1/extractions",
        json={"model": model["id"], "texts": [rows[i]["text"] for i in test_indices], "layers": [2]},
    )
    assert response.status_code == 202, response.json()
    extraction = response.json()["extraction"]
    assert wait_for_job(stack.client, extraction["job_id"])["status"] == "succeeded"
    states = np.load(io.BytesIO(stack.client.get(f"/v1/extractions/{extraction['id']}/hidden-states").content))
    return RecalibratedRun(model=model, dataset=dataset, probes=run["probes"], test_states=states[:, 0])


def predictions_of(stack: Stack, probe: dict[str, Any]) -> dict[str, Any]:
    path = stack.settings.resolved_artifact_dir / "probes" / probe["id"] / "predictions.json"
    return dict(json.loads(path.read_text()))


@only_sqlite
def test_a_recalibrated_probes_report_gives_its_raw_probabilities_calibration_as_scikit_learn_computes_it(
    stack: Stack, isotonic_run: RecalibratedRun
) -> None:
    from workers.probes import load_probe

    for probe in isotonic_run.probes:
        fitted, recalibrator = load_probe(stack.settings.resolved_artifact_dir / "probes" / probe["id"])
        assert recalibrator is not None and recalibrator.kind == "isotonic"
        raw = fitted.predict_proba(isotonic_run.test_states)[:, 1]
        y = np.array(predictions_of(stack, probe)["labels"])
        served = stack.client.get(f"/v1/probes/{probe['id']}/report").json()
        before = served["uncalibrated"]["metrics"]
        assert served["uncalibrated"]["n"] == len(y) == 24
        assert before["auroc"]["value"] == pytest.approx(roc_auc_score(y, raw))
        assert before["brier"]["value"] == pytest.approx(brier_score_loss(y, raw))
        assert before["nll"]["value"] == pytest.approx(log_loss(y, raw))
        after = np.array(predictions_of(stack, probe)["confidences"])
        assert served["report"]["metrics"]["brier"]["value"] == pytest.approx(brier_score_loss(y, after))
        assert not np.allclose(raw, after)  # two different sets of probabilities, each reported


@only_sqlite
def test_a_recalibrated_probes_pictures_draw_it_before_and_after_its_recalibration(
    stack: Stack, isotonic_run: RecalibratedRun
) -> None:
    import re

    probe = isotonic_run.probes[0]
    svg = stack.client.get(f"/v1/probes/{probe['id']}/report.svg").text
    # the probe, the probe before its recalibration, and the model's own P(True)
    assert re.findall(r'id="(curve-\d+)"', svg) == ["curve-0", "curve-1", "curve-2"]
    html = stack.client.get(f"/v1/probes/{probe['id']}/report.html").text
    assert '<th scope="col">probe before isotonic recalibration</th>' in html
    assert '<th scope="col">baseline: P(True)</th>' in html


def probability_by_the_card(arrays: dict[str, np.ndarray], card: dict[str, Any], h: np.ndarray) -> np.ndarray:
    """P(correct) as a user computes it from the exported arrays and the card's formula."""
    h = h.astype(np.float64)
    if card["method"] == "logistic":
        logit = (((h - arrays["mean"]) / arrays["scale"]) * arrays["coef"]).sum(axis=1) + arrays["intercept"]
    else:
        logit = arrays["slope"] * (arrays["direction"] * h).sum(axis=1) + arrays["bias"]
    assert card["recalibration"] == "isotonic"
    return np.interp(logit, arrays["isotonic_x"], arrays["isotonic_y"])


@only_sqlite
def test_exported_weights_applied_with_numpy_give_the_services_own_confidences(
    stack: Stack, isotonic_run: RecalibratedRun, tmp_path: Path
) -> None:
    from safetensors.numpy import load_file

    assert sorted(probe["method"] for probe in isotonic_run.probes) == ["logistic", "mass_mean"]
    for probe in isotonic_run.probes:
        response = stack.client.get(f"/v1/probes/{probe['id']}/weights")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/octet-stream"
        assert response.headers["content-disposition"] == f'attachment; filename="{probe["id"]}.safetensors"'
        path = tmp_path / f"{probe['id']}.safetensors"
        path.write_bytes(response.content)
        arrays = load_file(path)
        with safe_open(path, framework="np") as exported:
            card = json.loads(exported.metadata()["card"])
        assert set(arrays) == set(card["arrays"])
        np.testing.assert_allclose(
            probability_by_the_card(arrays, card, isotonic_run.test_states),
            predictions_of(stack, probe)["confidences"],
            rtol=0,
            atol=1e-6,
        )


@only_sqlite
def test_a_probes_card_names_what_it_reads_and_was_trained_on_and_is_the_one_in_its_weights(
    stack: Stack, isotonic_run: RecalibratedRun, tmp_path: Path
) -> None:
    probe = isotonic_run.probes[0]
    card = stack.client.get(f"/v1/probes/{probe['id']}/card").json()
    path = tmp_path / "probe.safetensors"
    path.write_bytes(stack.client.get(f"/v1/probes/{probe['id']}/weights").content)
    with safe_open(path, framework="np") as exported:
        assert json.loads(exported.metadata()["card"]) == card
    model = stack.client.get(f"/v1/models/{isotonic_run.model['id']}").json()
    assert card["model"] == {
        key: model[key]
        for key in (
            "id",
            "name",
            "source",
            "revision",
            "fingerprint",
            "dtype",
            "quantization",
            "num_layers",
            "hidden_size",
        )
    }
    assert card["dataset"] == {key: isotonic_run.dataset[key] for key in ("id", "name", "sha256", "kind", "rows")}
    assert card["adapter"] is None
    assert (card["probe_id"], card["run_id"], card["method"], card["layer"]) == (
        probe["id"],
        probe["run_id"],
        probe["method"],
        2,
    )
    assert (card["token_position"], card["max_length"], card["prompt_format"]) == ("last", None, "raw")
    assert card["split"] == {"train": 0.6, "validation": 0.2, "test": 0.2, "seed": 0}
    assert card["recalibration"] == "isotonic"
    assert card["metrics"] == probe["metrics"] and card["created_at"] == probe["created_at"]
    assert "decoder block" in card["layer_convention"] and "last real" in card["hidden_state"]
    assert "isotonic_x" in card["formula"] and "coef" in card["formula"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_card_and_weights_of_an_unknown_probe_are_404s(api: Any) -> None:
    for suffix in ["card", "weights"]:
        response = api.get(f"/v1/probes/prb_nope/{suffix}")
        assert (response.status_code, response.json()["error"]["code"]) == (404, "not_found")


# --- refused at once --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"layers": [9]}, 422, "layers"),
        ({"split": {"train": 0.5, "validation": 0.2, "test": 0.2}}, 422, "split"),
        ({"dataset": "dst_nope"}, 404, None),
        ({"method": ["logistic", "logistic"]}, 422, "method"),
        ({"method": "svm"}, 422, "method"),
    ],
)
def test_a_bad_training_request_is_refused_naming_the_field(
    api: Any, tiny_llama: Path, body: dict[str, Any], status: int, field: str | None
) -> None:
    dataset = upload_rows(api, [{"text": f"statement {i}", "label": i % 2} for i in range(20)], "small")
    model = register(api, tiny_llama).json()
    response = api.post("/v1/probes", json={"model": model["id"], "dataset": dataset["id"], "layers": [1]} | body)
    assert response.status_code == status, response.json()
    if field:
        error = response.json()["error"]
        assert field in {error["details"].get("field")} | {
            item["field"].split(".")[0] for item in error["details"].get("fields", [])
        }
    assert [job["kind"] for job in api.get("/v1/jobs").json()["items"]] == ["model_check"]


def test_a_dataset_too_small_to_split_is_a_422(api: Any, tiny_llama: Path) -> None:
    dataset = upload_rows(api, [{"text": f"statement {i}", "label": int(i == 0)} for i in range(10)], "lopsided")
    model = register(api, tiny_llama).json()
    response = api.post("/v1/probes", json={"model": model["id"], "dataset": dataset["id"], "layers": [1]})
    assert response.status_code == 422 and response.json()["error"]["details"]["field"] == "dataset"


def test_a_chat_dataset_is_a_422_naming_the_dataset_and_queues_nothing(api: Any, tiny_llama: Path) -> None:
    from tests.api.test_datasets import CONVERSATION

    dataset = upload_rows(api, [CONVERSATION], "chat")
    model = register(api, tiny_llama).json()
    response = api.post("/v1/probes", json={"model": model["id"], "dataset": dataset["id"], "layers": [1]})
    assert response.status_code == 422, response.json()
    error = response.json()["error"]
    assert (error["details"]["field"], error["details"]["dataset"]) == ("dataset", dataset["id"])
    assert error["message"] == (
        f"dataset: dataset {dataset['id']} holds chat conversations, which have no labels to probe; "
        "chat datasets are for fine-tuning"
    )
    assert [job["kind"] for job in api.get("/v1/jobs").json()["items"]] == ["model_check"]


def test_scoring_with_no_worker_in_time_answers_202_with_the_job(api: Any, settings: Any, tiny_llama: Path) -> None:
    from app.registry.database import create_registry_engine, session_factory
    from app.registry.tables import Probe, ProbeRun

    model = register(api, tiny_llama).json()
    dataset = upload_rows(api, [{"text": f"statement {i}", "label": i % 2} for i in range(20)], "small")
    with session_factory(create_registry_engine(settings.resolved_database_url)).begin() as session:
        session.add(
            ProbeRun(
                id="prr_t",
                job_id="job_t",
                model_id=model["id"],
                dataset_id=dataset["id"],
                layers=[1],
                methods=["logistic"],
                token_position="last",
                split={},
            )
        )
        session.flush()
        session.add(
            Probe(
                id="prb_t",
                run_id="prr_t",
                model_id=model["id"],
                dataset_id=dataset["id"],
                layer=1,
                method="logistic",
                token_position="last",
                artifact="probes/prb_t",
                validation={},
                metrics={},
            )
        )
    response = api.post("/v1/probes/prb_t/score", json={"texts": ["Paris is in France."], "timeout_s": 0.2})
    assert response.status_code == 202
    assert response.json()["job"]["kind"] == "probe_scoring"


def test_scoring_an_unknown_probe_is_a_404(api: Any) -> None:
    assert api.post("/v1/probes/prb_nope/score", json={"texts": ["x"]}).status_code == 404
