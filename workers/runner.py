"""The one function RQ calls: `run_job(job_id)`. It moves the job row through its states,
checks the job's parameters against its kind's model, hands the job to the handler for its
kind, and records the outcome."""

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import redis
import sqlalchemy.exc
from pydantic import ValidationError
from rq import get_current_job
from rq.timeouts import JobTimeoutException
from sqlalchemy import update

from app import jobs, logs, monitoring
from app.errors import disk_full
from app.job_kinds import PARAMETERS, JobParameters, NoParameters
from app.registry.database import changed_rows
from app.registry.tables import Job, utcnow
from app.storage import ArtifactMissing, StoreUnavailable
from workers import (
    comparison,
    evaluation,
    experiment,
    extraction,
    fanout,
    finetune,
    model_check,
    probe_training,
    runtime,
    transfer,
)
from workers.adapters import importer
from workers.context import JobContext, this_attempt
from workers.errors import AttemptSuperseded, JobCancelled, JobFailed
from workers.runtime import WorkerRuntime

Handler = Callable[[JobContext[Any]], dict[str, Any]]
log = logging.getLogger("workers.runner")
# how long a finished job waits for an unreachable database to record its outcome
FINISH_RETRY_S = 60.0


def ping(context: JobContext[NoParameters]) -> dict[str, Any]:
    return {"worker": context.runtime.name, "device": context.runtime.settings.worker_device}


def tinker_models(context: JobContext[NoParameters]) -> dict[str, Any]:
    from workers.adapters.tinker import TinkerClient

    settings = context.runtime.settings
    models = TinkerClient(settings.tinker_api_key or "", settings.tinker_base_url).supported_models()
    return {"models": [vars(model) for model in models]}


HANDLERS: dict[str, Handler] = {
    "adapter_import": importer.run,
    "comparison": comparison.run,
    "experiment": experiment.run,
    "extraction": extraction.run,
    "extraction_part": extraction.run_part,
    "finetune": finetune.run,
    "model_check": model_check.run,
    "ping": ping,
    "probe_evaluation": evaluation.run,
    "probe_scoring": probe_training.score,
    "probe_training": probe_training.run,
    "states_part": fanout.run_part,
    "tinker_models": tinker_models,
    "transfer": transfer.run,
}


def parameters_of(job: Job) -> JobParameters:
    """The job row's parameters as its kind's model. A row that does not fit fails the job
    before its handler runs, naming each field that is wrong."""
    try:
        return PARAMETERS[job.kind].model_validate(job.params)
    except ValidationError as exc:
        fields = [
            {"field": ".".join(str(part) for part in error["loc"]), "message": error["msg"], "type": error["type"]}
            for error in exc.errors()
        ]
        summary = "; ".join(f"{field['field']}: {field['message']}" for field in fields)
        raise JobFailed(
            "invalid_parameters", f"the parameters of this {job.kind} job are invalid: {summary}", fields=fields
        ) from exc


def _start(worker: WorkerRuntime, job_id: str) -> Job | None:
    """queued → running, unless the job was cancelled (or is unknown) meanwhile."""
    with worker.sessions() as session, session.begin():
        started = changed_rows(
            session,
            update(Job)
            .where(Job.id == job_id, Job.status == "queued")
            .values(status="running", started_at=utcnow(), worker=worker.name, attempts=Job.attempts + 1),
        )
        return session.get(Job, job_id) if started else None


def _finish(worker: WorkerRuntime, job_id: str, attempt: int, started: float, **outcome: Any) -> None:
    """Record the outcome, only while the job is still this attempt's (`this_attempt`). A
    database that is away is waited for, up to FINISH_RETRY_S; after that the row stays
    `running` while this worker's heartbeat names no job, and a sweep takes it back."""
    deadline, pause = time.monotonic() + FINISH_RETRY_S, 0.5
    while True:
        try:
            with worker.sessions() as session, session.begin():
                recorded = changed_rows(
                    session,
                    update(Job)
                    .where(*this_attempt(job_id, worker.name, attempt))
                    .values(finished_at=utcnow(), **outcome),
                )
                job = session.get_one(Job, job_id)
            break
        except sqlalchemy.exc.OperationalError:
            if time.monotonic() > deadline:
                log.error(
                    "job outcome %s could not be recorded: the database is unreachable; the job will be taken back and run again",
                    outcome.get("status"),
                )
                return
            time.sleep(pause)
            pause = min(2 * pause, 5.0)
    if not recorded and (job.status, job.worker, job.attempts) == (outcome.get("status"), worker.name, attempt):
        recorded = True  # an earlier try committed it, and only its answer was lost
    if not recorded:
        log.warning(
            "job outcome %s dropped: the job was taken back from this attempt (now %s)",
            outcome.get("status"),
            job.status,
            extra={"attempt": attempt},
        )
        return
    seconds = time.monotonic() - started
    log.info(
        "job %s",
        job.status,
        extra={
            "kind": job.kind,
            "status": job.status,
            "seconds": round(seconds, 3),
            "error_code": (job.error or {}).get("code"),
        },
    )
    jobs.publish(worker.redis, worker.settings, job)
    if worker.outage.ongoing:
        return  # a figure lost to the Redis outage; the job's outcome is in the registry
    try:
        monitoring.record_job_duration(worker.redis, worker.settings, job.kind, job.status, seconds)
    except redis.exceptions.RedisError:
        pass  # a figure lost to a Redis outage; the job's outcome is in the registry


def timed_out(exc: BaseException) -> bool:
    """Whether `exc` is RQ's alarm for the job's time limit, also where it went off inside a
    database statement (SQLAlchemy wraps it in a StatementError, the alarm as `orig`)."""
    return isinstance(exc, JobTimeoutException) or isinstance(getattr(exc, "orig", None), JobTimeoutException)


def unexpected_error_message(exc: Exception) -> str:
    """What a job's record says of an unexpected error: its kind and text, but for an OSError
    only the system's reason, as its text repeats the server's paths (the log keeps them)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}"


def run_job(job_id: str) -> None:
    with logs.job_scope(job_id):
        _run_job(job_id)


def _run_job(job_id: str) -> None:
    worker = runtime.current()
    job = _start(worker, job_id)
    if job is None:
        log.info("job skipped: no longer queued")
        return
    run_started(worker, job)


def run_part(worker: WorkerRuntime, part_id: str) -> bool:
    """Start and run a queued part of the job this worker is running, in its place (as RQ
    would have run it: the same start, handler and outcome), reported in the heartbeat as
    the worker's `current_part`. Whether this worker started it: another may have first."""
    with logs.job_scope(part_id):
        job = _start(worker, part_id)
        if job is None:
            return False
        run_started(worker, job, part=True)
        return True


def run_started(worker: WorkerRuntime, job: Job, part: bool = False) -> None:
    """Run a job this worker has just started (moved to `running`), and record its outcome."""
    job_id = job.id
    log.info("job started", extra={"kind": job.kind, "attempt": job.attempts, "worker": worker.name})
    started = time.monotonic()
    jobs.publish(worker.redis, worker.settings, job)
    worker.set_current_job(job_id, part=part)
    finish = functools.partial(_finish, worker, job_id, job.attempts, started)
    try:
        handler = HANDLERS.get(job.kind)
        if handler is None:
            raise JobFailed("unknown_kind", f"this worker has no handler for jobs of kind {job.kind!r}")
        context = JobContext(job_id=job_id, params=parameters_of(job), runtime=worker, attempt=job.attempts)
        result = handler(context)
    except AttemptSuperseded:
        log.warning("job stopped: it was taken back from this attempt", extra={"attempt": job.attempts})
    except JobCancelled:
        finish(status="cancelled", error={"code": "cancelled", "message": "cancelled while running", "details": {}})
    except JobFailed as exc:
        finish(status="failed", error={"code": exc.code, "message": exc.message, "details": exc.details})
    except ArtifactMissing as exc:
        log.error("artifact missing from the store: %s", exc)
        finish(status="failed", error={"code": "artifact_missing", "message": str(exc), "details": {"key": exc.key}})
    except StoreUnavailable as exc:
        log.warning("job failed: the artifact store is unreachable: %s", exc)
        finish(
            status="failed",
            error={"code": "unavailable", "message": str(exc), "details": {"backend": "artifact store"}},
        )
    except sqlalchemy.exc.OperationalError as exc:
        log.warning("job failed: the database is unreachable: %s", exc)
        finish(
            status="failed",
            error={
                "code": "unavailable",
                "message": f"the database is unreachable: {exc}",
                "details": {"backend": "database"},
            },
        )
    except Exception as exc:
        if timed_out(exc):
            # RQ's alarm (JOB_TIMEOUT_S, set on every job when it is queued) went off in the handler
            rq_job = get_current_job()
            limit = int(rq_job.timeout) if rq_job is not None and rq_job.timeout else worker.settings.job_timeout_s
            log.warning("job stopped: it ran longer than its limit of %d s", limit)
            finish(
                status="failed",
                error={
                    "code": "timeout",
                    "message": f"the job ran longer than its limit of {limit} s (JOB_TIMEOUT_S)",
                    "details": {"limit_s": limit},
                },
            )
        elif disk_full(exc):
            log.error("job failed: no space left: %s", exc)
            message = "no space is left on the worker's disk or in the artifact store; free some and run the job again"
            finish(status="failed", error={"code": "store_full", "message": message, "details": {"backend": "disk"}})
        else:  # a bug or an unexpected library error: record it, keep the worker alive
            log.exception("job failed with an unexpected error")
            finish(status="failed", error={"code": "internal", "message": unexpected_error_message(exc), "details": {}})
    else:
        finish(status="succeeded", result=result)
    finally:
        worker.set_current_job(None, part=part)
