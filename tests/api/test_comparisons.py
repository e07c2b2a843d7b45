"""Base against adapters, side by side, on the same texts, split and layer."""

from pathlib import Path
from typing import Any

import pytest

from tests import tiny_models
from tests.api.test_adapters import import_adapter, sources_root
from tests.api.test_datasets import CONVERSATION
from tests.api.test_models import register
from tests.api.test_probes import shared_rows, upload_rows
from tests.conftest import Stack, wait_for_job


def adapter_for(stack: Stack, base: dict[str, Any], tiny_llama: Path, tmp_path: Path, seed: int) -> str:
    folder = sources_root(stack) / f"{tmp_path.name}-adapter-{seed}-{base['dtype']}"
    tiny_models.save_tinker_adapter(folder, tiny_llama, seed=seed)
    job = import_adapter(stack, str(folder), base["id"], name=f"ft-{seed}")
    assert job["status"] == "succeeded", job["error"]
    return job["result"]["adapter_id"]


def compare(stack: Stack, **body: Any) -> dict[str, Any]:
    response = stack.client.post("/v1/comparisons", json=body)
    assert response.status_code == 202, response.json()
    job = wait_for_job(stack.client, response.json()["job"]["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    return stack.client.get(f"/v1/comparisons/{response.json()['comparison']['id']}").json()


def test_a_base_and_two_adapters_give_one_diagram_with_three_curves(
    stack: Stack, tiny_llama: Path, tmp_path: Path
) -> None:
    base = register(stack.client, tiny_llama).json()
    adapters = [adapter_for(stack, base, tiny_llama, tmp_path, seed) for seed in (11, 12)]
    dataset = upload_rows(stack.client, shared_rows("geometry_of_truth/cities.jsonl", 120), "cities-120")
    comparison = compare(stack, model=base["id"], adapters=adapters, dataset=dataset["id"], layers=[1, 2])
    report = comparison["report"]
    assert [variant["label"].split(" ")[0] for variant in report["variants"]] == ["base", "adapter", "adapter"]
    assert report["layer"] in (1, 2) and report["flags"] == []
    for variant in report["variants"]:
        assert variant["report"]["n"] == report["test_n"]
        # each model asked whether each statement is true, beside its own probe
        assert variant["baselines"]["p_true"]["n"] == report["test_n"]
        own, asked = variant["report"]["metrics"]["auroc"], variant["baselines"]["p_true"]["metrics"]["auroc"]
        assert variant["versus_baselines"]["p_true"]["auroc"]["value"] == pytest.approx(own["value"] - asked["value"])
    for label, differences in report["differences"].items():
        base_auroc = report["variants"][0]["report"]["metrics"]["auroc"]["value"]
        own_auroc = next(v for v in report["variants"] if v["label"] == label)["report"]["metrics"]["auroc"]["value"]
        assert differences["auroc"]["value"] == pytest.approx(own_auroc - base_auroc)
        low, high = differences["auroc"]["interval"]
        assert low <= differences["auroc"]["value"] <= high
    assert len(report["cross_transfer"]) == 4
    svg = stack.client.get(f"/v1/comparisons/{comparison['id']}/report.svg").text
    assert all(f'id="curve-{index}"' in svg for index in range(3))
    html = stack.client.get(f"/v1/comparisons/{comparison['id']}/report.html").text
    assert "cross-transfer" in html and 'id="metrics"' in html and 'id="layer-sweep"' in html
    # the layer sweep at the chosen layer is each model's own report: the same probe, items and resamples
    assert sorted(report["per_layer_test"]) == ["1", "2"]
    for variant in report["variants"]:
        at_chosen = report["per_layer_test"][str(report["layer"])][variant["label"]]
        for name in ("auroc", "ece"):
            assert at_chosen[name]["value"] == pytest.approx(variant["report"]["metrics"][name]["value"])
            assert at_chosen[name]["interval"] == pytest.approx(variant["report"]["metrics"][name]["interval"])


def test_an_adapter_for_another_precision_is_refused_unless_flagged(
    stack: Stack, tiny_llama: Path, tmp_path: Path
) -> None:
    base = register(stack.client, tiny_llama).json()
    half = register(stack.client, tiny_llama, dtype="bfloat16").json()
    adapter = adapter_for(stack, half, tiny_llama, tmp_path, seed=21)
    dataset = upload_rows(stack.client, shared_rows("geometry_of_truth/cities.jsonl", 120), "cities-120")
    body = {"model": base["id"], "adapters": [adapter], "dataset": dataset["id"], "layers": [2]}
    refused = stack.client.post("/v1/comparisons", json=body)
    assert refused.status_code == 422 and "bfloat16" in refused.json()["error"]["message"]
    flagged = compare(stack, **body, on_mixed_precision="flag")
    assert any("bfloat16" in flag for flag in flagged["report"]["flags"])


def test_an_adapter_of_another_model_is_refused(api: Any, tiny_llama: Path, tmp_path: Path) -> None:
    from tests.api.test_jobs import run_queued_jobs

    other_folder = tiny_models.save_tiny_llama(tmp_path / "other", seed=5)
    base = register(api, tiny_llama).json()
    other = register(api, other_folder).json()
    settings = api.app.state.settings
    folder = settings.adapter_roots[0] / "for-other"
    tiny_models.save_tinker_adapter(folder, other_folder)
    job_id = api.post(
        "/v1/adapters/import", json={"source": str(folder), "base_model": other["id"], "name": "x"}
    ).json()["job"]["id"]
    run_queued_jobs(settings)
    adapter_id = api.get(f"/v1/jobs/{job_id}").json()["result"]["adapter_id"]
    dataset = upload_rows(api, [{"text": f"statement {i}", "label": i % 2} for i in range(20)], "small")
    response = api.post(
        "/v1/comparisons", json={"model": base["id"], "adapters": [adapter_id], "dataset": dataset["id"], "layers": [1]}
    )
    assert response.status_code == 422 and response.json()["error"]["details"]["field"] == "adapters"


def test_a_chat_dataset_is_a_422_naming_the_dataset_and_queues_nothing(api: Any, tiny_llama: Path) -> None:
    base = register(api, tiny_llama).json()
    dataset = upload_rows(api, [CONVERSATION], "chat")
    response = api.post(
        "/v1/comparisons", json={"model": base["id"], "adapters": ["adp_any"], "dataset": dataset["id"], "layers": [1]}
    )
    assert response.status_code == 422, response.json()
    error = response.json()["error"]
    assert (error["details"]["field"], error["details"]["dataset"]) == ("dataset", dataset["id"])
    assert error["message"] == (
        f"dataset: dataset {dataset['id']} holds chat conversations, which have no labels to probe; "
        "chat datasets are for fine-tuning"
    )
    assert [job["kind"] for job in api.get("/v1/jobs").json()["items"]] == ["model_check"]


def test_a_comparison_report_before_it_is_done_is_a_409(api: Any, tiny_llama: Path, tmp_path: Path) -> None:
    from app.registry.database import create_registry_engine, session_factory
    from app.registry.tables import Comparison

    base = register(api, tiny_llama).json()
    dataset = upload_rows(api, [{"text": f"statement {i}", "label": i % 2} for i in range(20)], "small")
    settings = api.app.state.settings
    with session_factory(create_registry_engine(settings.resolved_database_url)).begin() as session:
        session.add(
            Comparison(
                id="cmp_t",
                job_id=base["check_job_id"],
                model_id=base["id"],
                adapter_ids=[],
                dataset_id=dataset["id"],
                layers=[1],
                method="logistic",
                token_position="last",
            )
        )
    assert api.get("/v1/comparisons/cmp_t/report.svg").status_code == 409
    assert api.get("/v1/comparisons/cmp_t").json()["report"] is None
    assert api.get("/v1/comparisons/cmp_nope").status_code == 404


def test_a_multiple_choice_comparison_reports_each_models_answers_and_the_paired_accuracy_difference(
    stack: Stack, tiny_llama: Path, tmp_path: Path
) -> None:
    base = register(stack.client, tiny_llama).json()
    adapter = adapter_for(stack, base, tiny_llama, tmp_path, seed=31)
    rows = [
        {"question": f"Which number is {n}?", "choices": [str(n), str(n + 1), str(n + 2)], "answer": n % 3}
        for n in range(90)
    ]
    dataset = upload_rows(stack.client, rows, "numbers-90")
    comparison = compare(stack, model=base["id"], adapters=[adapter], dataset=dataset["id"], layers=[2])
    report = comparison["report"]
    (base_label, adapter_label) = [variant["label"] for variant in report["variants"]]
    answers = report["answers"]
    for label in (base_label, adapter_label):
        assert answers[label]["n"] == 90 and sum(answers[label]["picks"].values()) == 90
        assert answers[label]["answers"] == {"A": 30, "B": 30, "C": 30}
    moved = report["answer_differences"][adapter_label]
    accuracy = moved["accuracy"]
    assert accuracy["value"] == pytest.approx(answers[adapter_label]["accuracy"] - answers[base_label]["accuracy"])
    low, high = accuracy["interval"]
    assert low <= accuracy["value"] <= high
    picks = [answers[label]["picks"] for label in (base_label, adapter_label)]
    assert moved["picks_total_variation"] == pytest.approx(
        sum(abs(picks[1][letter] - picks[0][letter]) for letter in "ABC") / 2 / 90
    )
    html = stack.client.get(f"/v1/comparisons/{comparison['id']}/report.html").text
    assert "accuracy minus the base" in html
