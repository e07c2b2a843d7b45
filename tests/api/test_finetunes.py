"""Fine-tunes through the API: a dataset becomes a registered adapter with its provenance and
loss history; bad requests are 422s naming the field and leave nothing behind; a worker
killed mid-run has its job resumed from the last checkpoint; cancel stops the run."""

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from app.registry.database import create_registry_engine, session_factory
from app.registry.tables import Finetune
from app.settings import Settings
from app.storage import open_store
from tests import tiny_models
from tests.api.test_jobs import run_queued_jobs
from tests.api.test_models import register
from tests.api.test_probes import upload_rows
from tests.conftest import start_worker, stop_process, wait_for_job, wait_until
from workers.finetune import latest_checkpoint

# the registry's backends are covered by the tests that reach the registry; the ones that run
# whole fine-tunes under a worker's faults run once, on SQLite
only_sqlite = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

QUESTIONS: list[dict[str, Any]] = [
    {"question": f"Which number is {n}?", "choices": [str(n), str(n + 1), str(n + 2)], "answer": n % 3}
    for n in range(40)
]


def checked_model(api: Any, folder: Path, **extra: Any) -> dict[str, Any]:
    model = register(api, folder, **extra).json()
    run_queued_jobs(api.app.state.settings)
    return api.get(f"/v1/models/{model['id']}").json()


def finetune_body(model: dict[str, Any], dataset: dict[str, Any], **training: Any) -> dict[str, Any]:
    return {
        "base_model": model["id"],
        "dataset": dataset["id"],
        "name": "numbers-sft",
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "training": {"steps": 6, "batch_size": 4, "learning_rate": 5e-3, "validation_every": 3, "checkpoint_every": 2}
        | training,
    }


def test_a_finetune_registers_an_adapter_whose_weights_give_the_reported_validation_loss(
    api: Any, tiny_llama: Path
) -> None:
    model = checked_model(api, tiny_llama)
    assert model["linear_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    dataset = upload_rows(api, QUESTIONS, "numbers")
    response = api.post("/v1/finetunes", json=finetune_body(model, dataset))
    assert response.status_code == 202, response.json()
    created = response.json()
    assert response.headers["location"] == f"/v1/finetunes/{created['finetune']['id']}"
    run_queued_jobs(api.app.state.settings)
    job = api.get(f"/v1/jobs/{created['job']['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"]["details"]["final_loss"] == job["result"]["final_loss"] > 0

    finetune = api.get(f"/v1/finetunes/{created['finetune']['id']}").json()
    assert finetune["status"] == "succeeded" and finetune["adapter_id"] == job["result"]["adapter_id"]
    assert finetune["settings"]["training"]["steps"] == 6
    assert finetune["settings"]["lora"]["target_modules"] == ["q_proj", "v_proj"]
    summary = finetune["summary"]
    assert summary["examples"] == {"rows": 40, "train": 36, "validation": 4, "left_out": 0}
    assert summary["resumed_from_step"] is None

    history = api.get(f"/v1/finetunes/{finetune['id']}/history").json()["points"]
    assert [point["step"] for point in history] == [1, 2, 3, 4, 5, 6]
    assert [point["step"] for point in history if point.get("validation_loss") is not None] == [3, 6]
    assert history[-1]["validation_loss"] == summary["final_validation_loss"]
    assert all(point["tokens"] == 4 for point in history)  # one answer letter per example
    assert "validation-loss" in api.get(f"/v1/finetunes/{finetune['id']}/loss.svg").text
    assert api.get(f"/v1/finetunes/{finetune['id']}/loss.png").content.startswith(b"\x89PNG")
    page = api.get(f"/v1/finetunes/{finetune['id']}/report.html").text
    assert 'id="loss-curve"' in page and dataset["sha256"][:12] in page

    adapter = api.get(f"/v1/adapters/{finetune['adapter_id']}").json()
    assert adapter["source_kind"] == "finetune" and adapter["source"] == finetune["id"]
    provenance = adapter["training"]["finetune"]
    assert provenance["dataset_sha256"] == dataset["sha256"] and provenance["backend"] == "local"
    assert provenance["settings"]["training"]["learning_rate"] == 5e-3
    assert (adapter["r"], adapter["lora_alpha"]) == (4, 8)
    assert [f["id"] for f in api.get("/v1/finetunes", params={"base_model": model["id"]}).json()["items"]] == [
        finetune["id"]
    ]

    # the registered files, loaded by PEFT directly, give the validation loss the run reported
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.finetuning import completion_loss, held_out, multiple_choice_examples

    store = open_store(api.app.state.settings)
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama), str(store.local_folder(f"adapters/{adapter['identity']}"))
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    examples = multiple_choice_examples(tokenizer, QUESTIONS, "raw", 512).examples
    _, validation = held_out(len(examples), 0.1, 0)
    with torch.no_grad():
        summed, count = completion_loss(tuned, [examples[i] for i in validation], tokenizer.pad_token_id or 0, "cpu")
    assert float(summed) / count == pytest.approx(summary["final_validation_loss"], rel=1e-4)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"lora": {"r": 0}}, "lora.r"),
        ({"lora": {"dropout": 1.5}}, "lora.dropout"),
        ({"training": {"learning_rate": -1e-4}}, "training.learning_rate"),
        ({"training": {"steps": 5, "epochs": 1}}, "training"),
        ({"training": {"batch_size": 0}}, "training.batch_size"),
        ({"training": {"steps": 4, "warmup_steps": 4}}, "training.warmup_steps"),
        ({"training": {"validation_fraction": 0.9}}, "training.validation_fraction"),
        ({"lora": {"target_modules": ["c_attn"]}}, "lora.target_modules"),
        ({"lora": {"target_modules": ["q_proj", "q_proj"]}}, "lora.target_modules"),
        ({"prompt_format": "chat"}, "prompt_format"),
        ({"prompt_format": "{text}"}, "prompt_format"),
        ({"backend": "colab"}, "backend"),
        ({"learning_rate": 0.1}, "learning_rate"),
    ],
)
def test_a_bad_finetune_request_is_a_422_naming_the_field_and_leaves_nothing(
    api: Any, tiny_llama: Path, change: dict[str, Any], field: str
) -> None:
    model = checked_model(api, tiny_llama)  # checked: its linear layers are known
    dataset = upload_rows(api, QUESTIONS, "numbers")
    body = {"base_model": model["id"], "dataset": dataset["id"], "name": "x"}
    for key, value in change.items():
        body[key] = value
    response = api.post("/v1/finetunes", json=body)
    assert response.status_code == 422, response.json()
    error = response.json()["error"]
    named = error["details"].get("field") or error["details"]["fields"][0]["field"]
    assert named == field, error
    assert api.get("/v1/finetunes").json()["items"] == []


def test_a_finetune_of_a_missing_dataset_or_an_encoder_is_refused(api: Any, tmp_path: Path) -> None:
    encoder = checked_model(api, tiny_models.save_tiny_bert(tmp_path / "bert"))
    dataset = upload_rows(api, QUESTIONS, "numbers")
    refused = api.post("/v1/finetunes", json={"base_model": encoder["id"], "dataset": dataset["id"], "name": "x"})
    assert refused.status_code == 422 and refused.json()["error"]["details"]["field"] == "base_model"
    missing = api.post("/v1/finetunes", json={"base_model": encoder["id"], "dataset": "dst_nope", "name": "x"})
    assert missing.status_code in (404, 422)
    assert api.get("/v1/finetunes/ft_nope").status_code == 404


def _finetune_row(settings: Settings, finetune_id: str) -> Finetune:
    with session_factory(create_registry_engine(settings.resolved_database_url))() as session:
        row = session.get(Finetune, finetune_id)
        assert row is not None
        return row


@only_sqlite
def test_a_worker_killed_mid_finetune_has_its_job_resumed_from_the_last_checkpoint(
    api: Any, settings: Settings, tiny_llama: Path
) -> None:
    retrying = settings.model_copy(update={"heartbeat_ttl_s": 2.0, "job_max_attempts": 2})
    model = register(api, tiny_llama).json()
    dataset = upload_rows(api, QUESTIONS, "numbers")
    body = finetune_body(model, dataset, steps=400, batch_size=2, checkpoint_every=10, validation_every=50)
    created = api.post("/v1/finetunes", json=body).json()
    job_id, finetune_id = created["job"]["id"], created["finetune"]["id"]
    doomed = start_worker(retrying, f"doomed-{retrying.queue_prefix}")
    try:
        wait_until(
            lambda: api.get(f"/v1/jobs/{job_id}").json()["progress"]["done"] > 25,
            120,
            "the fine-tune to pass two checkpoints",
            interval=0.05,
        )
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
    finally:
        stop_process(doomed)
    store = open_store(retrying)
    checkpoint = latest_checkpoint(store, _finetune_row(retrying, finetune_id))
    assert checkpoint is not None and checkpoint >= 20 and checkpoint % 10 == 0
    survivor = start_worker(retrying, f"survivor-{retrying.queue_prefix}")
    try:
        job = wait_for_job(api, job_id, timeout=300)
    finally:
        stop_process(survivor)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2
    assert job["result"]["resumed_from_step"] == checkpoint
    history = api.get(f"/v1/finetunes/{finetune_id}/history").json()["points"]
    assert [point["step"] for point in history] == list(range(1, 401))
    assert latest_checkpoint(store, _finetune_row(retrying, finetune_id)) is None  # removed once registered


@only_sqlite
def test_cancelling_a_running_finetune_stops_it_and_removes_its_checkpoints(
    api: Any, settings: Settings, tiny_llama: Path
) -> None:
    model = register(api, tiny_llama).json()
    dataset = upload_rows(api, QUESTIONS, "numbers")
    body = finetune_body(model, dataset, steps=100_000, batch_size=2, checkpoint_every=5)
    created = api.post("/v1/finetunes", json=body).json()
    job_id, finetune_id = created["job"]["id"], created["finetune"]["id"]
    worker = start_worker(settings, f"canceller-{settings.queue_prefix}")
    try:
        wait_until(lambda: api.get(f"/v1/jobs/{job_id}").json()["progress"]["done"] > 6, 120, "a checkpoint")
        assert api.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 202)
        job = wait_for_job(api, job_id, timeout=60)
    finally:
        stop_process(worker)
    assert job["status"] == "cancelled"
    finetune = api.get(f"/v1/finetunes/{finetune_id}").json()
    assert finetune["adapter_id"] is None and finetune["status"] == "cancelled"
    assert latest_checkpoint(open_store(settings), _finetune_row(settings, finetune_id)) is None
    assert api.get(f"/v1/finetunes/{finetune_id}/history").status_code == 409
    assert json.loads(api.get("/v1/adapters").content)["items"] == []


@only_sqlite
def test_a_finetune_beyond_the_workers_memory_budget_fails_before_training(api: Any, tiny_llama: Path) -> None:
    model = checked_model(api, tiny_llama)
    dataset = upload_rows(api, QUESTIONS, "numbers")
    created = api.post("/v1/finetunes", json=finetune_body(model, dataset, max_length=512, batch_size=64)).json()
    footprint = model["memory_footprint_bytes"]
    # room for the model and its LoRA state, not for the activations of 64 examples at a time
    tight = api.app.state.settings.model_copy(update={"worker_memory_budget_mb": max(1, (footprint * 2) // 2**20)})
    run_queued_jobs(tight)
    job = api.get(f"/v1/jobs/{created['job']['id']}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "over_memory_budget", job
    assert "WORKER_MEMORY_BUDGET_MB" in job["error"]["message"]
    assert api.get(f"/v1/finetunes/{created['finetune']['id']}").json()["adapter_id"] is None
