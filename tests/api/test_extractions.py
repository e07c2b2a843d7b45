"""Extractions through the service: request checks, the job on a real worker, downloads,
and the content cache."""

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.settings import Settings
from tests.api.test_datasets import CONVERSATION
from tests.api.test_jobs import run_queued_jobs
from tests.api.test_models import register
from tests.api.test_probes import upload_rows
from tests.conftest import Stack, wait_for_job

TEXTS = [
    "The city of Paris is in France.",
    "The city of Tokyo is in Japan.",
    "Fifty-one is larger than forty-nine.",
    "Tokyo",
]


def ready_model(client: Any, folder: Path, **extra: Any) -> dict[str, Any]:
    model = register(client, folder, **extra).json()
    return model


def extract(client: Any, model_id: str, **body: Any) -> Any:
    return client.post("/v1/extractions", json={"model": model_id, "layers": [0, 1, -1], **body})


def finished(client: Any, response: Any) -> dict[str, Any]:
    assert response.status_code == 202, response.json()
    job = wait_for_job(client, response.json()["job"]["id"])
    assert job["status"] == "succeeded", job["error"]
    return job


def direct_reference(folder: Path, texts: list[str], layers: list[int], token_position: str = "last") -> np.ndarray:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    model.model.norm = torch.nn.Identity()  # the last layer before the final norm
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = []
    with torch.inference_mode():
        for text in texts:
            hidden_states = model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True).hidden_states
            rows.append(
                [
                    (
                        hidden_states[layer][0, -1] if token_position == "last" else hidden_states[layer][0].mean(0)
                    ).numpy()
                    for layer in layers
                ]
            )
    return np.array(rows, dtype=np.float32)


def download(client: Any, extraction_id: str, format: str = "npy") -> np.ndarray:
    response = client.get(f"/v1/extractions/{extraction_id}/hidden-states", params={"format": format})
    assert response.status_code == 200
    if format == "npy":
        return np.load(io.BytesIO(response.content))
    from safetensors.numpy import load

    return load(response.content)["hidden_states"]


def test_an_extraction_returns_texts_by_layers_by_hidden_equal_to_a_direct_forward(
    stack: Stack, tiny_llama: Path
) -> None:
    model = ready_model(stack.client, tiny_llama)
    response = extract(stack.client, model["id"], texts=TEXTS)
    assert response.headers["location"] == f"/v1/extractions/{response.json()['extraction']['id']}"
    finished(stack.client, response)
    extraction = stack.client.get(f"/v1/extractions/{response.json()['extraction']['id']}").json()
    assert extraction["status"] == "succeeded"
    assert extraction["layers"] == [0, 1, 2]
    assert extraction["shape"] == [len(TEXTS), 3, 16]
    assert extraction["model_fingerprint"] == model["fingerprint"]
    expected = direct_reference(tiny_llama, TEXTS, [0, 1, 2])
    np.testing.assert_allclose(download(stack.client, extraction["id"], "npy"), expected, atol=1e-5)
    np.testing.assert_allclose(download(stack.client, extraction["id"], "safetensors"), expected, atol=1e-5)


def test_mean_pooling_through_the_service(stack: Stack, tiny_llama: Path) -> None:
    model = ready_model(stack.client, tiny_llama)
    response = extract(stack.client, model["id"], texts=TEXTS, token_position="mean", layers=[2])
    finished(stack.client, response)
    got = download(stack.client, response.json()["extraction"]["id"])
    np.testing.assert_allclose(got, direct_reference(tiny_llama, TEXTS, [2], "mean"), atol=1e-5)


def test_a_repeated_request_is_served_from_the_cache_without_running_the_model(stack: Stack, tiny_llama: Path) -> None:
    model = ready_model(stack.client, tiny_llama)
    first = finished(stack.client, extract(stack.client, model["id"], texts=TEXTS))
    again = extract(stack.client, model["id"], texts=TEXTS)
    second = finished(stack.client, again)
    assert first["result"]["batches_run"] > 0 and first["result"]["cache_hits"] == 0
    assert second["result"]["batches_run"] == 0 and second["result"]["computed_texts"] == 0
    assert second["result"]["cache_hits"] == len(TEXTS)
    np.testing.assert_array_equal(
        download(stack.client, first["result"]["extraction_id"]),
        download(stack.client, second["result"]["extraction_id"]),
    )


def test_an_overlapping_request_computes_only_the_new_texts(stack: Stack, tiny_llama: Path) -> None:
    model = ready_model(stack.client, tiny_llama)
    finished(stack.client, extract(stack.client, model["id"], texts=TEXTS[:2]))
    job = finished(stack.client, extract(stack.client, model["id"], texts=TEXTS))
    assert job["result"]["computed_texts"] == 2 and job["result"]["cache_hits"] == 2
    np.testing.assert_allclose(
        download(stack.client, job["result"]["extraction_id"]),
        direct_reference(tiny_llama, TEXTS, [0, 1, 2]),
        atol=1e-5,
    )


def test_other_layers_of_cached_texts_are_computed(stack: Stack, tiny_llama: Path) -> None:
    model = ready_model(stack.client, tiny_llama)
    finished(stack.client, extract(stack.client, model["id"], texts=TEXTS, layers=[1]))
    job = finished(stack.client, extract(stack.client, model["id"], texts=TEXTS, layers=[1, 2]))
    assert job["result"]["computed_texts"] == len(TEXTS)
    np.testing.assert_allclose(
        download(stack.client, job["result"]["extraction_id"]), direct_reference(tiny_llama, TEXTS, [1, 2]), atol=1e-5
    )


def test_truncation_is_explicit_and_counted(stack: Stack, tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(tiny_llama)(TEXTS)["input_ids"]]
    model = ready_model(stack.client, tiny_llama)
    job = finished(stack.client, extract(stack.client, model["id"], texts=TEXTS, max_length=6))
    assert job["result"]["truncated_count"] == sum(length > 6 for length in lengths)
    extraction = stack.client.get(f"/v1/extractions/{job['result']['extraction_id']}").json()
    assert extraction["truncated_count"] == job["result"]["truncated_count"] and extraction["max_length"] == 6


def test_the_worker_loads_the_base_model_once_across_jobs(stack: Stack, tiny_llama: Path) -> None:
    model = ready_model(stack.client, tiny_llama)
    wait_for_job(stack.client, model["check_job_id"])
    loads = [
        finished(stack.client, extract(stack.client, model["id"], texts=[f"text number {i}"]))["result"]["model_loads"]
        for i in range(3)
    ]
    assert loads[0] == loads[1] == loads[2]


# --- request checks: no worker needed ----------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"texts": ["fine", "  "]}, "texts[1]"),
        ({"texts": []}, "texts"),
        ({"texts": ["x"], "layers": [3]}, "layers"),
        ({"texts": ["x"], "layers": [-4]}, "layers"),
        ({"texts": ["x"], "layers": [2, -1]}, "layers"),
        ({}, "texts"),
        ({"texts": ["x"], "token_position": "first"}, "token_position"),
        ({"texts": ["x"], "max_length": 0}, "max_length"),
        ({"texts": ["x"], "layer": [1]}, "layer"),
    ],
)
def test_a_bad_request_is_a_422_naming_the_field(api: Any, tiny_llama: Path, body: dict[str, Any], field: str) -> None:
    model = register(api, tiny_llama).json()
    response = api.post("/v1/extractions", json={"model": model["id"], "layers": [1]} | body)
    assert response.status_code == 422, response.json()
    error = response.json()["error"]
    named = {item["field"] for item in error["details"].get("fields", [])} | {error["details"].get("field")}
    assert field in named
    assert api.get("/v1/extractions").json()["items"] == []
    assert [job["kind"] for job in api.get("/v1/jobs").json()["items"]] == ["model_check"]


def test_too_many_inline_texts_is_a_413_that_points_to_datasets(api: Any, settings: Settings, tiny_llama: Path) -> None:
    model = register(api, tiny_llama).json()
    response = api.post(
        "/v1/extractions", json={"model": model["id"], "layers": [1], "texts": ["x"] * (settings.max_inline_texts + 1)}
    )
    assert response.status_code == 413
    assert "dataset" in response.json()["error"]["message"]


@pytest.mark.parametrize(("field", "value"), [("model", "mdl_nope"), ("dataset", "dst_nope"), ("adapter", "adp_nope")])
def test_an_unknown_reference_is_a_404(api: Any, tiny_llama: Path, field: str, value: str) -> None:
    model = register(api, tiny_llama).json()
    body = {"model": model["id"], "layers": [1], "texts": ["x"]} | {field: value}
    if field == "dataset":
        del body["texts"]
    response = api.post("/v1/extractions", json=body)
    assert response.status_code == 404
    assert response.json()["error"]["details"]["resource"] == field


def test_a_chat_dataset_is_a_422_naming_the_dataset_and_queues_nothing(api: Any, tiny_llama: Path) -> None:
    dataset = upload_rows(api, [CONVERSATION], "chat")
    model = register(api, tiny_llama).json()
    response = api.post("/v1/extractions", json={"model": model["id"], "layers": [1], "dataset": dataset["id"]})
    assert response.status_code == 422, response.json()
    error = response.json()["error"]
    assert (error["details"]["field"], error["details"]["dataset"]) == ("dataset", dataset["id"])
    assert error["message"] == (
        f"dataset: dataset {dataset['id']} holds chat conversations, which have no labels to probe; "
        "chat datasets are for fine-tuning"
    )
    assert api.get("/v1/extractions").json()["items"] == []
    assert [job["kind"] for job in api.get("/v1/jobs").json()["items"]] == ["model_check"]


def test_hidden_states_before_the_job_ran_are_a_409(api: Any, tiny_llama: Path) -> None:
    model = register(api, tiny_llama).json()
    extraction = api.post("/v1/extractions", json={"model": model["id"], "layers": [1], "texts": ["x"]}).json()[
        "extraction"
    ]
    response = api.get(f"/v1/extractions/{extraction['id']}/hidden-states")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "not_ready"


def test_a_large_array_streams_in_chunks(api: Any, settings: Settings, tiny_llama: Path) -> None:
    """The gateway sends the file in pieces instead of loading it whole."""
    from safetensors.numpy import save_file
    from sqlalchemy import update

    from app.api.extractions import CHUNK_BYTES
    from app.registry.database import create_registry_engine, session_factory
    from app.registry.tables import Extraction
    from app.storage import FolderStore

    model = register(api, tiny_llama).json()
    extraction = api.post("/v1/extractions", json={"model": model["id"], "layers": [1], "texts": ["x"]}).json()[
        "extraction"
    ]
    states = np.random.default_rng(0).standard_normal((2000, 4, 512), dtype=np.float32)  # 16 MiB
    key = f"extractions/{extraction['id']}/hidden_states.safetensors"
    with FolderStore(settings.resolved_artifact_dir).temporary_path(key) as path:
        save_file({"hidden_states": states}, str(path))
    with session_factory(create_registry_engine(settings.resolved_database_url)).begin() as session:
        session.execute(
            update(Extraction).where(Extraction.id == extraction["id"]).values(artifact=key, shape=list(states.shape))
        )
    with api.stream("GET", f"/v1/extractions/{extraction['id']}/hidden-states") as response:
        chunks = list(response.iter_raw())
        assert int(response.headers["content-length"]) == sum(len(chunk) for chunk in chunks)
    assert len(chunks) >= states.nbytes // CHUNK_BYTES
    assert max(len(chunk) for chunk in chunks) <= CHUNK_BYTES
    np.testing.assert_array_equal(np.load(io.BytesIO(b"".join(chunks))), states)

    FolderStore(settings.resolved_artifact_dir).delete(key)  # removed from under its row: gone, not a 500
    for fmt in ["npy", "safetensors"]:
        response = api.get(f"/v1/extractions/{extraction['id']}/hidden-states", params={"format": fmt})
        assert (response.status_code, response.json()["error"]["code"], response.json()["error"]["details"]["key"]) == (
            410,
            "artifact_missing",
            key,
        )


def test_extractions_of_a_dataset(api: Any, settings: Settings, tiny_llama: Path, tmp_path: Path) -> None:
    rows = [{"text": text, "label": index % 2} for index, text in enumerate(TEXTS)]
    upload = tmp_path / "small.jsonl"
    upload.write_text("\n".join(json.dumps(row) for row in rows))
    with upload.open("rb") as handle:
        dataset = api.post("/v1/datasets", files={"file": ("small.jsonl", handle)}).json()
    model = register(api, tiny_llama).json()
    response = api.post("/v1/extractions", json={"model": model["id"], "layers": [2], "dataset": dataset["id"]})
    assert response.status_code == 202
    assert response.json()["extraction"]["text_count"] == len(TEXTS)
    run_queued_jobs(settings)
    job = api.get(f"/v1/jobs/{response.json()['job']['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    np.testing.assert_allclose(
        download(api, response.json()["extraction"]["id"]), direct_reference(tiny_llama, TEXTS, [2]), atol=1e-5
    )


def test_the_real_minilm_encoder_through_the_service_equals_a_direct_forward(stack: Stack) -> None:
    from transformers import AutoModel, AutoTokenizer

    from tests.tiny_models import minilm_folder

    folder = minilm_folder()
    model = register(stack.client, folder).json()
    assert model["architecture"] == "BertModel" and model["num_layers"] == 6
    layers = [0, 3, 6]
    job = finished(stack.client, extract(stack.client, model["id"], texts=TEXTS, layers=layers, token_position="mean"))
    reference_model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    expected = []
    with torch.inference_mode():
        for text in TEXTS:
            hidden_states = reference_model(
                **tokenizer(text, return_tensors="pt"), output_hidden_states=True
            ).hidden_states
            expected.append([hidden_states[layer][0].mean(dim=0).numpy() for layer in layers])
    np.testing.assert_allclose(download(stack.client, job["result"]["extraction_id"]), np.array(expected), atol=1e-5)


def test_progress_is_reported_per_batch(api: Any, settings: Settings, tiny_llama: Path) -> None:
    import threading

    import redis

    from tests.api.test_jobs import read_events
    from tests.conftest import wait_until

    model = register(api, tiny_llama).json()
    job_id = api.post("/v1/extractions", json={"model": model["id"], "layers": [1], "texts": TEXTS}).json()["job"]["id"]
    events: list[dict[str, Any]] = []
    listener = threading.Thread(target=lambda: events.extend(read_events(api, job_id)))
    listener.start()
    channel = f"{settings.queue_prefix}:job:{job_id}"
    wait_until(
        lambda: redis.Redis.from_url(settings.resolved_redis_url).pubsub_numsub(channel)[0][1],
        10,
        "the stream to subscribe",
    )
    run_queued_jobs(settings.model_copy(update={"extraction_max_batch_size": 1}))
    listener.join(30)
    forward = [event["progress"]["done"] for event in events if event["progress"]["stage"] == "forward"]
    assert forward == list(range(len(TEXTS) + 1))
    assert events[-1]["status"] == "succeeded"
