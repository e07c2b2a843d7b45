"""The model check job, run by a real worker process through Redis, on both registries."""

import json
import os
from pathlib import Path
from typing import Any

import pytest

from app.settings import Settings
from tests.api.test_jobs import run_queued_jobs
from tests.api.test_models import register
from tests.conftest import Stack, wait_for_job


def direct_load(folder: Path, dtype: str = "float32") -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True).eval()


def test_a_registered_model_becomes_ready_with_what_the_worker_measured(stack: Stack, tiny_llama: Path) -> None:
    import torch

    model = register(stack.client, tiny_llama).json()
    job = wait_for_job(stack.client, model["check_job_id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"] == {"stage": "done", "done": 2, "total": 2, "details": None}
    assert job["started_at"] <= job["finished_at"]
    reference = direct_load(tiny_llama)
    with torch.inference_mode():
        hidden_states = reference(input_ids=torch.tensor([[1]]), output_hidden_states=True).hidden_states
    ready = stack.client.get(f"/v1/models/{model['id']}").json()
    assert ready["status"] == "ready"
    assert ready["parameter_count"] == sum(p.numel() for p in reference.parameters())
    assert ready["memory_footprint_bytes"] == reference.get_memory_footprint()
    assert job["result"]["num_layers"] == len(hidden_states) - 1
    assert job["result"]["hidden_size"] == hidden_states[-1].shape[-1]


def test_the_worker_keeps_a_checked_model_resident(stack: Stack, tiny_llama: Path) -> None:
    model = register(stack.client, tiny_llama).json()
    first = wait_for_job(stack.client, model["check_job_id"])
    again = stack.client.post(f"/v1/models/{model['id']}/check").json()["job"]
    second = wait_for_job(stack.client, again["id"])
    assert second["status"] == "succeeded"
    assert second["result"]["resident_loads"] == first["result"]["resident_loads"]
    heartbeat = stack.client.get("/readyz").json()["checks"]["workers"]
    assert heartbeat and heartbeat[0]["current_job"] is None


def test_a_model_whose_weights_are_missing_fails_with_the_reason(stack: Stack, tiny_llama: Path) -> None:
    (tiny_llama / "model.safetensors").unlink()
    model = register(stack.client, tiny_llama).json()
    job = wait_for_job(stack.client, model["check_job_id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "model_load_failed"
    failed = stack.client.get(f"/v1/models/{model['id']}").json()
    assert failed["status"] == "failed"
    assert str(tiny_llama) in failed["status_reason"]


def test_weights_that_disagree_with_the_registered_config_fail_the_check(
    api: Any, settings: Settings, tiny_llama: Path
) -> None:
    from tests.tiny_models import save_tiny_llama

    model = register(api, tiny_llama).json()
    save_tiny_llama(tiny_llama, hidden_size=32)  # the folder changes after registration
    run_queued_jobs(settings)
    job = api.get(f"/v1/jobs/{model['check_job_id']}").json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "shape_mismatch"
    assert job["error"]["details"]["hidden_size"] == 32
    assert api.get(f"/v1/models/{model['id']}").json()["status"] == "failed"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_model_loads_in_the_registered_dtype(api: Any, settings: Settings, tiny_llama: Path, dtype: str) -> None:
    model = register(api, tiny_llama, dtype=dtype).json()
    run_queued_jobs(settings)
    job = api.get(f"/v1/jobs/{model['check_job_id']}").json()
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["memory_footprint_bytes"] == direct_load(tiny_llama, dtype).get_memory_footprint()
    assert job["result"]["memory_footprint_bytes"] < 0.6 * direct_load(tiny_llama).get_memory_footprint()


def test_the_least_recently_used_model_is_evicted_when_the_budget_is_full(tmp_path: Path) -> None:
    from app.inputs.model_sources import fingerprint, read_model_shape, resolve_source
    from app.registry.models import new_model
    from tests.tiny_models import save_tiny_llama
    from workers.resident_models import ResidentModels

    rows = []
    for name in ("a", "b", "c"):
        source = resolve_source(str(save_tiny_llama(tmp_path / name)), None)
        rows.append(new_model(name, source, None, "float32", None, read_model_shape(source.path), fingerprint(source)))
    one_model = ResidentModels(budget_bytes=10**9, device="cpu").get(rows[0]).footprint_bytes
    resident = ResidentModels(budget_bytes=2 * one_model, device="cpu")
    for row in (rows[0], rows[1], rows[0], rows[2]):  # a, b, a again (so b is the least recent), c
        resident.get(row)
    assert [entry["model_id"] for entry in resident.describe()] == [rows[0].id, rows[2].id]
    assert resident.loads == 3 and resident.used_bytes <= resident.budget_bytes
    resident.get(rows[1])
    assert resident.loads == 4


def test_a_config_made_absurd_after_registration_fails_the_check_as_unsupported(
    api: Any, settings: Settings, tiny_llama: Path
) -> None:
    model = register(api, tiny_llama).json()
    config = json.loads((tiny_llama / "config.json").read_text())
    (tiny_llama / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**9}))
    run_queued_jobs(settings)
    job = api.get(f"/v1/jobs/{model['check_job_id']}").json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "unsupported_model" and job["error"]["details"]["config_key"] == "num_hidden_layers"
    failed = api.get(f"/v1/models/{model['id']}").json()
    assert failed["status"] == "failed" and "num_hidden_layers" in failed["status_reason"]


def test_weights_replaced_by_a_fifo_after_registration_fail_the_check_instead_of_blocking_the_worker(
    api: Any, settings: Settings, tiny_llama: Path
) -> None:
    model = register(api, tiny_llama).json()
    (tiny_llama / "model.safetensors").unlink()
    os.mkfifo(tiny_llama / "model.safetensors")
    run_queued_jobs(settings)
    job = api.get(f"/v1/jobs/{model['check_job_id']}").json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "model_file_not_regular" and job["error"]["details"]["file"] == "model.safetensors"
