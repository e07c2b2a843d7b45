"""A progress bar on stderr that follows a job's `progress` {stage, done, total}."""

import sys

from tqdm import tqdm

from confprobe_client.types import Job


class JobProgressBar:
    """Drawn at the job's first state; stages change its description, and its total when
    a stage counts in other units (model loading, then batches)."""

    def __init__(self) -> None:
        self._bar: tqdm | None = None

    def show(self, job: Job) -> None:
        if self._bar is None:
            self._bar = tqdm(total=job.progress.total, file=sys.stderr, unit="step", dynamic_ncols=True, leave=True)
        self._bar.total = job.progress.total
        self._bar.n = job.progress.done
        self._bar.set_description(f"{job.id} {job.kind}: {job.progress.stage or job.status}", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
