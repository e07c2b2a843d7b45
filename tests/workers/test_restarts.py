"""Restarts lose nothing: the registry holds every job, so a Redis that comes back empty
gets its queued jobs again, and a gateway killed and started again serves the same jobs."""

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.settings import Settings
from tests.api.test_models import register
from tests.conftest import (
    RedisServer,
    free_port,
    make_settings,
    start_gateway,
    start_worker,
    stop_process,
    wait_for_job,
    wait_until,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test alone (no persistence), so restarting it disturbs nobody else."""
    server = RedisServer(folder=tmp_path)
    server.start()
    yield server
    server.stop()


def test_a_redis_restart_loses_no_job(database_url: str, own_redis: RedisServer, tmp_path: Path, tiny_llama: Path) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = make_settings(database_url, own_redis.url, tmp_path / "var", extraction_max_batch_size=1, extraction_cache=False, heartbeat_ttl_s=2.0)
    worker = start_worker(settings, f"steady-{settings.queue_prefix}")
    try:
        with TestClient(create_app(settings)) as api:
            model = register(api, tiny_llama).json()
            assert wait_for_job(api, model["check_job_id"])["status"] == "succeeded"
            texts = [f"statement number {i} about the city of Rome" for i in range(400)]
            long_job = api.post("/v1/extractions", json={"model": model["id"], "layers": [1], "texts": texts}).json()["job"]["id"]
            wait_until(lambda: api.get(f"/v1/jobs/{long_job}").json()["progress"]["done"] > 0, 60, "the long job to start", interval=0.05)
            waiting = [api.post("/v1/jobs/ping").json()["job"]["id"] for _ in range(3)]  # queued behind it

            own_redis.stop()  # everything Redis held is gone: queues, RQ's jobs, heartbeats
            own_redis.start()

            assert api.get(f"/v1/jobs/{waiting[0]}").json()["status"] == "queued"  # the registry still knows
            after = api.post("/v1/jobs/ping")  # the gateway reconnects by itself
            assert after.status_code == 202
            for job_id in [long_job, *waiting, after.json()["job"]["id"]]:
                job = wait_for_job(api, job_id, timeout=120)
                assert job["status"] == "succeeded", (job_id, job["error"])
    finally:
        stop_process(worker)


def test_a_gateway_killed_and_started_again_loses_nothing(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    gateway = start_gateway(settings, port)
    base = f"http://127.0.0.1:{port}"
    try:
        submitted = [httpx.post(f"{base}/v1/jobs/ping").json()["job"]["id"] for _ in range(5)]  # no worker yet: all queued
        gateway.send_signal(signal.SIGKILL)
        gateway.wait(10)
        gateway = start_gateway(settings, port)
        listed = {job["id"]: job for job in httpx.get(f"{base}/v1/jobs", params={"kind": "ping"}).json()["items"]}
        assert set(submitted) <= set(listed) and all(listed[j]["status"] == "queued" for j in submitted)
        worker = start_worker(settings, f"late-{settings.queue_prefix}")
        try:
            client = httpx.Client(base_url=base)
            for job_id in submitted:
                assert wait_for_job(client, job_id)["status"] == "succeeded"
        finally:
            stop_process(worker)
    finally:
        stop_process(gateway)


