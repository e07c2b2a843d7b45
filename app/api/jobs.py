"""`/v1/jobs`: status, list, cancel, and server-sent events of a job's progress."""

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.sse import EventSourceResponse, ServerSentEvent

from app import broker, jobs
from app.api.deps import RedisDep, SessionDep, SessionsDep, SettingsDep
from app.job_kinds import NoParameters
from app.schemas.common import ERROR_RESPONSES
from app.schemas.jobs import TERMINAL_STATUSES, JobAccepted, JobOut, JobPage, JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERROR_RESPONSES)

EVENT_POLL_S = 5.0


@router.get("")
def list_all_jobs(
    session: SessionDep,
    settings: SettingsDep,
    status: JobStatus | None = None,
    kind: Annotated[str | None, Query(max_length=40)] = None,
    cursor: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JobPage:
    """Newest first, filtered by status and kind; follow `next_cursor` for older ones."""
    found, next_cursor = jobs.list_jobs(
        session, status=status, kind=kind, cursor=cursor, limit=min(limit, settings.page_size_max)
    )
    return JobPage(items=[JobOut.of(job) for job in found], next_cursor=next_cursor)


@router.post("/ping", status_code=202)
def ping_workers(response: Response, settings: SettingsDep, sessions: SessionsDep, connection: RedisDep) -> JobAccepted:
    """A canary job that does nothing on a worker: it proves the whole path (gateway →
    Redis → worker → registry) works, and how fast, without touching a model."""
    job, _ = jobs.submit(
        sessions, connection, settings, "ping", lambda _session, _job_id: jobs.Submission(NoParameters(), None, None)
    )
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobAccepted(job=JobOut.of(job))


@router.get("/{job_id}")
def show_job(job_id: str, session: SessionDep) -> JobOut:
    """The job; a job spread over workers lists its `parts`, which are jobs of their own."""
    return JobOut.of(jobs.get_job(session, job_id), parts=jobs.parts_of(session, job_id))


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, settings: SettingsDep, sessions: SessionsDep, connection: RedisDep) -> JobOut:
    """A queued job is cancelled at once; a running one gets `cancel_requested` and stops at
    its next progress point. A job spread over workers is cancelled with all its parts; a part
    alone cannot be (409 naming its job). A finished job → 409."""
    return JobOut.of(jobs.cancel(sessions, connection, settings, job_id))


def existing_job_id(job_id: str, sessions: SessionsDep) -> str:
    """Runs before a stream starts, so an unknown job is a plain 404. It holds no database
    connection for the life of the stream (a session dependency would)."""
    with sessions() as session:
        return jobs.get_job(session, job_id).id


@router.get("/{job_id}/events", response_class=EventSourceResponse, responses={404: {"description": "No such job."}})
async def job_events(
    job_id: Annotated[str, Depends(existing_job_id)], request: Request, settings: SettingsDep, sessions: SessionsDep
) -> AsyncIterator[ServerSentEvent]:
    """The job's state as server-sent events (`event: job`, JSON data): once at once, then at
    every change, until it is final. Quiet periods send a comment as keep-alive."""

    def read_job() -> JobOut:
        with sessions() as session:
            return JobOut.of(jobs.get_job(session, job_id))

    pubsub = request.app.state.async_redis.pubsub()
    await pubsub.subscribe(broker.job_channel(settings, job_id))
    try:
        current = await run_in_threadpool(read_job)  # read after subscribing: no change is missed
        yield ServerSentEvent(
            event="job", id=f"{current.status}:{current.progress.done}", raw_data=current.model_dump_json()
        )
        while current.status not in TERMINAL_STATUSES:
            if await request.is_disconnected():
                return
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=EVENT_POLL_S)
            if message is None:
                latest = await run_in_threadpool(read_job)
                if latest == current:
                    yield ServerSentEvent(comment="keep-alive")
                    continue
            else:
                latest = JobOut.model_validate(json.loads(message["data"]))
            current = latest
            yield ServerSentEvent(
                event="job", id=f"{current.status}:{current.progress.done}", raw_data=current.model_dump_json()
            )
    finally:
        await pubsub.unsubscribe()
        await pubsub.aclose()
