"""Job submission, state changes, cancellation and event publication.

The registry row is the truth about a job; RQ carries only `workers.runner.run_job(job_id)`.
State changes are compare-and-set updates on the row, so a cancel racing a worker's start
has exactly one winner.
"""

import time
from collections.abc import Callable
from typing import Any

import redis
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from app import broker
from app.errors import ServiceError, not_found
from app.registry.database import keyset_page, transaction
from app.registry.tables import Job, new_id, utcnow
from app.schemas import JobOut
from app.settings import Settings

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
RUN_JOB = "workers.runner.run_job"


def new_job(kind: str, params: dict[str, Any], queue: str, model_id: str | None = None) -> Job:
    return Job(id=new_id("job"), kind=kind, params=params, queue=queue, model_id=model_id, status="queued")


def enqueue(
    sessions: sessionmaker[Session],
    connection: redis.Redis,
    settings: Settings,
    job: Job,
    undo: Callable[[Session], None],
) -> None:
    """Put a committed job on its RQ queue. If Redis refuses, `undo` removes what the
    request wrote (the job row and whatever it belongs to) and the client gets 503."""
    from rq import (
        Queue,  # imported on first use: it is slow to import, and start-up is measured
    )

    try:
        Queue(job.queue, connection=connection).enqueue(
            RUN_JOB, job.id, job_id=job.id, job_timeout=settings.job_timeout_s, result_ttl=0, failure_ttl=86400
        )
    except redis.exceptions.RedisError as exc:
        with transaction(sessions) as session:
            undo(session)
        raise ServiceError(503, "unavailable", f"the job queue (Redis) is unreachable: {exc}", backend="redis") from exc


def deleting(*job_ids: str) -> Callable[[Session], None]:
    """An `undo` for `enqueue` that removes the given job rows."""

    def undo(session: Session) -> None:
        session.execute(delete(Job).where(Job.id.in_(job_ids)))

    return undo


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


def list_jobs(session: Session, *, status: str | None, kind: str | None, cursor: str | None, limit: int) -> tuple[list[Job], str | None]:
    query = select(Job)
    if status:
        query = query.where(Job.status == status)
    if kind:
        query = query.where(Job.kind == kind)
    return keyset_page(session, query, Job.id, cursor, limit)


def publish(connection: redis.Redis, settings: Settings, job: Job) -> None:
    """Tell `GET /v1/jobs/{id}/events` listeners the job changed. Best effort: the row is
    the truth, and listeners re-read it when Redis is silent."""
    try:
        connection.publish(broker.job_channel(settings, job.id), JobOut.of(job).model_dump_json())
    except redis.exceptions.RedisError:
        pass


def cancel(sessions: sessionmaker[Session], connection: redis.Redis, settings: Settings, job_id: str) -> Job:
    """A queued job is cancelled at once and never runs; a running one is asked to stop and
    stops at its next progress point."""
    with transaction(sessions) as session:
        job = get_job(session, job_id)
        if job.status in TERMINAL_STATUSES:
            raise ServiceError(409, "conflict", f"job {job_id} already {job.status}", job_status=job.status)
        cancelled_while_queued = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "queued")
            .values(status="cancelled", cancel_requested=True, finished_at=utcnow(), error={"code": "cancelled", "message": "cancelled before it started", "details": {}})
        ).rowcount
        if not cancelled_while_queued:
            session.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(cancel_requested=True))
    with sessions() as session:
        job = get_job(session, job_id)
    if cancelled_while_queued:
        from rq import Queue

        try:
            Queue(job.queue, connection=connection).remove(job_id)
        except redis.exceptions.RedisError:
            pass  # the worker skips a cancelled row anyway
    publish(connection, settings, job)
    return job


async def wait_for_final(
    sessions: sessionmaker[Session], async_redis: Any, settings: Settings, job_id: str, timeout_s: float
) -> JobOut:
    """The job once it is final, or as it is when `timeout_s` runs out. Listens to the job's
    events and re-reads the row now and then, so a missed event costs at most a poll."""
    from fastapi.concurrency import run_in_threadpool

    def read() -> JobOut:
        with sessions() as session:
            return JobOut.of(get_job(session, job_id))

    deadline = time.monotonic() + timeout_s
    pubsub = async_redis.pubsub()
    await pubsub.subscribe(broker.job_channel(settings, job_id))
    try:
        job = await run_in_threadpool(read)
        while job.status not in TERMINAL_STATUSES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=min(remaining, 1.0))
            job = JobOut.model_validate_json(message["data"]) if message else await run_in_threadpool(read)
        return job
    finally:
        await pubsub.unsubscribe()
        await pubsub.aclose()
