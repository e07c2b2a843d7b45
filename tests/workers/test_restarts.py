"""Restarts lose nothing: the registry holds every job, so a Redis that comes back empty
gets its queued jobs again, and a gateway killed and started again serves the same jobs."""

import signal
import threading
from pathlib import Path
from typing import Any

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


def test_a_redis_restart_loses_no_job(
    database_url: str, own_redis: RedisServer, tmp_path: Path, tiny_llama: Path
) -> None:
    """Two workers: the one not running the long job sweeps for lost jobs all along, and must
    not take the long job while the restarted Redis has not yet heard its worker again."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = make_settings(
        database_url,
        own_redis.url,
        tmp_path / "var",
        extraction_max_batch_size=1,
        extraction_cache=False,
        heartbeat_ttl_s=2.0,
    )
    worker = start_worker(settings, f"steady-{settings.queue_prefix}")
    other = start_worker(settings, f"other-{settings.queue_prefix}")
    try:
        with TestClient(create_app(settings)) as api:
            model = register(api, tiny_llama).json()
            assert wait_for_job(api, model["check_job_id"])["status"] == "succeeded"
            texts = [f"statement number {i} about the city of Rome" for i in range(400)]
            long_job = api.post("/v1/extractions", json={"model": model["id"], "layers": [1], "texts": texts}).json()[
                "job"
            ]["id"]
            wait_until(
                lambda: api.get(f"/v1/jobs/{long_job}").json()["progress"]["done"] > 0,
                60,
                "the long job to start",
                interval=0.05,
            )
            waiting = [api.post("/v1/jobs/ping").json()["job"]["id"] for _ in range(3)]  # queued behind it

            own_redis.stop()  # everything Redis held is gone: queues, RQ's jobs, heartbeats
            own_redis.start()

            # the registry still knows them (queued, unless the other worker ran them before the restart)
            assert api.get(f"/v1/jobs/{waiting[0]}").json()["status"] in ("queued", "running", "succeeded")
            after = api.post("/v1/jobs/ping")  # the gateway reconnects by itself
            assert after.status_code == 202
            for job_id in [long_job, *waiting, after.json()["job"]["id"]]:
                job = wait_for_job(api, job_id, timeout=120)
                assert job["status"] == "succeeded", (job_id, job["error"])
            assert api.get(f"/v1/jobs/{long_job}").json()["attempts"] == 1  # never taken from its worker
    finally:
        stop_process(worker)
        stop_process(other)


def test_a_gateway_killed_and_started_again_loses_nothing(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    gateway = start_gateway(settings, port)
    base = f"http://127.0.0.1:{port}"
    try:
        submitted = [
            httpx.post(f"{base}/v1/jobs/ping").json()["job"]["id"] for _ in range(5)
        ]  # no worker yet: all queued
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


def test_a_gateway_killed_while_jobs_pour_in_leaves_no_job_behind(settings: Settings, tmp_path: Path) -> None:
    """SIGKILL lands among submissions in flight — some committed and not yet queued, some
    queued and not yet answered. Every job the registry holds still reaches a final state,
    and every job a client was told about is among them."""
    quick = settings.model_copy(update={"heartbeat_ttl_s": 2.0, "heartbeat_interval_s": 0.5})
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    gateway = start_gateway(quick, port)
    accepted: list[str] = []
    stop = threading.Event()

    def submit() -> None:
        with httpx.Client(base_url=base, timeout=5) as client:
            while not stop.is_set():
                try:
                    response = client.post("/v1/jobs/ping")
                except httpx.TransportError:
                    continue  # the gateway is down: the request may or may not have been recorded
                if response.status_code == 202:
                    accepted.append(response.json()["job"]["id"])

    clients = [threading.Thread(target=submit) for _ in range(8)]
    for thread in clients:
        thread.start()
    worker = None
    try:
        wait_until(lambda: len(accepted) >= 40, 60, "submissions to pour in", interval=0.02)
        gateway.send_signal(signal.SIGKILL)
        gateway.wait(10)
        stop.set()
        for thread in clients:
            thread.join(10)
        gateway = start_gateway(quick, port)
        worker = start_worker(quick, f"after-{quick.queue_prefix}")
        client = httpx.Client(base_url=base)

        def every_job_final() -> list[dict[str, Any]] | None:
            listed: list[dict[str, Any]] = []
            cursor: str | None = None
            while True:  # every page
                query: dict[str, str | int] = {"kind": "ping", "limit": 200}
                if cursor:
                    query["cursor"] = cursor
                page = client.get("/v1/jobs", params=query).json()
                listed += page["items"]
                cursor = page.get("next_cursor")
                if not cursor:
                    break
            return listed if all(job["status"] in ("succeeded", "failed", "cancelled") for job in listed) else None

        listed = wait_until(every_job_final, 120, "every job in the registry to finish", interval=0.2)
        assert set(accepted) <= {job["id"] for job in listed}
        assert {job["status"] for job in listed} == {"succeeded"}, [
            job for job in listed if job["status"] != "succeeded"
        ]
    finally:
        stop.set()
        if worker is not None:
            stop_process(worker)
        stop_process(gateway)
