"""Structured logs: every line a process writes is one JSON object carrying `job_id`, and a
job's lines — the gateway's, the worker's and RQ's — can be found by it."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from app.settings import Settings
from tests.conftest import (
    ROOT,
    free_port,
    settings_environment,
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
    assert any(
        line["job_id"] == job_id and line["message"] == "job queued" and line["kind"] == "ping"
        for line in gateway_lines
    )
    assert any(line["logger"] == "uvicorn.access" and "/v1/jobs/ping" in line["message"] for line in gateway_lines)
    mine = [line for line in worker_lines if line["job_id"] == job_id]
    assert [line["message"] for line in mine if line["logger"] == "workers.runner"] == ["job started", "job succeeded"]
    assert any(line["logger"].startswith("rq.") for line in mine)  # RQ's own lines about the job carry its id too
    assert all(
        line["job_id"] is None
        for line in worker_lines
        if line["logger"] == "workers.main" or "Listening on" in line["message"]
    )


# A worker as `confprobe worker` starts it, whose ping job also writes through transformers'
# own logger and Python's `warnings`: neither goes through the root logger by itself.
NOISY_WORKER = """
import warnings

import transformers

from workers import main, runner


def noisy_ping(context):
    transformers.utils.logging.get_logger("transformers.modeling_utils").warning("a library's warning")
    warnings.warn("a Python warning")
    return runner.ping(context)


runner.HANDLERS["ping"] = noisy_ping
main.run_worker(burst=True)
"""


def test_library_lines_and_python_warnings_in_a_job_are_json_lines_with_its_id(
    api: Any, settings: Settings, tmp_path: Path
) -> None:
    job_id = api.post("/v1/jobs/ping").json()["job"]["id"]
    worker_log = tmp_path / "worker.log"
    environment = settings_environment(settings.model_copy(update={"log_format": "json", "log_level": "info"}))
    with open(worker_log, "wb") as output:
        subprocess.run(
            [sys.executable, "-c", NOISY_WORKER],
            env=environment | {"WORKER_NAME": "noisy"},
            cwd=ROOT,
            stdout=output,
            stderr=output,
            check=True,
        )
    assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"

    lines = json_lines(worker_log)
    assert all("job_id" in line for line in lines)
    library = [line for line in lines if line["message"] == "a library's warning"]
    python_warning = [line for line in lines if "a Python warning" in line["message"]]
    assert [(line["logger"], line["level"], line["job_id"]) for line in library] == [
        ("transformers.modeling_utils", "WARNING", job_id)
    ]
    assert [(line["logger"], line["job_id"]) for line in python_warning] == [("py.warnings", job_id)]


def test_credentials_in_urls_and_api_keys_never_reach_the_gateways_log(settings: Settings, tmp_path: Path) -> None:
    settings = settings.model_copy(update={"log_format": "json", "log_level": "info", "auth_enabled": True})
    from app import auth
    from app.registry.database import (
        create_registry_engine,
        session_factory,
        transaction,
    )

    with transaction(session_factory(create_registry_engine(settings.resolved_database_url))) as session:
        _, key = auth.create_key(session, "logged", ["read"])
    secret = key.split("_", 2)[2]
    port = free_port()
    gateway_log = tmp_path / "gateway.log"
    gateway = start_gateway(settings, port, log_file=gateway_log)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}")
        assert (
            client.get("/v1/models", params={"api_key": key, "limit": 5}).status_code == 401
        )  # keys go in headers only
        assert (
            client.get("/v1/models", params={"token": "hunter2-token", "X-Amz-Signature": "f00dfeed"}).status_code
            == 401
        )
        assert client.get(f"/v1/jobs/{key}", headers={"Authorization": f"Bearer {key}"}).status_code == 404
    finally:
        stop_process(gateway)

    lines = json_lines(gateway_log)
    access = [line["message"] for line in lines if line["logger"] == "uvicorn.access" and "/v1/" in line["message"]]
    assert len(access) == 3 and "api_key=***&limit=5" in access[0]
    logged = gateway_log.read_text()
    for credential in (secret, "hunter2-token", "f00dfeed"):
        assert credential not in logged
