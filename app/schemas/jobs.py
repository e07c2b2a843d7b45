"""Jobs: their status, progress, error and pages of them."""

from datetime import datetime
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field

from app.registry.tables import Job

TerminalStatus = Literal["succeeded", "failed", "cancelled"]
JobStatus = Literal["queued", "running", TerminalStatus]
# read from the Literal, so that the statuses a job ends in are written once
TERMINAL_STATUSES: frozenset[str] = frozenset(get_args(TerminalStatus))


class Progress(BaseModel):
    stage: str | None
    done: int
    total: int | None
    details: dict[str, Any] | None = Field(
        None,
        description="Figures of this point, where the stage has some: a fine-tune's step `loss` and `learning_rate`.",
    )


class JobError(BaseModel):
    code: str
    message: str
    details: dict[str, Any] = {}


class JobPart(BaseModel):
    """One part of a job spread over workers, as the job's own record lists it."""

    id: str
    status: JobStatus
    worker: str | None = Field(description="The worker that ran (or runs) the part's latest attempt.")
    attempts: int
    progress: Progress


class JobOut(BaseModel):
    id: str
    kind: str
    status: JobStatus
    progress: Progress
    result: dict[str, Any] | None
    error: JobError | None
    cancel_requested: bool
    attempts: int = Field(
        0,
        description="Times a worker has started the job; a job whose worker died is started again, up to JOB_MAX_ATTEMPTS.",
    )
    worker: str | None
    model_id: str | None
    parent_id: str | None = Field(None, description="For a part of a job spread over workers: the job it is part of.")
    parts: list[JobPart] | None = Field(
        None,
        description="For a job spread over workers (a large extraction), its parts in order, as `GET /v1/jobs/{id}` "
        "shows them; null for other jobs, in listings and in events.",
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, job: Job, parts: list[Job] | None = None) -> "JobOut":
        return cls(
            id=job.id,
            kind=job.kind,
            status=job.status,
            progress=Progress(
                stage=job.progress_stage,
                done=job.progress_done,
                total=job.progress_total,
                details=job.progress_details,
            ),
            result=job.result,
            error=JobError(**job.error) if job.error else None,
            cancel_requested=job.cancel_requested,
            attempts=job.attempts or 0,
            worker=job.worker,
            model_id=job.model_id,
            parent_id=job.parent_id,
            parts=None
            if not parts
            else [
                JobPart(
                    id=part.id,
                    status=part.status,
                    worker=part.worker,
                    attempts=part.attempts or 0,
                    progress=Progress(stage=part.progress_stage, done=part.progress_done, total=part.progress_total),
                )
                for part in parts
            ],
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


class JobAccepted(BaseModel):
    job: JobOut


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")
