"""What a job handler gets: its parameters, the worker's runtime, and `progress()`."""

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, update

from app import jobs
from app.registry.tables import Job
from workers.errors import AttemptSuperseded, JobCancelled
from workers.runtime import WorkerRuntime


def this_attempt(job_id: str, worker: str, attempt: int) -> tuple[ColumnElement[bool], ...]:
    """Matches the job's row only while it is still this worker's `attempt` at it: once a
    sweep has taken the job back from a worker that looked lost, the old attempt's writes
    match nothing, so a late outcome never overwrites the new attempt's."""
    return (Job.id == job_id, Job.status == "running", Job.worker == worker, Job.attempts == attempt)


@dataclass
class JobContext:
    """What a handler gets: its parameters, the worker's runtime, and `progress()`."""

    job_id: str
    params: dict[str, Any]
    runtime: WorkerRuntime
    attempt: int = 1

    def progress(self, stage: str, done: int, total: int | None = None) -> None:
        """Record progress, and stop here if the user asked to cancel or the job was taken
        back from this attempt."""
        with self.runtime.sessions() as session, session.begin():
            recorded = session.execute(
                update(Job)
                .where(*this_attempt(self.job_id, self.runtime.name, self.attempt))
                .values(progress_stage=stage, progress_done=done, progress_total=total)
            ).rowcount
            if not recorded:
                raise AttemptSuperseded()
            job = jobs.get_job(session, self.job_id)
        jobs.publish(self.runtime.redis, self.runtime.settings, job)
        if job.cancel_requested:
            raise JobCancelled()
