"""What a job handler gets: its parameters, the worker's runtime, and `progress()`."""

from dataclasses import dataclass
from typing import Any

from sqlalchemy import update

from app import jobs
from app.registry.tables import Job
from workers.errors import JobCancelled
from workers.runtime import WorkerRuntime


@dataclass
class JobContext:
    """What a handler gets: its parameters, the worker's runtime, and `progress()`."""

    job_id: str
    params: dict[str, Any]
    runtime: WorkerRuntime

    def progress(self, stage: str, done: int, total: int | None = None) -> None:
        """Record progress, and stop here if the user asked to cancel."""
        with self.runtime.sessions() as session, session.begin():
            session.execute(
                update(Job).where(Job.id == self.job_id).values(progress_stage=stage, progress_done=done, progress_total=total)
            )
            job = jobs.get_job(session, self.job_id)
        jobs.publish(self.runtime.redis, self.runtime.settings, job)
        if job.cancel_requested:
            raise JobCancelled()
