"""Worker entry point: one process, one device, jobs run in this process (RQ SimpleWorker:
no fork per job, so CUDA contexts and resident models survive between jobs)."""

import warnings
from typing import Any

from rq import Queue, SimpleWorker

from app import broker, logs
from app.settings import Settings, get_settings
from workers import runtime


class ServiceWorker(SimpleWorker):
    """RQ's in-process worker, with RQ's own lines about a job carrying the job's id."""

    def execute_job(self, job: Any, queue: Queue) -> Any:
        with logs.job_scope(str(job.args[0]) if job.args else job.id):
            return super().execute_job(job, queue)


def run_worker(settings: Settings | None = None, burst: bool = False) -> None:
    settings = settings or get_settings()
    logs.configure(settings)
    import torch  # noqa: F401  (imported once here, not inside the first job)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one bar per load would flood the worker's log
    logs.route_library_logs()
    # bitsandbytes warns on every 8-bit matmul that it casts float32 inputs to float16
    warnings.filterwarnings("ignore", message="MatMul8bitLt")

    worker_runtime = runtime.build_runtime(settings)
    runtime.install(worker_runtime)
    # its own queue first (jobs routed here for the models it holds), then the shared one
    queues = [Queue(name, connection=worker_runtime.redis) for name in (broker.worker_queue(settings, worker_runtime.name), broker.default_queue(settings))]
    rq_worker = ServiceWorker(queues, connection=worker_runtime.redis, name=broker.rq_worker_name(worker_runtime.name))
    stop_heartbeats = worker_runtime.start_heartbeats()
    try:
        rq_worker.work(burst=burst, logging_level=settings.log_level.upper(), with_scheduler=False)
    finally:
        stop_heartbeats.set()
        worker_runtime.forget()


if __name__ == "__main__":
    run_worker()
