"""A worker that dies mid-job: its job is failed with the reason, never left `running`."""

import signal
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from app.broker import heartbeat_key
from app.registry.tables import Job, utcnow
from app.settings import Settings
from tests.api.test_models import register
from tests.conftest import start_worker, stop_process, wait_until
from workers import runtime


def running_job(settings: Settings, job_id: str, worker: str, started_ago_s: float) -> None:
    worker_runtime = runtime.build_runtime(settings)
    with worker_runtime.sessions() as session, session.begin():
        session.add(Job(id=job_id, kind="extraction", params={}, queue="q", status="running", worker=worker, started_at=utcnow() - timedelta(seconds=started_ago_s)))


def test_a_job_whose_worker_stopped_beating_is_failed_with_the_reason(api: Any, settings: Settings) -> None:
    running_job(settings, "job_lost", "gone-worker", started_ago_s=60)
    running_job(settings, "job_alive", "busy-worker", started_ago_s=60)
    running_job(settings, "job_new", "gone-worker", started_ago_s=0)
    redis.Redis.from_url(settings.resolved_redis_url).set(heartbeat_key(settings, "busy-worker"), '{"name": "busy-worker", "device": "cpu"}', ex=30)
    assert runtime.build_runtime(settings).fail_jobs_of_lost_workers() == ["job_lost"]
    lost = api.get("/v1/jobs/job_lost").json()
    assert lost["status"] == "failed" and lost["error"]["code"] == "worker_lost" and "gone-worker" in lost["error"]["message"]
    assert lost["finished_at"] is not None
    assert api.get("/v1/jobs/job_alive").json()["status"] == "running"
    assert api.get("/v1/jobs/job_new").json()["status"] == "running"


@pytest.mark.slow
def test_a_worker_killed_mid_job_leaves_a_failed_job_that_another_worker_reports(api: Any, settings: Settings, tiny_llama: Path) -> None:
    slow = settings.model_copy(update={"extraction_max_batch_size": 1, "extraction_cache": False, "heartbeat_ttl_s": 2.0})
    model = register(api, tiny_llama).json()
    texts = [f"statement number {i} about the city of Paris" for i in range(1900)]
    job_id = api.post("/v1/extractions", json={"model": model["id"], "layers": [1], "texts": texts}).json()["job"]["id"]
    doomed_name, survivor_name = f"doomed-{slow.queue_prefix}", f"survivor-{slow.queue_prefix}"  # RQ wants unique names
    doomed = start_worker(slow, doomed_name)
    try:
        wait_until(lambda: api.get(f"/v1/jobs/{job_id}").json()["progress"]["done"] > 0, 120, "the job to make progress", interval=0.1)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
        assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
        survivor = start_worker(slow, survivor_name)
        try:
            job = wait_until(lambda: (j := api.get(f"/v1/jobs/{job_id}").json())["status"] != "running" and j, 60, "the lost job to be reported")
        finally:
            stop_process(survivor)
    finally:
        stop_process(doomed)
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost" and job["error"]["details"]["worker"] == doomed_name
