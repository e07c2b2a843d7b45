"""Following a job to its end: its server-sent events while the stream holds, polling with
a growing interval when the stream is refused or breaks, and a progress bar if asked."""

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from confprobe_client.errors import ApiError, JobFailed, Unreachable, WaitTimedOut
from confprobe_client.transport import Transport
from confprobe_client.types import Job

# Polling, when the events stream is not there, starts fast for short jobs and slows down
# for long ones.
FIRST_POLL_S = 0.1
LONGEST_POLL_S = 2.0

JobListener = Callable[[Job], None]


def wait_for_job(api: Transport, job_id: str, timeout: float | None, progress: bool) -> Job:
    """The job once it has succeeded; `JobFailed` when it failed or was cancelled,
    `WaitTimedOut` after `timeout` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with _listener(progress) as show:
        job = _final_job_from_events(api, job_id, deadline, show) or _final_job_by_polling(api, job_id, deadline, show)
    if job.status != "succeeded":
        raise JobFailed(job)
    return job


def _final_job_from_events(api: Transport, job_id: str, deadline: float | None, show: JobListener) -> Job | None:
    """The final job as `GET /v1/jobs/{id}/events` tells it; None when the stream is
    refused (a proxy may answer it with an error of its own), is not one, breaks, ends
    early or outlives the deadline, so that polling takes over. An error that is really
    the service's comes back from polling."""
    read_timeout = api.timeout if deadline is None else max(0.1, min(api.timeout, deadline - time.monotonic()))
    # (connect, read, write, pool) as a plain tuple, which any httpx-compatible client takes
    timeouts = (api.timeout, read_timeout, api.timeout, api.timeout)
    try:
        with api.stream(
            "GET", f"/v1/jobs/{job_id}/events", headers={"accept": "text/event-stream"}, timeout=timeouts
        ) as response:
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                return None
            for event, data in server_sent_events(response.iter_lines(), deadline):
                if event != "job":
                    continue
                job = Job.model_validate_json(data)
                show(job)
                if job.is_final:
                    return job
    except (ApiError, Unreachable):
        return None
    return None


def _final_job_by_polling(api: Transport, job_id: str, deadline: float | None, show: JobListener) -> Job:
    interval = FIRST_POLL_S
    while True:
        job = Job.model_validate(api.json("GET", f"/v1/jobs/{job_id}"))
        show(job)
        if job.is_final:
            return job
        if deadline is not None and time.monotonic() >= deadline:
            raise WaitTimedOut(job)
        time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))
        interval = min(interval * 2, LONGEST_POLL_S)


def server_sent_events(lines: Iterable[str], deadline: float | None) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of a text/event-stream; stops at the deadline, which keep-alive
    comments let it notice even while the job is quiet."""
    event: str = "message"
    data: list[str] = []
    for line in lines:
        if deadline is not None and time.monotonic() >= deadline:
            return
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)


@contextmanager
def _listener(progress: bool) -> Iterator[JobListener]:
    """What `wait` tells about each new state of the job: a progress bar, or nothing."""
    if not progress:
        yield lambda _job: None
        return
    from confprobe_client.progress import JobProgressBar

    bar = JobProgressBar()
    try:
        yield bar.show
    finally:
        bar.close()
