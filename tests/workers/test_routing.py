"""Model-affinity routing: jobs for a model go to the own queue of a worker holding it
resident; when none does, or those that do are backed up, to the shared queue, from which
any worker takes them and loads the model on demand."""

from pathlib import Path
from typing import Any

import pytest
import redis

from app import broker
from app.settings import Settings
from tests.api.test_models import register
from tests.conftest import start_worker, stop_process, wait_for_job, wait_until


def holding(name: str, *model_ids: str, current_job: str | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "device": "cpu",
        "resident_models": [{"model_id": m, "bytes": 1, "adapters": []} for m in model_ids],
        "current_job": current_job,
    }


def test_route_prefers_the_least_backed_up_holder_and_falls_back_to_the_shared_queue(settings: Settings) -> None:
    connection = redis.Redis.from_url(settings.resolved_redis_url)
    settings = settings.model_copy(update={"affinity_max_backlog": 2})
    assert broker.route(connection, settings, "mdl_a") == broker.default_queue(settings)  # nobody holds it

    broker.beat(connection, settings, holding("busy", "mdl_a", current_job="job_x"))
    broker.beat(connection, settings, holding("idle", "mdl_a", "mdl_b"))
    broker.beat(connection, settings, holding("other", "mdl_c"))
    assert broker.route(connection, settings, "mdl_a") == broker.worker_queue(settings, "idle")
    assert broker.route(connection, settings, "mdl_c") == broker.worker_queue(settings, "other")

    connection.rpush(broker.rq_queue_key(broker.worker_queue(settings, "idle")), "j1", "j2")
    assert broker.route(connection, settings, "mdl_a") == broker.worker_queue(settings, "busy")  # backlog 1 beats 2
    connection.rpush(broker.rq_queue_key(broker.worker_queue(settings, "busy")), "j3")
    assert broker.route(connection, settings, "mdl_a") == broker.default_queue(settings)  # both at the limit

    broker.forget(connection, settings, "other")
    assert broker.route(connection, settings, "mdl_c") == broker.default_queue(settings)  # a gone worker gets nothing


def _extract(client: Any, model_id: str) -> dict[str, Any]:
    job = client.post(
        "/v1/extractions",
        json={"model": model_id, "layers": [1], "texts": ["Paris is in France.", "Rome is in Spain."]},
    ).json()["job"]
    return job


@pytest.mark.slow
def test_two_workers_share_jobs_by_model_affinity(api: Any, settings: Settings, tiny_llama: Path) -> None:
    settings = settings.model_copy(update={"extraction_cache": False, "affinity_max_backlog": 2})
    names = [f"left-{settings.queue_prefix}", f"right-{settings.queue_prefix}"]
    workers = [start_worker(settings, name) for name in names]
    try:
        model = register(api, tiny_llama).json()
        check = wait_for_job(api, model["check_job_id"])
        assert check["status"] == "succeeded"
        holder = next(
            w["name"]
            for w in api.get("/v1/workers").json()["items"]
            if any(m["model_id"] == model["id"] for m in w["resident_models"])
        )
        other = next(name for name in names if name != holder)

        # one at a time: every job goes to the holder's own queue and runs there
        for _ in range(3):
            job = wait_for_job(api, _extract(api, model["id"])["id"])
            assert job["status"] == "succeeded"
        ran_on = [row["worker"] for row in _job_rows(settings, "extraction")]
        assert ran_on == [holder] * 3
        assert {row["queue"] for row in _job_rows(settings, "extraction")} == {broker.worker_queue(settings, holder)}
        assert not _holds(api, other, model["id"])

        # a burst backs the holder up: the rest go to the shared queue and the other worker loads the model
        burst = [_extract(api, model["id"])["id"] for _ in range(8)]
        for job_id in burst:
            assert wait_for_job(api, job_id)["status"] == "succeeded"
        rows = {row["id"]: row for row in _job_rows(settings, "extraction")}
        assert {rows[j]["queue"] for j in burst} == {
            broker.worker_queue(settings, holder),
            broker.default_queue(settings),
        }
        assert other in {rows[j]["worker"] for j in burst}
        assert all(
            rows[j]["worker"] == holder for j in burst if rows[j]["queue"] == broker.worker_queue(settings, holder)
        )
        wait_until(lambda: _holds(api, other, model["id"]), 10, "the other worker to report the model resident")
    finally:
        for process in workers:
            stop_process(process)


def _holds(api: Any, worker: str, model_id: str) -> bool:
    return any(
        w["name"] == worker and any(m["model_id"] == model_id for m in w["resident_models"])
        for w in api.get("/v1/workers").json()["items"]
    )


def _job_rows(settings: Settings, kind: str) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from app.registry.tables import Job
    from workers import runtime

    with runtime.build_runtime(settings).sessions() as session:
        return [
            {"id": j.id, "worker": j.worker, "queue": j.queue}
            for j in session.scalars(select(Job).where(Job.kind == kind).order_by(Job.id))
        ]
