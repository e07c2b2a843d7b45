"""Job submission, state changes, cancellation and event publication.

The registry row is the truth about a job; RQ carries only `workers.runner.run_job(job_id)`.
State changes are compare-and-set updates on the row, so a cancel racing a worker's start
has exactly one winner.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, TypeVar

import redis
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, load_only, sessionmaker

from app import broker
from app.errors import ServiceError, not_found
from app.job_kinds import PARAMETERS, JobParameters
from app.registry.database import changed_rows, keyset_page, transaction
from app.registry.tables import Base, Job, new_id, utcnow
from app.schemas.jobs import TERMINAL_STATUSES, JobOut
from app.settings import Settings

log = logging.getLogger("app.jobs")
RUN_JOB = "workers.runner.run_job"


def new_job(
    kind: str, params: JobParameters, queue: str, model_id: str | None = None, job_id: str | None = None
) -> Job:
    """A queued job row of `kind`, its parameters (the model of that kind's, `PARAMETERS`)
    kept as JSON."""
    expected = PARAMETERS[kind]
    if type(params) is not expected:
        raise TypeError(f"a {kind} job takes {expected.__name__}, not {type(params).__name__}")
    return Job(
        id=job_id or new_id("job"),
        kind=kind,
        params=params.model_dump(mode="json"),
        queue=queue,
        model_id=model_id,
        status="queued",
    )


def rq_job_id(job: Job) -> str:
    """RQ's id for the job's current attempt. A retry gets a fresh RQ job, so nothing RQ
    still holds about a dead attempt (its started-job registry entry) can touch the retry."""
    return f"{job.id}-{job.attempts}" if job.attempts else job.id


def put_on_queue(connection: redis.Redis, settings: Settings, job: Job) -> None:
    """Hand the job to RQ on `job.queue`. Running it twice is harmless: a worker starts a
    job only by moving its row from `queued` to `running`."""
    from rq import (
        Queue,  # imported on first use: it is slow to import, and start-up is measured
    )

    Queue(job.queue, connection=connection).enqueue(
        RUN_JOB, job.id, job_id=rq_job_id(job), job_timeout=settings.job_timeout_s, result_ttl=0, failure_ttl=86400
    )


def put_all_on_queue(connection: redis.Redis, settings: Settings, batch: list[Job]) -> None:
    """Hand several jobs to RQ in one round trip (RQ's `enqueue_many`, a Redis pipeline), each
    on its `job.queue`; as harmless to repeat as `put_on_queue`."""
    from rq import Queue

    by_queue: dict[str, list[Job]] = {}
    for job in batch:
        by_queue.setdefault(job.queue, []).append(job)
    for name, queued in by_queue.items():
        queue = Queue(name, connection=connection)
        queue.enqueue_many(
            [
                Queue.prepare_data(
                    RUN_JOB,
                    (job.id,),
                    job_id=rq_job_id(job),
                    timeout=settings.job_timeout_s,
                    result_ttl=0,
                    failure_ttl=86400,
                )
                for job in queued
            ]
        )


def enqueue(
    sessions: sessionmaker[Session],
    connection: redis.Redis,
    settings: Settings,
    job: Job,
    undo: Callable[[Session], None],
) -> None:
    """Put a committed job on its RQ queue — a job for a model on the queue of a worker that
    holds the model, when there is one (`broker.route`). If Redis refuses, `undo` removes
    what the request wrote (the job row and whatever it belongs to) and the client gets 503."""
    try:
        if job.model_id:
            queue = broker.route(connection, settings, job.model_id)
            if queue != job.queue:
                with transaction(sessions) as session:
                    session.execute(update(Job).where(Job.id == job.id).values(queue=queue))
                job.queue = queue
        put_on_queue(connection, settings, job)
        log.info("job queued", extra={"job_id": job.id, "kind": job.kind, "queue": job.queue})
    except redis.exceptions.RedisError as exc:
        log.warning("job not queued, Redis refused: %s", exc, extra={"job_id": job.id, "kind": job.kind})
        with transaction(sessions) as session:
            undo(session)
        raise ServiceError(503, "unavailable", f"the job queue (Redis) is unreachable: {exc}", backend="redis") from exc


def requeue_orphans(
    sessions: sessionmaker[Session], connection: redis.Redis, settings: Settings, min_age_s: float
) -> list[str]:
    """Queued jobs that RQ no longer holds go back on a queue, from the registry.

    That covers a Redis that restarted empty (or lost its last writes), a gateway that died
    between committing a job and enqueueing it, and jobs waiting on the own queue of a worker
    that has since died (they move to the shared queue). Jobs younger than `min_age_s` are
    left alone: their gateway may be enqueueing them right now."""
    from rq import Queue
    from rq.job import Job as RQJob
    from rq.job import JobStatus

    cutoff = utcnow() - timedelta(seconds=min_age_s)
    with sessions() as session:
        # what queueing needs, not the parameters: a split job has hundreds of queued parts
        listed = load_only(Job.id, Job.status, Job.queue, Job.attempts, Job.kind)
        waiting = list(
            session.scalars(
                select(Job).options(listed).where(Job.status == "queued", Job.created_at < cutoff).order_by(Job.id)
            )
        )
    if not waiting:
        return []
    live = {worker["name"] for worker in broker.live_workers(connection, settings)}
    live_queues = {broker.worker_queue(settings, name) for name in live}
    shared = broker.default_queue(settings)
    requeued = []
    on_live_queues = [job for job in waiting if job.queue == shared or job.queue in live_queues]
    # what RQ holds of them, in one round trip
    held_by_rq = dict(
        zip(
            [job.id for job in on_live_queues],
            RQJob.fetch_many([rq_job_id(job) for job in on_live_queues], connection=connection),
            strict=True,
        )
    )
    for job in waiting:
        if job.id not in held_by_rq:
            Queue(job.queue, connection=connection).remove(rq_job_id(job))
            with transaction(sessions) as session:
                moved = changed_rows(
                    session, update(Job).where(Job.id == job.id, Job.status == "queued").values(queue=shared)
                )
            if not moved:
                continue
            job.queue = shared
        else:
            held = held_by_rq[job.id]
            status = held.get_status(refresh=False) if held is not None else None
            if status == JobStatus.QUEUED or (
                held is not None and status == JobStatus.STARTED and broker.worker_of_rq_name(held.worker_name) in live
            ):
                continue  # waiting on its queue, or being started by a live worker right now
        put_on_queue(connection, settings, job)
        log.info("job queued again: RQ no longer held it", extra={"job_id": job.id, "queue": job.queue})
        requeued.append(job.id)
    return requeued


SubjectT = TypeVar("SubjectT", bound=Base | None)


@dataclass(frozen=True)
class Submission(Generic[SubjectT]):
    """What a job is submitted with: its parameters (the model of its kind's, from
    `app.job_kinds`), the model it runs (for routing), and the row it works on (an
    extraction, a probe run…), inserted with it and removed with it."""

    params: JobParameters
    model_id: str | None
    subject: SubjectT


def submit(
    sessions: sessionmaker[Session],
    connection: redis.Redis,
    settings: Settings,
    kind: str,
    prepare: Callable[[Session, str], Submission[SubjectT]],
    undo_also: Callable[[], None] | None = None,
) -> tuple[Job, SubjectT]:
    """Submit a job of `kind` in one call: `prepare(session, job_id)` checks the request and
    builds the job's subject row, which is committed together with the job row (the job
    first: the subject points at it); then the job goes on its queue. If Redis refuses, the
    subject row and the job row are removed together, `undo_also` runs (a staged upload,
    say), and the client gets 503 — nothing half-submitted remains."""
    with transaction(sessions) as session:
        job_id = new_id("job")
        submission = prepare(session, job_id)
        job = new_job(kind, submission.params, broker.default_queue(settings), submission.model_id, job_id)
        session.add(job)
        session.flush()
        if submission.subject is not None:
            session.add(submission.subject)

    def undo(session: Session) -> None:
        subject = submission.subject
        if subject is not None:
            table = type(subject)
            session.execute(delete(table).where(table.id == subject.id))  # type: ignore[attr-defined]
        session.execute(delete(Job).where(Job.id == job.id))
        if undo_also is not None:
            undo_also()

    enqueue(sessions, connection, settings, job, undo)
    return job, submission.subject


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


def list_jobs(
    session: Session, *, status: str | None, kind: str | None, cursor: str | None, limit: int
) -> tuple[list[Job], str | None]:
    query = select(Job)
    if status:
        query = query.where(Job.status == status)
    if kind:
        query = query.where(Job.kind == kind)
    return keyset_page(session, query, Job.id, cursor, limit)


# After Redis failed to answer an event in time, events on that connection are dropped for
# this long without asking: a hung Redis would otherwise cost every progress point a job
# makes a whole socket timeout. (A refused connection fails at once and costs nothing.)
QUIET_AFTER_TIMEOUT_S = 5.0
_quiet_until: dict[int, float] = {}


def publish(connection: redis.Redis, settings: Settings, job: Job) -> None:
    """Tell `GET /v1/jobs/{id}/events` listeners the job changed. Best effort: the row is
    the truth, and listeners re-read it when Redis is silent."""
    pool = id(connection.connection_pool)
    if time.monotonic() < _quiet_until.get(pool, 0.0):
        return
    try:
        connection.publish(broker.job_channel(settings, job.id), JobOut.of(job).model_dump_json())
    except redis.exceptions.TimeoutError:
        _quiet_until[pool] = time.monotonic() + QUIET_AFTER_TIMEOUT_S
    except redis.exceptions.RedisError:
        pass


def parts_of(session: Session, job_id: str) -> list[Job]:
    """The parts of a job spread over workers, in order (by part number); none for other jobs.
    Their parameters, which list a part's rows (thousands of numbers each), are left unread
    until asked for: a job's record lists hundreds of parts, and is read every few seconds."""
    listed = load_only(
        Job.id,
        Job.kind,
        Job.status,
        Job.worker,
        Job.attempts,
        Job.queue,
        Job.parent_id,
        Job.progress_stage,
        Job.progress_done,
        Job.progress_total,
    )
    # parts are created in order, a microsecond apart (`workers/fanout.py`): ordering by their
    # creation reads no parameters, where ordering by `params.part` would parse each one's
    query = select(Job).options(listed).where(Job.parent_id == job_id).order_by(Job.created_at, Job.id)
    return list(session.scalars(query))


def _cancel_row(session: Session, job_id: str) -> bool:
    """Cancel one unfinished row: a queued one at once (True), a running one by asking it
    to stop at its next progress point (False)."""
    cancelled_while_queued = changed_rows(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(
            status="cancelled",
            cancel_requested=True,
            finished_at=utcnow(),
            error={"code": "cancelled", "message": "cancelled before it started", "details": {}},
        ),
    )
    if not cancelled_while_queued:
        session.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(cancel_requested=True))
    return bool(cancelled_while_queued)


def cancel(sessions: sessionmaker[Session], connection: redis.Redis, settings: Settings, job_id: str) -> Job:
    """A queued job is cancelled at once and never runs; a running one is asked to stop and
    stops at its next progress point. A job spread over workers is cancelled with every part
    it has not finished; a part alone is refused (409 naming its job), as the job could
    never finish without it."""
    with transaction(sessions) as session:
        job = get_job(session, job_id)
        if job.parent_id is not None:
            raise ServiceError(
                409,
                "conflict",
                f"job {job_id} is a part of job {job.parent_id}; cancel that job, which cancels all its parts",
                parent_id=job.parent_id,
            )
        if job.status in TERMINAL_STATUSES:
            raise ServiceError(409, "conflict", f"job {job_id} already {job.status}", job_status=job.status)
        cancelled_while_queued = _cancel_row(session, job_id)
    with sessions() as session:
        job = get_job(session, job_id)
    if cancelled_while_queued:
        _unqueue(connection, job)
    publish(connection, settings, job)
    cancel_parts(sessions, connection, settings, job_id)
    return job


def _unqueue(connection: redis.Redis, job: Job) -> None:
    from rq import Queue

    try:
        Queue(job.queue, connection=connection).remove(rq_job_id(job))
    except redis.exceptions.RedisError:
        pass  # the worker skips a cancelled row anyway


def cancel_parts(sessions: sessionmaker[Session], connection: redis.Redis, settings: Settings, job_id: str) -> None:
    """Cancel every part of `job_id` not yet finished: queued ones never start, running ones
    stop at their next progress point."""
    with transaction(sessions) as session:
        unfinished = [part.id for part in parts_of(session, job_id) if part.status not in TERMINAL_STATUSES]
        cancelled = {part_id for part_id in unfinished if _cancel_row(session, part_id)}
    if not unfinished:
        return
    with sessions() as session:
        changed = [get_job(session, part_id) for part_id in unfinished]
    for part in changed:
        if part.id in cancelled:
            _unqueue(connection, part)
        publish(connection, settings, part)


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
