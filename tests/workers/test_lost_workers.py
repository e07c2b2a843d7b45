"""Jobs that lose their worker or their queue: a dead worker's job is retried on another
worker (bounded) or failed with the reason, never left `running`; queued jobs that Redis
forgot, or that wait on a dead worker's own queue, go back on the shared queue."""

import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from rq import Queue

from app import broker, janitor, jobs
from app.job_kinds import NoParameters
from app.registry.tables import Job, utcnow
from app.settings import Settings
from app.storage import open_store
from tests.api.test_models import register
from tests.conftest import start_worker, stop_process, wait_for_job, wait_until
from workers import runner, runtime
from workers.context import JobContext
from workers.errors import AttemptSuperseded


def add_job(
    settings: Settings, job_id: str, status: str, worker: str | None = None, started_ago_s: float = 0, **values: Any
) -> None:
    worker_runtime = runtime.build_runtime(settings)
    started_at = utcnow() - timedelta(seconds=started_ago_s) if status == "running" else None
    with worker_runtime.sessions() as session, session.begin():
        values = {"queue": broker.default_queue(settings)} | values
        session.add(
            Job(id=job_id, kind="ping", params={}, status=status, worker=worker, started_at=started_at, **values)
        )


def rq_ids(connection: redis.Redis, queue: str) -> list[str]:
    return Queue(queue, connection=connection).get_job_ids()


def test_a_lost_job_with_attempts_left_is_queued_again_and_then_failed_with_the_reason(
    api: Any, settings: Settings
) -> None:
    connection = redis.Redis.from_url(settings.resolved_redis_url)
    add_job(settings, "job_retry", "running", "gone-worker", started_ago_s=60, attempts=1)
    add_job(settings, "job_spent", "running", "gone-worker", started_ago_s=60, attempts=settings.job_max_attempts)
    add_job(settings, "job_alive", "running", "busy-worker", started_ago_s=60, attempts=1)
    add_job(settings, "job_new", "running", "gone-worker", started_ago_s=0, attempts=1)
    broker.beat(connection, settings, {"name": "busy-worker", "device": "cpu", "current_job": "job_alive"})

    assert sorted(runtime.build_runtime(settings).recover_jobs_of_lost_workers(suspect_for_s=0)) == [
        "job_retry",
        "job_spent",
    ]

    retried = api.get("/v1/jobs/job_retry").json()
    assert retried["status"] == "queued" and retried["started_at"] is None and retried["progress"]["done"] == 0
    assert rq_ids(connection, broker.default_queue(settings)) == ["job_retry-1"]  # a fresh RQ job for the new attempt
    spent = api.get("/v1/jobs/job_spent").json()
    assert (
        spent["status"] == "failed"
        and spent["error"]["code"] == "worker_lost"
        and "gone-worker" in spent["error"]["message"]
    )
    assert spent["error"]["details"]["attempts"] == settings.job_max_attempts and spent["finished_at"] is not None
    assert api.get("/v1/jobs/job_alive").json()["status"] == "running"
    assert api.get("/v1/jobs/job_new").json()["status"] == "running"


def test_queued_jobs_redis_forgot_or_left_on_a_dead_workers_queue_are_queued_again(
    api: Any, settings: Settings
) -> None:
    connection = redis.Redis.from_url(settings.resolved_redis_url)

    def j(name: str) -> str:  # RQ's job keys are global to the Redis server, so ids differ per run
        return f"{name}_{settings.queue_prefix.rsplit('-', 1)[-1]}"

    created = utcnow() - timedelta(seconds=60)
    add_job(settings, j("job_forgotten"), "queued", created_at=created)
    add_job(settings, j("job_waiting"), "queued", created_at=created)
    add_job(settings, j("job_fresh"), "queued")
    add_job(
        settings, j("job_stranded"), "queued", created_at=created, queue=broker.worker_queue(settings, "gone-worker")
    )
    add_job(settings, j("job_parked"), "queued", created_at=created, queue=broker.worker_queue(settings, "busy-worker"))
    broker.beat(connection, settings, {"name": "busy-worker", "device": "cpu"})
    with runtime.build_runtime(settings).sessions() as session:
        for job_id in (j("job_waiting"), j("job_stranded"), j("job_parked")):
            jobs.put_on_queue(connection, settings, session.get_one(Job, job_id))

    requeued = jobs.requeue_orphans(runtime.build_runtime(settings).sessions, connection, settings, min_age_s=10)

    assert sorted(requeued) == [j("job_forgotten"), j("job_stranded")]
    assert sorted(rq_ids(connection, broker.default_queue(settings))) == [
        j("job_forgotten"),
        j("job_stranded"),
        j("job_waiting"),
    ]
    assert rq_ids(connection, broker.worker_queue(settings, "gone-worker")) == []
    assert rq_ids(connection, broker.worker_queue(settings, "busy-worker")) == [j("job_parked")]
    with runtime.build_runtime(settings).sessions() as session:
        assert session.get_one(Job, j("job_stranded")).queue == broker.default_queue(settings)
    assert (
        jobs.requeue_orphans(runtime.build_runtime(settings).sessions, connection, settings, min_age_s=10) == []
    )  # nothing twice


@pytest.mark.slow
@pytest.mark.parametrize("successor", ["another worker", "the same worker restarted", "no attempt left"])
def test_a_worker_killed_mid_job_has_its_job_finished_by_another_worker(
    api: Any, settings: Settings, tiny_llama: Path, successor: str
) -> None:
    """Also when the worker comes back under its old name, as a container restarted with the
    same hostname and pid does: it starts (RQ still lists the killed one) and takes the job back.
    With no attempt left, the job fails with the reason instead, and nothing half-written stays."""
    attempts = 1 if successor == "no attempt left" else 2
    slow = settings.model_copy(
        update={
            "extraction_max_batch_size": 1,
            "extraction_cache": False,
            "heartbeat_ttl_s": 2.0,
            "job_max_attempts": attempts,
        }
    )
    model = register(api, tiny_llama).json()
    texts = [f"statement number {i} about the city of Paris" for i in range(600)]
    created = api.post("/v1/extractions", json={"model": model["id"], "layers": [1], "texts": texts}).json()
    job_id = created["job"]["id"]
    doomed_name = f"doomed-{slow.queue_prefix}"
    survivor_name = doomed_name if successor == "the same worker restarted" else f"survivor-{slow.queue_prefix}"
    doomed = start_worker(slow, doomed_name)
    try:
        wait_until(
            lambda: api.get(f"/v1/jobs/{job_id}").json()["progress"]["done"] > 0,
            120,
            "the job to make progress",
            interval=0.1,
        )
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
        assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
        survivor = start_worker(slow, survivor_name)
        try:
            job = wait_for_job(api, job_id, timeout=180)
        finally:
            stop_process(survivor)
    finally:
        stop_process(doomed)
    store = open_store(settings)
    if successor == "no attempt left":
        assert (job["status"], job["error"]["code"], job["error"]["details"]) == (
            "failed",
            "worker_lost",
            {"worker": doomed_name, "attempts": 1},
        )
        janitor.sweep(runtime.build_runtime(settings).sessions, store, grace_s=0)
        assert not any(stored.partial or stored.key.startswith("extractions/") for stored in store.iter_objects(""))
        assert api.get(f"/v1/extractions/{created['extraction']['id']}/hidden-states").status_code == 409
        return
    assert job["status"] == "succeeded", job["error"]
    with runtime.build_runtime(settings).sessions() as session:
        row = session.get_one(Job, job_id)
        assert (row.attempts, row.worker) == (2, survivor_name)
    download = api.get(f"/v1/extractions/{created['extraction']['id']}/hidden-states?format=npy")
    import io

    states = np.load(io.BytesIO(download.content))
    assert states.shape == (len(texts), 1, model["hidden_size"]) and np.isfinite(states).all()
    # what the killed attempt left half-written was removed by the retry, before the janitor came
    assert not any(stored.partial for stored in store.iter_objects(""))
    assert janitor.sweep(runtime.build_runtime(settings).sessions, store, grace_s=0).removed == []
    assert (
        api.get(f"/v1/extractions/{created['extraction']['id']}/hidden-states?format=npy").content == download.content
    )


def test_a_job_whose_last_attempt_dies_is_failed_with_the_reason(api: Any, settings: Settings) -> None:
    once = settings.model_copy(update={"job_max_attempts": 1})
    add_job(once, "job_once", "running", "gone-worker", started_ago_s=60, attempts=1)
    assert runtime.build_runtime(once).recover_jobs_of_lost_workers(suspect_for_s=0) == ["job_once"]
    job = api.get("/v1/jobs/job_once").json()
    assert job["status"] == "failed" and job["error"]["details"] == {"worker": "gone-worker", "attempts": 1}


def test_a_job_is_taken_back_only_after_its_worker_stayed_silent_for_the_heartbeat_ttl(
    api: Any, settings: Settings
) -> None:
    """After Redis restarts empty, a live worker's heartbeat is missing until its next beat:
    a sweep in between must not take its job."""
    quick = settings.model_copy(update={"heartbeat_ttl_s": 0.5, "heartbeat_interval_s": 0.1})
    connection = redis.Redis.from_url(settings.resolved_redis_url)
    add_job(quick, "job_late", "running", "late-worker", started_ago_s=60, attempts=1)
    sweeper = runtime.build_runtime(quick)

    assert sweeper.recover_jobs_of_lost_workers() == []  # silent, but not yet for a whole TTL
    broker.beat(connection, quick, {"name": "late-worker", "device": "cpu", "current_job": "job_late"})
    assert sweeper.recover_jobs_of_lost_workers() == []  # alive: no longer suspect
    time.sleep(0.6)  # the heartbeat has expired by now: suspect again, counted from now
    assert sweeper.recover_jobs_of_lost_workers() == []
    assert api.get("/v1/jobs/job_late").json()["status"] == "running"
    time.sleep(0.6)
    assert sweeper.recover_jobs_of_lost_workers() == ["job_late"]  # silent for a whole TTL since
    assert api.get("/v1/jobs/job_late").json()["status"] == "queued"


def test_a_live_worker_that_heartbeats_about_another_job_loses_the_one_it_left_running(
    api: Any, settings: Settings
) -> None:
    """A worker restarted under the same name (a container keeps its hostname and pid) is
    alive, but no longer runs the job its earlier life left `running`."""
    connection = redis.Redis.from_url(settings.resolved_redis_url)
    add_job(settings, "job_left", "running", "same-name", started_ago_s=60, attempts=1)
    add_job(settings, "job_now", "running", "other-worker", started_ago_s=60, attempts=1)
    broker.beat(connection, settings, {"name": "same-name", "device": "cpu", "current_job": None})
    broker.beat(connection, settings, {"name": "other-worker", "device": "cpu", "current_job": "job_now"})
    assert runtime.build_runtime(settings).recover_jobs_of_lost_workers(suspect_for_s=0) == ["job_left"]
    assert api.get("/v1/jobs/job_now").json()["status"] == "running"


def test_an_attempt_taken_back_can_no_longer_write_progress_or_an_outcome(api: Any, settings: Settings) -> None:
    old = runtime.build_runtime(settings.model_copy(update={"worker_name": "old-worker"}))
    new = runtime.build_runtime(settings.model_copy(update={"worker_name": "new-worker"}))
    add_job(settings, "job_fenced", "running", "old-worker", started_ago_s=60, attempts=1)
    old_attempt = JobContext(job_id="job_fenced", params=NoParameters(), runtime=old, attempt=1)
    old_attempt.progress("working", 1, 3)
    assert api.get("/v1/jobs/job_fenced").json()["progress"]["done"] == 1

    assert new.recover_jobs_of_lost_workers(suspect_for_s=0) == ["job_fenced"]  # old-worker has no heartbeat
    with pytest.raises(AttemptSuperseded):
        old_attempt.progress("working", 2, 3)
    assert runner._start(new, "job_fenced") is not None  # the second attempt starts
    runner._finish(old, "job_fenced", 1, time.monotonic(), status="succeeded", result={"from": "the old attempt"})
    job = api.get("/v1/jobs/job_fenced").json()
    assert (job["status"], job["result"], job["attempts"], job["progress"]["done"]) == ("running", None, 2, 0)

    runner._finish(new, "job_fenced", 2, time.monotonic(), status="succeeded", result={"from": "the new attempt"})
    job = api.get("/v1/jobs/job_fenced").json()
    assert (job["status"], job["result"]) == ("succeeded", {"from": "the new attempt"})


def test_a_worker_whose_heartbeat_expired_leaves_the_listing_until_it_beats_again(settings: Settings) -> None:
    connection = redis.Redis.from_url(settings.resolved_redis_url)
    broker.beat(connection, settings, {"name": "blinking", "device": "cpu"})
    broker.beat(connection, settings, {"name": "steady", "device": "cpu"})
    connection.delete(broker.heartbeat_key(settings, "blinking"))  # its key expired
    assert [worker["name"] for worker in broker.live_workers(connection, settings)] == ["steady"]
    assert connection.zrange(f"{settings.queue_prefix}:workers", 0, -1) == [b"steady"]
    broker.beat(connection, settings, {"name": "blinking", "device": "cpu"})
    assert [worker["name"] for worker in broker.live_workers(connection, settings)] == ["blinking", "steady"]


def test_a_queued_job_a_live_worker_is_starting_is_left_to_it(api: Any, settings: Settings) -> None:
    """RQ marks a job started a moment before the worker moves its row to `running`; RQ knows
    the worker as `<name>.<suffix>`."""
    from rq.job import JobStatus

    connection = redis.Redis.from_url(settings.resolved_redis_url)
    suffix = settings.queue_prefix.rsplit("-", 1)[-1]
    created = utcnow() - timedelta(seconds=60)
    for name, worker in ((f"job_starting_{suffix}", "busy-worker"), (f"job_started_by_dead_{suffix}", "gone-worker")):
        add_job(settings, name, "queued", created_at=created)
        with runtime.build_runtime(settings).sessions() as session:
            jobs.put_on_queue(connection, settings, session.get_one(Job, name))
        held = Queue(broker.default_queue(settings), connection=connection).fetch_job(name)
        assert held is not None
        Queue(broker.default_queue(settings), connection=connection).remove(held)
        held.worker_name = broker.rq_worker_name(worker)
        held.set_status(JobStatus.STARTED)
        held.save()
    broker.beat(connection, settings, {"name": "busy-worker", "device": "cpu"})

    requeued = jobs.requeue_orphans(runtime.build_runtime(settings).sessions, connection, settings, min_age_s=10)
    assert requeued == [f"job_started_by_dead_{suffix}"]
