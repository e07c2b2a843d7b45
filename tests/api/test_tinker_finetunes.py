"""Fine-tunes on the `tinker` backend, through the API and a real worker, against the Tinker
stand-in driven by the real SDK: the stand-in trains a tiny LoRA on the very model the test
registered, so losses, learning rates and the exported adapter can be checked exactly."""

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.api.test_finetunes import QUESTIONS
from tests.api.test_probes import upload_rows
from tests.conftest import Stack, make_settings, wait_for_job, wait_until

BASE_NAME = "tiny-org/tiny-llama"
CREATE_MODEL = "POST /api/v1/create_model"


def tinker_body(model: dict[str, Any], dataset: dict[str, Any], **training: Any) -> dict[str, Any]:
    return {
        "base_model": model["id"],
        "dataset": dataset["id"],
        "name": "numbers-tinker",
        "backend": "tinker",
        "lora": {"r": 4},
        "training": {
            "steps": 4,
            "batch_size": 4,
            "learning_rate": 5e-3,
            "warmup_steps": 1,
            "validation_every": 2,
            "checkpoint_every": 2,
        }
        | training,
    }


@pytest.fixture
def tinker_base(stack: Stack, tinker_standin: Any, tiny_llama: Path) -> dict[str, Any]:
    """The tiny model registered under a name Tinker trains, on the stand-in as on the service."""
    tinker_standin.add_base_model(BASE_NAME, tiny_llama)
    response = stack.client.post("/v1/models", json={"name": BASE_NAME, "source": str(tiny_llama)})
    assert response.status_code == 201, response.json()
    return dict(response.json())


def new_runs(tinker_standin: Any, before: set[str]) -> list[Any]:
    return [run for model_id, run in tinker_standin.runs.items() if model_id not in before]


def test_a_tinker_finetune_trains_on_tinker_and_registers_the_adapter_it_exported(
    stack: Stack, tinker_base: dict[str, Any], tinker_standin: Any, tiny_llama: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.finetuning import (
        Schedule,
        completion_loss,
        held_out,
        learning_rate_at,
        multiple_choice_examples,
        step_examples,
    )

    dataset = upload_rows(stack.client, QUESTIONS, "numbers")
    runs_before = set(tinker_standin.runs)
    created = stack.client.post("/v1/finetunes", json=tinker_body(tinker_base, dataset))
    assert created.status_code == 202, created.json()
    job = wait_for_job(stack.client, created.json()["job"]["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]

    finetune = stack.client.get(f"/v1/finetunes/{created.json()['finetune']['id']}").json()
    assert finetune["backend"] == "tinker" and finetune["summary"]["examples"]["train"] == 36
    adapter = stack.client.get(f"/v1/adapters/{finetune['adapter_id']}").json()
    provenance = adapter["training"]["finetune"]
    assert adapter["source_kind"] == "finetune" and provenance["backend"] == "tinker"
    run_id = provenance["tinker"]["run_id"]
    assert adapter["tinker_run_id"] == run_id
    assert [run.model_id for run in new_runs(tinker_standin, runs_before)] == [run_id]
    assert provenance["tinker"]["checkpoint_paths"] == [f"tinker://{run_id}/weights/{finetune['id']}-step-000000002"]

    # exactly the schedule's steps, at the schedule's learning rates
    schedule = Schedule(
        steps=4, batch_size=4, accumulation=1, learning_rate=5e-3, lr_schedule="linear", warmup_steps=1, seed=0
    )
    run = tinker_standin.runs[run_id]
    assert run.forward_backward_calls == 4
    assert run.learning_rates == pytest.approx([learning_rate_at(step, schedule) for step in range(4)])
    history = stack.client.get(f"/v1/finetunes/{finetune['id']}/history").json()["points"]
    assert [point["step"] for point in history] == [1, 2, 3, 4]
    assert [point["step"] for point in history if point.get("validation_loss") is not None] == [2, 4]
    assert run.forward_calls == 2  # the validation losses, without a backward pass
    assert all(point["tokens"] == 4 for point in history)

    # the first step's loss is the untrained base's, on the examples the local backend would use
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    examples = multiple_choice_examples(tokenizer, QUESTIONS, "raw", 512).examples
    train, _ = held_out(len(examples), 0.1, 0)
    first = [examples[train[i]] for indices in step_examples(0, len(train), schedule) for i in indices]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        summed, count = completion_loss(base, first, tokenizer.pad_token_id or 0, "cpu")
    assert history[0]["loss"] == pytest.approx(float(summed) / count, rel=1e-4)

    # the registered adapter computes what the run trained on Tinker computes
    stored = stack.settings.resolved_artifact_dir / "adapters" / adapter["identity"]
    imported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), stored).eval()
    ids = torch.tensor([[1, 17, 5, 42, 9]])
    with torch.inference_mode():
        torch.testing.assert_close(imported(ids).logits, run.model.eval()(ids).logits, atol=1e-5, rtol=1e-5)
    exports = [path for path in tinker_standin.deleted if path.startswith(f"tinker://{run_id}/external_weights/")]
    assert len(exports) == 1 and exports[0] not in tinker_standin.checkpoints
    assert tinker_standin.finished[run_id.split(":")[0]] == "success"


def test_a_base_model_tinker_does_not_train_fails_the_job_before_anything_is_created(
    stack: Stack, tinker_standin: Any, tiny_llama: Path, tmp_path: Path
) -> None:
    folder = shutil.copytree(tiny_llama, tmp_path / "unlisted-model")
    model = stack.client.post("/v1/models", json={"name": "unlisted/model", "source": str(folder)}).json()
    dataset = upload_rows(stack.client, QUESTIONS, "numbers")
    created_before = tinker_standin.requests.count(CREATE_MODEL)
    created = stack.client.post("/v1/finetunes", json=tinker_body(model, dataset)).json()
    job = wait_for_job(stack.client, created["job"]["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "unsupported_base_model", job["error"]
    assert "unlisted/model" in job["error"]["message"]
    assert tinker_standin.requests.count(CREATE_MODEL) == created_before


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_cancelling_a_tinker_finetune_stops_it_at_the_next_step(
    stack: Stack, tinker_base: dict[str, Any], tinker_standin: Any
) -> None:
    dataset = upload_rows(stack.client, QUESTIONS, "numbers")
    runs_before = set(tinker_standin.runs)
    body = tinker_body(tinker_base, dataset, steps=100_000, batch_size=2, checkpoint_every=3, validation_every=1000)
    created = stack.client.post("/v1/finetunes", json=body).json()
    job_id = created["job"]["id"]
    wait_until(lambda: stack.client.get(f"/v1/jobs/{job_id}").json()["progress"]["done"] > 3, 120, "four steps")
    assert stack.client.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 202)
    job = wait_for_job(stack.client, job_id, timeout=60)
    assert job["status"] == "cancelled"
    (run,) = new_runs(tinker_standin, runs_before)
    # the step running when the cancel came is the last: the next one is never sent
    assert run.forward_backward_calls == len(run.learning_rates) <= job["progress"]["done"] + 1
    assert tinker_standin.finished[run.model_id.split(":")[0]] == "interrupted"
    finetune = stack.client.get(f"/v1/finetunes/{created['finetune']['id']}").json()
    assert finetune["adapter_id"] is None
    assert not (stack.settings.resolved_artifact_dir / "finetunes" / finetune["id"] / "checkpoints").exists()


@pytest.mark.parametrize(
    ("lora", "field"),
    [
        ({"target_modules": ["q_proj", "v_proj"]}, "lora.target_modules"),
        ({"dropout": 0.1}, "lora.dropout"),
    ],
)
def test_lora_settings_tinker_cannot_train_are_422s_naming_the_field(
    api: Any, tiny_llama: Path, lora: dict[str, Any], field: str
) -> None:
    from tests.api.test_finetunes import checked_model

    model = checked_model(api, tiny_llama)
    dataset = upload_rows(api, QUESTIONS, "numbers")
    body = {"base_model": model["id"], "dataset": dataset["id"], "name": "x", "backend": "tinker", "lora": lora}
    response = api.post("/v1/finetunes", json=body)
    assert response.status_code == 422, response.json()
    assert response.json()["error"]["details"]["field"] == field
    assert api.get("/v1/finetunes").json()["items"] == []


def test_a_tinker_finetune_without_a_key_is_a_503_naming_the_setting(
    database_url: str, redis_server: Any, tmp_path: Path, tiny_llama: Path
) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.api.test_models import register

    settings = make_settings(database_url, redis_server.url, tmp_path / "var", tinker_api_key=None)
    with TestClient(create_app(settings)) as client:
        model = register(client, tiny_llama).json()
        dataset = upload_rows(client, QUESTIONS, "numbers")
        body = {"base_model": model["id"], "dataset": dataset["id"], "name": "x", "backend": "tinker"}
        response = client.post("/v1/finetunes", json=body)
        assert response.status_code == 503
        assert "TINKER_API_KEY" in response.json()["error"]["message"]
        assert response.json()["error"]["details"]["setting"] == "TINKER_API_KEY"
        assert client.get("/v1/finetunes").json()["items"] == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_worker_killed_mid_tinker_finetune_has_its_job_resumed_from_the_last_tinker_state(
    database_url: str, redis_server: Any, tinker_standin: Any, tiny_llama: Path, tmp_path: Path
) -> None:
    import json
    import signal

    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.storage import open_store
    from tests.conftest import start_worker, stop_process

    settings = make_settings(
        database_url,
        redis_server.url,
        tmp_path / "var",
        tinker_base_url=tinker_standin.base_url,
        heartbeat_ttl_s=2.0,
        job_max_attempts=2,
    )
    tinker_standin.add_base_model(BASE_NAME, tiny_llama)
    with TestClient(create_app(settings)) as client:
        model = client.post("/v1/models", json={"name": BASE_NAME, "source": str(tiny_llama)}).json()
        dataset = upload_rows(client, QUESTIONS, "numbers")
        body = tinker_body(model, dataset, steps=120, batch_size=2, checkpoint_every=5, validation_every=100)
        created = client.post("/v1/finetunes", json=body).json()
        job_id, finetune_id = created["job"]["id"], created["finetune"]["id"]
        runs_before = set(tinker_standin.runs)
        doomed = start_worker(settings, f"doomed-{settings.queue_prefix}")
        try:
            wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["progress"]["done"] > 12, 120, "two states")
            doomed.send_signal(signal.SIGKILL)
            doomed.wait(10)
        finally:
            stop_process(doomed)
        saved = json.loads(open_store(settings).read_bytes(f"finetunes/{finetune_id}/checkpoints/tinker.json"))
        assert saved["step"] >= 10 and saved["step"] % 5 == 0
        survivor = start_worker(settings, f"survivor-{settings.queue_prefix}")
        try:
            job = wait_for_job(client, job_id, timeout=300)
        finally:
            stop_process(survivor)
        assert job["status"] == "succeeded", job["error"]
        assert job["attempts"] == 2 and job["result"]["resumed_from_step"] == saved["step"]
        first, resumed = new_runs(tinker_standin, runs_before)
        assert len(resumed.learning_rates) == 120 - saved["step"]  # the resumed run took the remaining steps
        history = client.get(f"/v1/finetunes/{finetune_id}/history").json()["points"]
        assert [point["step"] for point in history] == list(range(1, 121))
        adapter = client.get(f"/v1/adapters/{job['result']['adapter_id']}").json()
        tinker = adapter["training"]["finetune"]["tinker"]
        assert tinker["run_id"] == resumed.model_id != first.model_id
        assert saved["path"] in tinker["checkpoint_paths"]
        assert not open_store(settings).exists(f"finetunes/{finetune_id}/checkpoints/tinker.json")
