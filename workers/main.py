"""Worker entry point: one process, one device, jobs run in this process (RQ SimpleWorker:
no fork per job, so CUDA contexts and resident models survive between jobs)."""

import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import redis
import sqlalchemy.exc
from rq import Queue, SimpleWorker
from rq.exceptions import InvalidJobOperation, StopRequested

from app import broker, jobs, logs
from app.registry.tables import Job
from app.settings import Settings, get_settings
from workers import allocator, runtime
from workers.runtime import REDIS_DOWN, WorkerRuntime, backoff

log = logging.getLogger("workers.main")
# a work loop that lasted this long before it ended is not failing over and over
STEADY_LOOP_S = 60.0


class ServiceWorker(SimpleWorker):
    """RQ's in-process worker, with RQ's own lines about a job carrying the job's id, and RQ's
    own bookkeeping in Redis made best effort. The registry row is a job's truth, so Redis
    going away must neither fail the job nor end the worker's loop: RQ's writes that fail
    while Redis is away are skipped, and its loop waits for Redis between tries."""

    def __init__(self, worker_runtime: WorkerRuntime, queues: list[Queue], connection: redis.Redis, name: str) -> None:
        super().__init__(queues, connection=connection, name=name)
        self.runtime = worker_runtime
        self.max_connection_wait_time = worker_runtime.settings.redis_retry_max_s  # RQ's own dequeue retries

    def _best_effort(self, call: Callable[..., Any], *args: Any) -> None:
        try:
            call(*args)
        except REDIS_DOWN as exc:
            self.runtime.outage.down(exc)

    def execute_job(self, job: Any, queue: Queue) -> Any:
        with logs.job_scope(str(job.args[0]) if job.args else job.id):
            try:
                return super().execute_job(job, queue)
            except (
                REDIS_DOWN
            ) as exc:  # RQ's bookkeeping before or after the job; the job's own outcome is in the registry
                self.runtime.outage.down(exc)
                self._put_back_if_unstarted(job)

    def _put_back_if_unstarted(self, rq_job: Any) -> None:
        """A job RQ took off its queue but could not start while Redis was away never ran, and
        no queue holds it any more: it goes back on its queue once Redis answers. A job that
        ran has its outcome in the registry already."""
        if not rq_job.args:
            return
        try:
            with self.runtime.sessions() as session:
                row = session.get(Job, rq_job.args[0])
        except sqlalchemy.exc.OperationalError:
            return  # the heartbeat sweep puts queued jobs RQ lost back on a queue
        if row is None or row.status != "queued":
            return
        self.runtime.wait_for_redis()
        jobs.put_on_queue(self.runtime.redis, self.runtime.settings, row)
        log.info("job put back on its queue: Redis went away before it started", extra={"queue": row.queue})

    def handle_job_success(self, job: Any, queue: Queue, started_job_registry: Any, execution: Any) -> None:
        """RQ's record of a job that ran while Redis restarted empty is gone, and RQ cannot
        close it: the job's outcome is in the registry, so the worker drops RQ's remnant."""
        try:
            super().handle_job_success(job, queue, started_job_registry, execution)
        except InvalidJobOperation:
            log.info("RQ no longer held this job (Redis restarted without it); its outcome is in the registry")
            self._best_effort(self.connection.delete, job.key)  # the remnant RQ's last heartbeat wrote

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        self._best_effort(super().heartbeat, timeout, pipeline)

    def set_state(self, state: str, pipeline: Any = None) -> None:
        self._best_effort(super().set_state, state, pipeline)

    def check_for_suspension(self, burst: bool) -> None:
        self._best_effort(super().check_for_suspension, burst)

    def run_maintenance_tasks(self) -> None:
        self._best_effort(super().run_maintenance_tasks)

    def set_shutdown_requested_date(self) -> None:
        """Called from the SIGTERM handler, in the middle of the job: an error here would
        surface in the job's code and fail it."""
        self._best_effort(super().set_shutdown_requested_date)

    def teardown(self) -> None:
        self._best_effort(self.register_death)
        self._best_effort(self.unsubscribe)
        if self.pubsub_thread is not None and self.pubsub_thread.is_alive():
            self.pubsub_thread.stop()  # unsubscribing failed before it could

    @property
    def asked_to_stop(self) -> bool:
        return self._stop_requested or self._shutdown_requested_date is not None


class QuietRetries(logging.Filter):
    """Drops RQ's line about each failed try to reach Redis (one every few seconds for as long
    as Redis is away) and records the outage instead, which is logged once."""

    def __init__(self, worker_runtime: WorkerRuntime) -> None:
        super().__init__()
        self.runtime = worker_runtime

    def filter(self, record: logging.LogRecord) -> bool:
        if "could not connect to Redis instance" not in str(record.msg):
            return True
        error = record.args[1] if isinstance(record.args, tuple) and len(record.args) > 1 else record.getMessage()
        self.runtime.outage.down(error if isinstance(error, BaseException) else ConnectionError(str(error)))
        return False


def work_until_stopped(worker_runtime: WorkerRuntime, burst: bool, logging_level: str) -> None:
    """RQ's work loop, started again if it ends without being asked to (RQ leaves its loop on
    errors it does not expect): a worker exits only when told to, or in burst mode once its
    queues are empty. Each new loop registers with RQ under a fresh name."""
    settings = worker_runtime.settings
    # its own queue first (jobs routed here for the models it holds), then the shared one
    names = (broker.worker_queue(settings, worker_runtime.name), broker.default_queue(settings))
    # RQ's own connection: RQ gives it a socket timeout of minutes, for its blocking reads
    # of the queues, which must not apply to the worker's other commands
    rq_connection = broker.connect(settings)
    pauses = backoff(settings.redis_retry_max_s)
    while True:
        try:
            worker_runtime.wait_for_redis()
        except StopRequested:
            return  # SIGTERM while waiting between loops: the last loop's handler raises this
        started = time.monotonic()
        rq_worker: ServiceWorker | None = None
        try:
            queues = [Queue(name, connection=rq_connection) for name in names]
            # RQ talks to Redis as it registers the worker: Redis may have gone again since
            # the wait above, so this is inside the outage handling too
            rq_worker = ServiceWorker(
                worker_runtime, queues, rq_connection, name=broker.rq_worker_name(worker_runtime.name)
            )
            rq_worker.work(burst=burst, logging_level=logging_level, with_scheduler=False)
        except REDIS_DOWN as exc:
            worker_runtime.outage.down(exc)
        except StopRequested:
            return
        if burst or (rq_worker is not None and rq_worker.asked_to_stop):
            return
        if time.monotonic() - started > STEADY_LOOP_S:
            pauses = backoff(settings.redis_retry_max_s)
        pause = next(pauses)
        log.warning("RQ's work loop ended by itself; starting it again in %.1f s", pause)
        try:
            time.sleep(pause)
        except StopRequested:
            return


def run_worker(settings: Settings | None = None, burst: bool = False) -> None:
    settings = settings or get_settings()
    logs.configure(settings)
    import torch  # noqa: F401  (imported once here, not inside the first job)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one bar per load would flood the worker's log
    logs.route_library_logs()
    # the handlers (transformers, PEFT…) are imported before the worker listens, not inside its
    # first job: a job's part taken by a fresh worker starts at once, not seconds later
    import workers.runner  # noqa: F401

    # bitsandbytes warns on every 8-bit matmul that it casts float32 inputs to float16
    warnings.filterwarnings("ignore", message="MatMul8bitLt")

    # once for the process: the memory its batches free stays mapped for the next batch
    allocator.keep_freed_memory(settings.worker_keep_freed_mb * 2**20)
    worker_runtime = runtime.build_runtime(settings)
    runtime.install(worker_runtime)
    logging.getLogger("rq.worker").addFilter(QuietRetries(worker_runtime))
    stop_heartbeats = worker_runtime.start_heartbeats()
    try:
        work_until_stopped(worker_runtime, burst, settings.log_level.upper())
    finally:
        stop_heartbeats.set()
        try:
            worker_runtime.forget()
        except REDIS_DOWN:
            pass  # its heartbeat expires by itself


if __name__ == "__main__":
    run_worker()
