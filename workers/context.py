"""What a job handler gets: its parameters (the model of its kind's, `app.job_kinds`), the
worker's runtime, and `progress()`."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from app import jobs
from app.job_kinds import JobParameters
from app.registry.database import changed_rows
from app.registry.tables import Job
from workers.errors import AttemptSuperseded, JobCancelled, JobFailed
from workers.runtime import WorkerRuntime

RowT = TypeVar("RowT")
ParametersT = TypeVar("ParametersT", bound=JobParameters)


def subject_row(session: Session, table: type[RowT], row_id: str, what: str) -> RowT:
    """The row a job works on (its extraction, probe run…). It can be deleted between the
    job being queued and it starting; the job then fails with `not_found` naming it."""
    row = session.get(table, row_id)
    if row is None:
        raise JobFailed("not_found", f"{what} {row_id} is gone")
    return row


def this_attempt(job_id: str, worker: str, attempt: int) -> tuple[ColumnElement[bool], ...]:
    """Matches the job's row only while it is still this worker's `attempt` at it: once a
    sweep has taken the job back from a worker that looked lost, the old attempt's writes
    match nothing, so a late outcome never overwrites the new attempt's."""
    return (Job.id == job_id, Job.status == "running", Job.worker == worker, Job.attempts == attempt)


@dataclass
class JobContext(Generic[ParametersT]):
    """What a handler gets: its parameters, validated against its kind's model, the
    worker's runtime, and `progress()`."""

    job_id: str
    params: ParametersT
    runtime: WorkerRuntime
    attempt: int = 1

    def progress(self, stage: str, done: int, total: int | None = None, details: dict[str, Any] | None = None) -> None:
        """Record progress (with `details`: figures of this point, such as a training step's
        loss), and stop here if the user asked to cancel or the job was taken back from this
        attempt."""
        with self.runtime.sessions() as session, session.begin():
            recorded = changed_rows(
                session,
                update(Job)
                .where(*this_attempt(self.job_id, self.runtime.name, self.attempt))
                .values(progress_stage=stage, progress_done=done, progress_total=total, progress_details=details),
            )
            if not recorded:
                raise AttemptSuperseded()
            job = session.get_one(Job, self.job_id)
        jobs.publish(self.runtime.redis, self.runtime.settings, job)
        if self.runtime.on_part_progress is not None and self.runtime.current_part == self.job_id:
            self.runtime.on_part_progress()
        if job.cancel_requested:
            raise JobCancelled()

    def check(self) -> None:
        """Stop here if the user asked to cancel or the job was taken back from this attempt,
        without recording progress."""
        with self.runtime.sessions() as session:
            job = session.scalars(
                select(Job).where(*this_attempt(self.job_id, self.runtime.name, self.attempt))
            ).first()
        if job is None:
            raise AttemptSuperseded()
        if job.cancel_requested:
            raise JobCancelled()

    def clear_earlier_attempts(self, *keys: str) -> None:
        """Before this attempt writes `keys`, remove what earlier attempts at the job left
        half-written under them (killed mid-write, they never cleaned up): on a nearly full
        disk the retry needs that space, and the janitor would give it back only after its
        grace period. Earlier attempts are fenced off by now, so nothing live uses it."""
        if self.attempt > 1:
            for key in keys:
                self.runtime.artifacts.remove_partials(key)

    @contextmanager
    def scratch(self) -> Iterator[Path]:
        """This attempt's scratch folder (attempts never share one), after removing the ones
        earlier attempts left on this machine."""
        store = self.runtime.artifacts
        for earlier in range(1, self.attempt):
            store.discard_scratch(f"{self.job_id}-{earlier}")
        with store.scratch(f"{self.job_id}-{self.attempt}") as folder:
            yield folder
