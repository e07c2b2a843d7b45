from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.conftest import Stack, free_port, make_settings
from workers.runtime import memory_budget_bytes


def test_healthz_answers_without_any_backend(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(database_url, f"redis://127.0.0.1:{free_port()}/0", tmp_path)
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_says_no_worker_is_alive(api: Any) -> None:
    response = api.get("/readyz")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["details"]["missing"] == ["worker"]
    assert error["details"]["checks"]["database"] == "ok" and error["details"]["checks"]["redis"] == "ok"


def test_readyz_says_redis_is_unreachable(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(database_url, f"redis://127.0.0.1:{free_port()}/0", tmp_path)
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["error"]["details"]["missing"] == ["redis", "worker"]


def test_readyz_says_the_database_is_unreachable(redis_server: Any, tmp_path: Path) -> None:
    settings = make_settings(f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none", redis_server.url, tmp_path)
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert "database" in response.json()["error"]["details"]["missing"]


def test_readyz_is_ready_with_a_live_worker(stack: Stack) -> None:
    response = stack.client.get("/readyz")
    assert response.status_code == 200
    workers = response.json()["checks"]["workers"]
    assert [worker["device"] for worker in workers] == ["cpu"]


def test_a_worker_that_stops_heartbeating_is_no_longer_counted(settings: Settings, api: Any) -> None:
    import redis

    from app.broker import beat, heartbeat_key

    client = redis.Redis.from_url(settings.resolved_redis_url)
    beat(client, settings, {"name": "short-lived", "device": "cpu"})
    assert api.get("/readyz").status_code == 200
    client.delete(heartbeat_key(settings, "short-lived"))  # what its expiry does
    assert api.get("/readyz").status_code == 503


def test_workers_list_their_device_memory_and_resident_models(stack: Stack, tiny_llama: Any) -> None:
    from tests.api.test_models import register
    from tests.conftest import wait_for_job, wait_until

    model = register(stack.client, tiny_llama).json()
    wait_for_job(stack.client, model["check_job_id"])

    def listed() -> dict[str, Any] | None:
        workers = stack.client.get("/v1/workers").json()["items"]
        worker = next((w for w in workers if w["name"] == stack.worker_name), None)
        return worker if worker and any(m["model_id"] == model["id"] for m in worker["resident_models"]) else None

    worker = wait_until(listed, 10, "the worker to report the model resident")
    assert worker["device"] == "cpu" and worker["current_job"] is None
    assert worker["memory_budget_bytes"] == memory_budget_bytes(stack.settings)
    resident = next(m for m in worker["resident_models"] if m["model_id"] == model["id"])
    assert resident["bytes"] == stack.client.get(f"/v1/models/{model['id']}").json()["memory_footprint_bytes"]
    assert 0 < worker["memory_used_bytes"] <= worker["memory_budget_bytes"]


def test_no_worker_means_an_empty_list(api: Any) -> None:
    assert api.get("/v1/workers").json() == {"items": []}
