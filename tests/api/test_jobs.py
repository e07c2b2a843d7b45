"""Jobs: their shape, listing, cancellation and server-sent events."""

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import redis

from app.settings import Settings
from tests.api.test_models import register
from tests.conftest import wait_for_job, wait_until
from workers import runner
from workers.main import run_worker

JOB_KEYS = {"id", "kind", "status", "progress", "result", "error", "created_at", "started_at", "finished_at"}


def run_queued_jobs(settings: Settings) -> None:
    """A real RQ worker, in this process, that stops when the queue is empty."""
    run_worker(settings, burst=True)


def test_a_job_has_the_documented_shape(api: Any, tiny_llama: Path) -> None:
    job_id = register(api, tiny_llama).json()["check_job_id"]
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert set(job) >= JOB_KEYS
    assert job["progress"] == {"stage": None, "done": 0, "total": None, "details": None}
    assert job["created_at"].endswith("Z") or "+00:00" in job["created_at"]


def test_jobs_are_filtered_by_status_and_kind_and_paginated(api: Any, tiny_llama: Path) -> None:
    ids = [
        register(api, tiny_llama, dtype=dtype).json()["check_job_id"] for dtype in ("float32", "bfloat16", "float16")
    ]
    api.post(f"/v1/jobs/{ids[0]}/cancel")
    queued = api.get("/v1/jobs", params={"status": "queued"}).json()["items"]
    assert [job["id"] for job in queued] == ids[:0:-1]
    assert [job["id"] for job in api.get("/v1/jobs", params={"status": "cancelled"}).json()["items"]] == [ids[0]]
    assert api.get("/v1/jobs", params={"kind": "extraction"}).json()["items"] == []
    page = api.get("/v1/jobs", params={"limit": 2}).json()
    rest = api.get("/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert [job["id"] for job in page["items"] + rest["items"]] == ids[::-1]


def test_an_unknown_status_filter_is_a_422(api: Any) -> None:
    response = api.get("/v1/jobs", params={"status": "done"})
    assert response.status_code == 422
    assert response.json()["error"]["details"]["fields"][0]["field"] == "status"


def test_a_cancelled_queued_job_never_runs(api: Any, settings: Settings, tiny_llama: Path) -> None:
    model = register(api, tiny_llama).json()
    job_id = model["check_job_id"]
    response = api.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert redis.Redis.from_url(settings.resolved_redis_url).llen(f"rq:queue:{settings.queue_prefix}:jobs") == 0

    other = register(api, tiny_llama, dtype="bfloat16").json()  # keeps the queue non-empty
    redis.Redis.from_url(settings.resolved_redis_url).rpush(f"rq:queue:{settings.queue_prefix}:jobs", job_id)
    run_queued_jobs(settings)
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["started_at"] is None
    assert api.get(f"/v1/models/{model['id']}").json()["status"] == "pending"
    assert api.get(f"/v1/jobs/{other['check_job_id']}").json()["status"] == "succeeded"


def test_a_running_job_stops_at_its_next_progress_point(
    api: Any, settings: Settings, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = register(api, tiny_llama).json()["check_job_id"]
    seen: dict[str, Any] = {}

    def cancelled_midway(context: runner.JobContext) -> dict[str, Any]:
        context.progress("first half", 1, 2)
        response = api.post(f"/v1/jobs/{job_id}/cancel")
        seen["cancel"] = response.json()
        context.progress("second half", 2, 2)
        seen["ran past the cancel"] = True
        return {}

    monkeypatch.setitem(runner.HANDLERS, "model_check", cancelled_midway)
    run_queued_jobs(settings)
    assert seen["cancel"]["status"] == "running" and seen["cancel"]["cancel_requested"] is True
    assert "ran past the cancel" not in seen
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled"
    assert job["progress"]["stage"] == "second half"
    assert job["finished_at"] is not None


def test_cancelling_a_finished_job_is_a_409(api: Any, settings: Settings, tiny_llama: Path) -> None:
    job_id = register(api, tiny_llama).json()["check_job_id"]
    run_queued_jobs(settings)
    response = api.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 409
    assert response.json()["error"]["details"]["job_status"] == "succeeded"


@pytest.mark.parametrize("path", ["/v1/jobs/job_nope", "/v1/jobs/job_nope/events"])
def test_an_unknown_job_is_a_404(api: Any, path: str) -> None:
    response = api.get(path)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_cancelling_an_unknown_job_is_a_404(api: Any) -> None:
    assert api.post("/v1/jobs/job_nope/cancel").status_code == 404


def read_events(api: Any, job_id: str) -> list[dict[str, Any]]:
    events = []
    with api.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line.removeprefix("event:").strip()
            elif line.startswith("data:") and event == "job":
                events.append(json.loads(line.removeprefix("data:")))
    return events


def test_events_follow_a_job_from_queued_to_succeeded(api: Any, settings: Settings, tiny_llama: Path) -> None:
    job_id = register(api, tiny_llama).json()["check_job_id"]
    events: list[dict[str, Any]] = []
    listener = threading.Thread(target=lambda: events.extend(read_events(api, job_id)))
    listener.start()
    redis_client = redis.Redis.from_url(settings.resolved_redis_url)
    channel = f"{settings.queue_prefix}:job:{job_id}"
    wait_until(lambda: redis_client.pubsub_numsub(channel)[0][1], 10, "the event stream to subscribe")
    run_queued_jobs(settings)
    listener.join(30)
    assert not listener.is_alive(), "the stream did not end when the job finished"
    statuses = [event["status"] for event in events]
    assert statuses[0] == "queued" and statuses[-1] == "succeeded"
    assert "running" in statuses
    stages = [event["progress"]["stage"] for event in events if event["status"] == "running"]
    assert stages == [None, "loading", "forward", "done"]


def test_events_of_a_finished_job_are_its_final_state_then_the_end(
    api: Any, settings: Settings, tiny_llama: Path
) -> None:
    job_id = register(api, tiny_llama).json()["check_job_id"]
    run_queued_jobs(settings)
    events = read_events(api, job_id)
    assert [event["status"] for event in events] == ["succeeded"]


def test_a_ping_job_travels_to_a_worker_and_back(stack: Any) -> None:
    response = stack.client.post("/v1/jobs/ping")
    assert response.status_code == 202
    job = wait_for_job(stack.client, response.json()["job"]["id"])
    assert job["status"] == "succeeded"
    assert job["result"] == {"worker": stack.worker_name, "device": "cpu"}


def test_job_state_survives_a_redis_restart(database_url: str, tmp_path: Path, tiny_llama: Path) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.conftest import RedisServer, make_settings

    own_redis = RedisServer(folder=tmp_path)
    own_redis.start()
    settings = make_settings(database_url, own_redis.url, tmp_path / "var")
    with TestClient(create_app(settings)) as client:
        job_id = register(client, tiny_llama).json()["check_job_id"]
        own_redis.stop()
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
        assert client.get("/readyz").json()["error"]["details"]["missing"] == ["redis", "worker"]
        own_redis.start()  # empty: nothing was saved
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
        assert client.post(f"/v1/models/{client.get('/v1/models').json()['items'][0]['id']}/check").status_code == 202
    own_redis.stop()
