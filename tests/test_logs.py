"""Structured logs: every line a process writes is one JSON object carrying `job_id`, and a
job's lines — the gateway's, the worker's and RQ's — can be found by it."""

import json
from pathlib import Path
from typing import Any

import httpx

from app.settings import Settings
from tests.conftest import (
    free_port,
    start_gateway,
    start_worker,
    stop_process,
    wait_for_job,
)


def json_lines(path: Path) -> list[dict[str, Any]]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines, f"{path.name} is empty"
    return [json.loads(line) for line in lines]  # every line parses


def test_gateway_and_worker_write_json_lines_with_the_job_id(settings: Settings, tmp_path: Path) -> None:
    settings = settings.model_copy(update={"log_format": "json", "log_level": "info"})
    port = free_port()
    gateway_log, worker_log = tmp_path / "gateway.log", tmp_path / "worker.log"
    gateway = start_gateway(settings, port, log_file=gateway_log)
    worker = start_worker(settings, f"logged-{settings.queue_prefix}", log_file=worker_log)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}")
        job_id = client.post("/v1/jobs/ping").json()["job"]["id"]
        assert wait_for_job(client, job_id)["status"] == "succeeded"
    finally:
        stop_process(worker)
        stop_process(gateway)

    gateway_lines, worker_lines = json_lines(gateway_log), json_lines(worker_log)
    for line in gateway_lines + worker_lines:
        assert {"time", "level", "logger", "message", "job_id"} <= set(line)
    assert any(line["job_id"] == job_id and line["message"] == "job queued" and line["kind"] == "ping" for line in gateway_lines)
    assert any(line["logger"] == "uvicorn.access" and "/v1/jobs/ping" in line["message"] for line in gateway_lines)
    mine = [line for line in worker_lines if line["job_id"] == job_id]
    assert [line["message"] for line in mine if line["logger"] == "workers.runner"] == ["job started", "job succeeded"]
    assert any(line["logger"].startswith("rq.") for line in mine)  # RQ's own lines about the job carry its id too
    assert all(line["job_id"] is None for line in worker_lines if line["logger"] == "workers.main" or "Listening on" in line["message"])
