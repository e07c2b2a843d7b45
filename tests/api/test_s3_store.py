"""The whole service on an S3 bucket (a real S3-compatible server): the gateway and a worker
that share no folder — as on two machines — and meet only in the bucket, the registry (on
PostgreSQL, as several machines have it) and Redis."""

import io
import json
import tarfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.settings import Settings
from app.storage import open_store
from tests import tiny_models
from tests.api.test_adapters import hidden_layer_one
from tests.api.test_extractions import direct_reference, download, finished
from tests.api.test_models import register
from tests.api.test_probes import train, upload_rows
from tests.conftest import (
    Databases,
    RedisServer,
    S3Server,
    Stack,
    make_settings,
    served,
    start_worker,
    stop_process,
    wait_for_job,
)

CLAIMS = [(n, "even" if n // 2 % 2 == 0 else "odd") for n in range(60)]
ROWS: list[dict[str, Any]] = [
    {"text": f"The number {n} is {claim}.", "label": int((n % 2 == 0) == (claim == "even"))} for n, claim in CLAIMS
]
TEXTS = ["The city of Paris is in France.", "Fifty-one is larger than forty-nine."]


def s3_settings(
    databases: Databases, redis_server: RedisServer, s3_server: S3Server, var_dir: Path, bucket: str | None = None
) -> Settings:
    store = f"s3://{bucket or s3_server.bucket}/{s3_server.new_prefix()}"
    return make_settings(
        databases.new("postgresql"),
        redis_server.url,
        var_dir,
        artifact_store=store,
        s3_endpoint_url=s3_server.endpoint_url,
    )


@pytest.fixture(scope="module")
def s3_stack(
    databases: Databases, redis_server: RedisServer, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The gateway and a worker with different var folders: nothing but the bucket carries
    artifacts from one to the other."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    folder = tmp_path_factory.mktemp("s3-stack")
    settings = s3_settings(databases, redis_server, s3_server, folder / "gateway-var")
    worker = start_worker(settings.model_copy(update={"var_dir": folder / "worker-var"}), "s3-worker")
    try:
        with TestClient(create_app(settings)) as client:
            yield Stack(settings=settings, client=client, worker=worker, worker_name="s3-worker")
    finally:
        stop_process(worker)


def bucket_prefix(stack: Stack) -> str:
    assert stack.settings.artifact_store is not None
    return stack.settings.artifact_store.split("/", 3)[3]


def bucket_object(s3_server: S3Server, stack: Stack, key: str) -> bytes:
    return s3_server.client().get_object(Bucket=s3_server.bucket, Key=f"{bucket_prefix(stack)}/{key}")["Body"].read()


def nothing_stored_locally(stack: Stack) -> bool:
    var_dirs = [stack.settings.var_dir, stack.settings.var_dir.parent / "worker-var"]
    return not any((var_dir / "artifacts").exists() for var_dir in var_dirs)


def test_datasets_and_hidden_states_go_through_the_bucket(
    s3_stack: Stack, s3_server: S3Server, tiny_llama: Path
) -> None:
    client, prefix = s3_stack.client, bucket_prefix(s3_stack)
    dataset = upload_rows(client, ROWS, "numbers")
    assert f"{prefix}/datasets/{dataset['sha256']}.jsonl" in s3_server.keys(prefix)
    model = register(client, tiny_llama).json()
    request = {"model": model["id"], "dataset": dataset["id"], "layers": [0, 1, -1]}
    first = finished(client, client.post("/v1/extractions", json=request))["result"]
    expected = direct_reference(tiny_llama, [row["text"] for row in ROWS], [0, 1, 2])
    np.testing.assert_allclose(download(client, first["extraction_id"], "npy"), expected, atol=1e-5)
    np.testing.assert_allclose(download(client, first["extraction_id"], "safetensors"), expected, atol=1e-5)

    again = finished(client, client.post("/v1/extractions", json=request))["result"]
    assert (again["cache_hits"], again["computed_texts"]) == (len(ROWS), 0)
    np.testing.assert_array_equal(download(client, again["extraction_id"]), download(client, first["extraction_id"]))
    keys = s3_server.keys(prefix)
    assert f"{prefix}/extractions/{first['extraction_id']}/hidden_states.safetensors" in keys
    assert any(key.startswith(f"{prefix}/cache/") for key in keys)
    # the cache hit read the shard through the worker's own local copy
    worker_cache = s3_stack.settings.var_dir.parent / "worker-var" / "cache" / "artifacts" / "objects"
    assert list(
        worker_cache.rglob(f"{first['extraction_id']}-1.safetensors")
    )  # its shard, from the job's first attempt
    assert nothing_stored_locally(s3_stack)


def _tar(folder: Path) -> bytes:
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w:gz") as archive:
        for file in sorted(folder.iterdir()):
            archive.add(file, f"checkpoint/{file.name}")
    return payload.getvalue()


def test_an_uploaded_adapter_imports_from_the_bucket_and_is_probed_and_compared(
    s3_stack: Stack, s3_server: S3Server, tiny_llama: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    client, prefix = s3_stack.client, bucket_prefix(s3_stack)
    model = register(client, tiny_llama).json()
    tensors = tiny_models.save_tinker_adapter(tmp_path / "export", tiny_llama)
    response = client.post(
        "/v1/adapters/upload",
        data={"base_model": model["id"], "name": "ft"},
        files={"file": ("adapter.tar.gz", _tar(tmp_path / "export"))},
    )
    assert response.status_code == 202, response.json()
    job = wait_for_job(client, response.json()["job"]["id"])
    assert job["status"] == "succeeded", job["error"]
    adapter = client.get(f"/v1/adapters/{job['result']['adapter_id']}").json()
    keys = s3_server.keys(prefix)
    assert {
        f"{prefix}/adapters/{adapter['identity']}/adapter_config.json",
        f"{prefix}/adapters/{adapter['identity']}/adapter_model.safetensors",
    } <= set(keys)
    assert not [key for key in keys if key.startswith(f"{prefix}/staging/")], "the staged upload stayed"

    extraction = finished(
        client,
        client.post(
            "/v1/extractions", json={"model": model["id"], "adapter": adapter["id"], "layers": [1], "texts": TEXTS}
        ),
    )
    merged = hidden_layer_one(
        tiny_models.merge_by_hand(tiny_llama, tensors), TEXTS, AutoTokenizer.from_pretrained(tiny_llama)
    )
    np.testing.assert_allclose(download(client, extraction["result"]["extraction_id"])[:, 0], merged, atol=1e-5)

    dataset = upload_rows(client, ROWS, "numbers")
    probe = train(client, model=model["id"], adapter=adapter["id"], dataset=dataset["id"], layers=[1])["probes"][0]
    report = client.get(f"/v1/probes/{probe['id']}/report")
    assert report.status_code == 200 and report.json()["report"]["n"] == 12
    assert client.get(f"/v1/probes/{probe['id']}/report.html").status_code == 200
    predictions = json.loads(bucket_object(s3_server, s3_stack, f"probes/{probe['id']}/predictions.json"))
    texts = [ROWS[index]["text"] for index in predictions["test_indices"][:3]]
    scored = client.post(f"/v1/probes/{probe['id']}/score", json={"texts": texts})
    assert scored.status_code == 200, scored.json()
    np.testing.assert_allclose(scored.json()["confidences"], predictions["confidences"][:3], atol=1e-6)

    compared = client.post(
        "/v1/comparisons",
        json={"model": model["id"], "adapters": [adapter["id"]], "dataset": dataset["id"], "layers": [1]},
    )
    assert compared.status_code == 202, compared.json()
    assert wait_for_job(client, compared.json()["job"]["id"])["status"] == "succeeded"
    comparison = client.get(f"/v1/comparisons/{compared.json()['comparison']['id']}").json()
    assert [variant["label"].split()[0] for variant in comparison["report"]["variants"]] == ["base", "adapter"]

    assert client.delete(f"/v1/adapters/{adapter['id']}").status_code == 204
    assert not [key for key in s3_server.keys(prefix) if key.startswith(f"{prefix}/adapters/{adapter['identity']}/")]
    assert nothing_stored_locally(s3_stack)


def test_hidden_states_stream_from_the_bucket_without_being_held_whole(
    databases: Databases, redis_server: RedisServer, s3_server: S3Server, tiny_llama: Path, tmp_path: Path
) -> None:
    """A 16 MiB array through a real HTTP server: the gateway's peak memory stays far below it."""
    import httpx
    from safetensors.numpy import load, save_file
    from sqlalchemy import update

    from app.main import create_app
    from app.registry.database import create_registry_engine, session_factory
    from app.registry.tables import Extraction

    settings = s3_settings(databases, redis_server, s3_server, tmp_path / "var")  # no worker: the job stays queued
    states = np.random.default_rng(0).standard_normal((2000, 4, 512), dtype=np.float32)
    with served(create_app(settings)) as url, httpx.Client(base_url=url, timeout=60) as client:
        model = register(client, tiny_llama).json()
        extraction = client.post("/v1/extractions", json={"model": model["id"], "layers": [1], "texts": ["x"]}).json()[
            "extraction"
        ]
        key = f"extractions/{extraction['id']}/hidden_states.safetensors"
        with open_store(settings).temporary_path(key) as path:
            save_file({"hidden_states": states}, str(path))
        with session_factory(create_registry_engine(settings.resolved_database_url)).begin() as session:
            session.execute(
                update(Extraction)
                .where(Extraction.id == extraction["id"])
                .values(artifact=key, shape=list(states.shape))
            )

        # the first request also makes the gateway's S3 client (some MiB of botocore models)
        received = {
            format: client.get(f"/v1/extractions/{extraction['id']}/hidden-states", params={"format": format}).content
            for format in ("npy", "safetensors")
        }
        for format in ("npy", "safetensors"):
            tracemalloc.start()
            try:
                with client.stream(
                    "GET", f"/v1/extractions/{extraction['id']}/hidden-states", params={"format": format}
                ) as response:
                    assert response.status_code == 200
                    chunks = [len(chunk) for chunk in response.iter_raw()]
                    assert int(response.headers["content-length"]) == sum(chunks)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak < states.nbytes / 4, f"{format}: {peak} bytes at the peak for a {states.nbytes}-byte array"
    np.testing.assert_array_equal(np.load(io.BytesIO(received["npy"])), states)
    np.testing.assert_array_equal(load(received["safetensors"])["hidden_states"], states)


def test_a_bucket_that_is_not_there_is_a_503_and_nothing_is_registered(
    databases: Databases, redis_server: RedisServer, s3_server: S3Server, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = s3_settings(databases, redis_server, s3_server, tmp_path / "var", bucket="no-such-bucket")
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/datasets", files={"file": ("rows.jsonl", b'{"text": "a", "label": 1}\n')})
        assert response.status_code == 503
        assert (
            response.json()["error"]["details"] == {"backend": "artifact store"}
            and "NoSuchBucket" in response.json()["error"]["message"]
        )
        assert client.get("/v1/datasets").json()["items"] == []
