"""Probe evaluations through the service: a probe trained on one dataset scored on another,
its report checked against scikit-learn and its confidences against a direct forward pass;
on its own dataset only its test split is scored; bad requests refused naming the field."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score

from tests.api.test_extractions import direct_reference, extract, finished
from tests.api.test_models import register
from tests.api.test_probes import MMLU, shared_rows, train, upload_rows
from tests.conftest import Stack, wait_for_job

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)

CITIES = "geometry_of_truth/cities.jsonl"
NEG_CITIES = "geometry_of_truth/neg_cities.jsonl"


def evaluate(client: Any, probe_id: str, **body: Any) -> dict[str, Any]:
    response = client.post(f"/v1/probes/{probe_id}/evaluations", json=body)
    assert response.status_code == 202, response.json()
    assert response.headers["Location"] == f"/v1/evaluations/{response.json()['evaluation']['id']}"
    job = wait_for_job(client, response.json()["job"]["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    return client.get(f"/v1/evaluations/{job['result']['evaluation_id']}").json()


def stored(stack: Stack, evaluation: dict[str, Any], name: str) -> dict[str, Any]:
    return json.loads((stack.settings.resolved_artifact_dir / "evaluations" / evaluation["id"] / name).read_text())


def test_a_probe_scored_on_another_dataset_reports_what_scikit_learn_and_a_direct_forward_give(
    stack: Stack, tiny_llama: Path
) -> None:
    model = register(stack.client, tiny_llama).json()
    cities = upload_rows(stack.client, shared_rows(CITIES, 120), "cities-120")
    negated_rows = shared_rows(NEG_CITIES, 60)
    negated = upload_rows(stack.client, negated_rows, "neg-cities-60")
    probe = train(stack.client, model=model["id"], dataset=cities["id"], layers=[2], recalibration="platt")["probes"][0]

    evaluation = evaluate(stack.client, probe["id"], dataset=negated["id"])
    assert evaluation["status"] == "succeeded" and evaluation["rows"] == "all" and evaluation["n"] == 60
    assert evaluation["adapter_id"] is None and evaluation["prompt_format"] == "raw"
    predictions = stored(stack, evaluation, "predictions.json")
    y, p = np.array(predictions["labels"]), np.array(predictions["confidences"])
    assert y.tolist() == [row["label"] for row in negated_rows]

    # the probe applied by hand to states from a direct forward pass gives the same confidences
    from workers.probes import load_probe, probability_of_correct

    trained, recalibrator = load_probe(stack.settings.resolved_artifact_dir / "probes" / probe["id"])
    states = direct_reference(tiny_llama, [row["text"] for row in negated_rows], [2])[:, 0]
    np.testing.assert_allclose(p, probability_of_correct(trained, recalibrator, states), atol=1e-5)

    report = stack.client.get(f"/v1/evaluations/{evaluation['id']}/report").json()
    assert report["evaluation"]["id"] == evaluation["id"] and report["report"]["n"] == 60
    assert report["report"]["metrics"]["auroc"]["value"] == pytest.approx(roc_auc_score(y, p))
    assert report["report"]["metrics"]["brier"]["value"] == pytest.approx(brier_score_loss(y, p))
    assert evaluation["metrics"]["auroc"]["value"] == pytest.approx(roc_auc_score(y, p))
    assert report["baseline"] is None and report["uncalibrated"] is not None  # a Platt-recalibrated probe
    # beside it, the model asked whether each statement is true, scored on the same rows
    p_true = np.array(predictions["baselines"]["p_true"])
    assert report["baselines"]["p_true"]["metrics"]["auroc"]["value"] == pytest.approx(roc_auc_score(y, p_true))
    versus = report["versus_baselines"]["p_true"]["auroc"]
    assert versus["value"] == pytest.approx(roc_auc_score(y, p) - roc_auc_score(y, p_true))
    assert versus["better"] == "higher" and versus["verdict"] in {
        "probe better",
        "baseline better",
        "no clear difference",
    }
    raw = trained.predict_proba(states)[:, 1]
    assert report["uncalibrated"]["metrics"]["brier"]["value"] == pytest.approx(brier_score_loss(y, raw), abs=1e-6)

    # the states went into the cache: the same texts at the same layer run no forward pass
    again = finished(stack.client, extract(stack.client, model["id"], dataset=negated["id"], layers=[2]))["result"]
    assert again["cache_hits"] == 60 and again["batches_run"] == 0

    listed = stack.client.get(f"/v1/probes/{probe['id']}/evaluations").json()
    assert [item["id"] for item in listed["items"]] == [evaluation["id"]]
    svg = stack.client.get(f"/v1/evaluations/{evaluation['id']}/report.svg")
    assert svg.headers["content-type"].startswith("image/svg+xml") and "<svg" in svg.text
    png = stack.client.get(f"/v1/evaluations/{evaluation['id']}/report.png")
    assert png.content.startswith(b"\x89PNG")
    html = stack.client.get(f"/v1/evaluations/{evaluation['id']}/report.html").text
    assert 'id="metrics"' in html and negated["id"] in html and cities["id"] in html


def test_on_its_own_dataset_a_probe_is_scored_on_its_test_split_only_and_gets_its_own_numbers(
    stack: Stack, tiny_llama: Path
) -> None:
    model = register(stack.client, tiny_llama).json()
    cities = upload_rows(stack.client, shared_rows(CITIES, 120), "cities-120")
    probe = train(stack.client, model=model["id"], dataset=cities["id"], layers=[1])["probes"][0]
    evaluation = evaluate(stack.client, probe["id"], dataset=cities["id"])
    assert evaluation["rows"] == "test" and evaluation["n"] == 24
    own = json.loads((stack.settings.resolved_artifact_dir / "probes" / probe["id"] / "predictions.json").read_text())
    predictions = stored(stack, evaluation, "predictions.json")
    assert predictions["indices"] == own["test_indices"] and predictions["labels"] == own["labels"]
    np.testing.assert_allclose(predictions["confidences"], own["confidences"], atol=1e-6)
    for name in ("auroc", "brier", "ece"):  # the same items, seed and resamples: the same values and intervals
        assert evaluation["metrics"][name]["value"] == pytest.approx(probe["metrics"][name]["value"])
        assert evaluation["metrics"][name]["interval"] == pytest.approx(probe["metrics"][name]["interval"])

    # bad requests: each refused naming its field, and nothing queued
    mmlu = upload_rows(
        stack.client,
        [{key: row[key] for key in ("question", "choices", "answer")} for row in shared_rows(MMLU, 20)],
        "mmlu-20",
    )
    chat = upload_rows(
        stack.client,
        [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}],
        "chat",
    )
    refusals = [
        ({"dataset": chat["id"]}, 422, "dataset"),
        ({"dataset": cities["id"], "adapter": "adp_nope"}, 404, None),
        ({"dataset": "dst_nope"}, 404, None),
        ({"dataset": cities["id"], "prompt_format": "Q: {question}\n{choices}"}, 422, "prompt_format"),
        ({"dataset": cities["id"], "extra": 1}, 422, "extra"),
        ({}, 422, "dataset"),
    ]
    for body, status, field in refusals:
        response = stack.client.post(f"/v1/probes/{probe['id']}/evaluations", json=body)
        assert response.status_code == status, (body, response.json())
        if field is not None:
            assert field in json.dumps(response.json()["error"]), (body, response.json())
    assert stack.client.post("/v1/probes/prb_nope/evaluations", json={"dataset": cities["id"]}).status_code == 404
    assert stack.client.get("/v1/evaluations/evl_nope").status_code == 404
    assert [item["id"] for item in stack.client.get(f"/v1/probes/{probe['id']}/evaluations").json()["items"]] == [
        evaluation["id"]
    ]
    # multiple choice is labelled by the evaluated model; a statement probe's `raw` fits it
    mc = evaluate(stack.client, probe["id"], dataset=mmlu["id"])
    assert mc["n"] == 20 and mc["rows"] == "all"
    report = stack.client.get(f"/v1/evaluations/{mc['id']}/report").json()
    assert report["baseline"] is not None and report["baseline"]["n"] == 20
    assert sorted(report["baselines"]) == ["entropy", "margin", "own_probability"]
    assert report["baselines"]["own_probability"] == report["baseline"]
