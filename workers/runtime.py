"""What a worker process holds while it lives: settings, registry sessions, Redis, its
resident models, and the job it is running (reported in its heartbeat)."""

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import redis
import sqlalchemy.exc
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app import broker, janitor, jobs
from app.registry.database import changed_rows, create_registry_engine, session_factory
from app.registry.tables import Adapter, Job, Model, utcnow
from app.settings import Settings, get_settings
from app.storage import ArtifactStore, open_store
from workers import hidden_states
from workers.model_loading import LoadedModel, active_adapter, explained_quantization_errors
from workers.resident_models import ResidentModels

log = logging.getLogger("workers.runtime")
# Redis away, as redis-py reports it: refused, reset or still loading (ConnectionError), or
# silent (TimeoutError)
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
FIRST_RETRY_S = 0.5
# How long one command of the worker's own (heartbeats, job events, sweeps) waits for Redis
# to answer: a Redis that hangs rather than refusing (stopped, or cut off without a reset)
# costs a job's progress point this much, not the minutes RQ's blocking reads allow.
REDIS_COMMAND_TIMEOUT_S = 5.0


def backoff(cap_s: float, first_s: float = FIRST_RETRY_S) -> Iterator[float]:
    """Pauses between tries: `first_s`, doubling, never above `cap_s`, for ever."""
    pause = first_s
    while True:
        yield min(pause, cap_s)
        pause = min(2 * pause, cap_s)


class RedisOutage:
    """Whether this process last found Redis away. An outage is logged once as it starts and
    once as it ends, however many tries fail in between and whichever thread makes them."""

    def __init__(self) -> None:
        self._since: float | None = None
        self._lock = threading.Lock()

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    def down(self, error: BaseException) -> None:
        with self._lock:
            if self._since is not None:
                return
            self._since = time.monotonic()
        log.warning("Redis is unreachable (%s); waiting for it, and a running job goes on", error)

    def up(self) -> None:
        with self._lock:
            if self._since is None:
                return
            lasted, self._since = time.monotonic() - self._since, None
        log.info("Redis is reachable again after %.1f s", lasted)


@dataclass
class WorkerRuntime:
    settings: Settings
    name: str
    sessions: sessionmaker[Session]
    redis: redis.Redis
    models: ResidentModels
    artifacts: ArtifactStore
    started_at: datetime = field(default_factory=utcnow)
    current_job: str | None = None
    # a part of a job spread over workers that the worker runs inside `current_job` while
    # that job waits for its parts (`workers/fanout.py`)
    current_part: str | None = None
    # called after each progress point of `current_part`, so the job waiting for it reports too
    on_part_progress: Callable[[], None] | None = None
    outage: RedisOutage = field(default_factory=RedisOutage)

    def heartbeat(self) -> None:
        state = {
            "name": self.name,
            "device": self.settings.worker_device,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": self.started_at.isoformat(),
            "last_heartbeat": utcnow().isoformat(),
            "memory_budget_bytes": self.models.budget_bytes,
            "memory_used_bytes": self.models.used_bytes,
            "resident_models": self.models.describe(),
            "current_job": self.current_job,
            "current_part": self.current_part,
        }
        broker.beat(self.redis, self.settings, state)

    def resident(self, model: Model, adapter: Adapter | None) -> LoadedModel:
        """The model, loaded once and kept, with `adapter` attached to it if given."""
        return self.models.get(model, (adapter.id, self.artifacts.local_folder(adapter.artifact)) if adapter else None)

    @contextmanager
    def running(self, loaded: LoadedModel, model: Model, adapter: Adapter | None) -> Iterator[None]:
        """Forward passes of `model` with `adapter` active (or the base alone), with
        bitsandbytes' refusals explained."""
        with (
            explained_quantization_errors(model.quantization, self.models.device),
            active_adapter(loaded, adapter.id if adapter else None),
        ):
            yield

    def set_current_job(self, job_id: str | None, part: bool = False) -> None:
        """Change what the heartbeat reports, and report it at once: the job the worker runs,
        or (`part`) the part it runs inside that job."""
        if part:
            self.current_part = job_id
        else:
            self.current_job = job_id
        if self.outage.ongoing:
            return  # the heartbeat thread reports it when Redis is back
        try:
            self.heartbeat()
        except redis.exceptions.RedisError:
            pass  # the heartbeat thread reports it when Redis is back

    def wait_for_redis(self) -> None:
        """Return once Redis answers, trying again after pauses that double up to
        REDIS_RETRY_MAX_S. Never gives up: Redis coming back is all a worker needs, while a
        worker that exited would need someone to start it again."""
        for pause in backoff(self.settings.redis_retry_max_s):
            try:
                self.redis.ping()
            except REDIS_DOWN as exc:
                self.outage.down(exc)
                time.sleep(pause)
            else:
                self.outage.up()
                return

    def start_heartbeats(self) -> threading.Event:
        """Heartbeat from a thread, so a long job does not make the worker look dead; each
        beat also looks after the jobs other workers and Redis may have dropped. Set the
        returned event to stop."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.is_set():
                try:
                    self.heartbeat()
                    self.outage.up()
                    self.recover_jobs_of_lost_workers()
                    self.requeue_orphans()
                    self.maybe_sweep_artifacts()
                except REDIS_DOWN as exc:
                    self.outage.down(exc)  # the next beat tries again, and resumes the beats
                except (redis.exceptions.RedisError, sqlalchemy.exc.OperationalError):
                    pass  # Redis or the database is away; the next beat tries again
                except Exception:
                    log.exception("heartbeat chores failed; the next beat tries again")
                stop.wait(self.settings.heartbeat_interval_s)

        threading.Thread(target=beat, name="heartbeat", daemon=True).start()
        return stop

    def recover_jobs_of_lost_workers(self, suspect_for_s: float | None = None) -> list[str]:
        """Jobs left `running` by a worker that no longer runs them are queued again on the
        shared queue while they have attempts left, and failed with the reason after that —
        nothing stays `running` forever.

        A job is suspect when its worker has no live heartbeat (killed, its machine gone) or
        heartbeats about other jobs than this one, as its `current_job` or `current_part` (it
        restarted under the same name, or could not record the outcome). It is taken back only
        once it has stayed suspect for `suspect_for_s` (default: the heartbeat TTL) by Redis's
        clock, so a worker that is merely late — after
        Redis restarted empty, say — beats again before anyone takes its job. A job younger
        than the TTL is left alone: its worker may not have reported it yet. Should the old
        attempt still be running somewhere, it can no longer write: its updates are fenced
        by attempt (`workers/context.py`)."""
        wait_s = self.settings.heartbeat_ttl_s if suspect_for_s is None else suspect_for_s
        running_on = {
            worker["name"]: {worker.get("current_job"), worker.get("current_part")} - {None}
            for worker in broker.live_workers(self.redis, self.settings)
        }
        cutoff = utcnow() - timedelta(seconds=self.settings.heartbeat_ttl_s)
        with self.sessions() as session:
            suspects = {
                job_id: worker
                for job_id, worker in session.execute(
                    select(Job.id, Job.worker).where(Job.status == "running", Job.started_at < cutoff)
                )
                if worker not in running_on or job_id not in running_on[worker]
            }
        confirmed = self._confirmed(suspects, wait_s)
        shared = broker.default_queue(self.settings)
        retried, failed = [], []
        with self.sessions() as session, session.begin():
            lost = [
                job
                for job in session.scalars(select(Job).where(Job.id.in_(confirmed), Job.status == "running"))
                if job.worker == suspects[job.id]
            ]
            for job in lost:
                still_running = (
                    Job.id == job.id,
                    Job.status == "running",
                    Job.worker == job.worker,
                    Job.attempts == job.attempts,
                )
                if job.attempts < self.settings.job_max_attempts:
                    taken = changed_rows(
                        session,
                        update(Job)
                        .where(*still_running)
                        .values(
                            status="queued",
                            queue=shared,
                            worker=None,
                            started_at=None,
                            progress_stage=None,
                            progress_done=0,
                            progress_total=None,
                            progress_details=None,
                        ),
                    )
                    if taken:  # not already taken back by another worker's sweep
                        retried.append(job.id)
                else:
                    taken = changed_rows(
                        session,
                        update(Job)
                        .where(*still_running)
                        .values(
                            status="failed",
                            finished_at=utcnow(),
                            error={
                                "code": "worker_lost",
                                "message": f"worker {job.worker} stopped while running this job (attempt {job.attempts} of {self.settings.job_max_attempts})",
                                "details": {"worker": job.worker, "attempts": job.attempts},
                            },
                        ),
                    )
                    if taken:
                        failed.append(job.id)
        for job_id in retried + failed:
            with self.sessions() as session:
                job = session.get_one(Job, job_id)
            if job_id in retried and job.status == "queued":
                jobs.put_on_queue(self.redis, self.settings, job)
            log.warning(
                "job %s: its worker was lost",
                "queued again" if job_id in retried else "failed",
                extra={"job_id": job_id, "attempts": job.attempts},
            )
            jobs.publish(self.redis, self.settings, job)
        return retried + failed

    def _confirmed(self, suspects: dict[str, str | None], wait_s: float) -> list[str]:
        """The suspects that have been suspect for `wait_s` by Redis's clock. When each job
        was first suspected is kept in a Redis hash; a job that is no longer suspect leaves it."""
        key = f"{self.settings.queue_prefix}:suspect_jobs"
        seconds, microseconds = self.redis.time()
        now = seconds + microseconds / 1e6
        since = {broker.text(job_id): float(first) for job_id, first in self.redis.hgetall(key).items()}
        cleared = [job_id for job_id in since if job_id not in suspects]
        fresh = {job_id: now for job_id in suspects if job_id not in since}
        pipeline = self.redis.pipeline(transaction=False)
        if cleared:
            pipeline.hdel(key, *cleared)
        if fresh:
            pipeline.hset(key, mapping={job_id: now for job_id in fresh})
        pipeline.execute()
        since |= fresh
        confirmed = [job_id for job_id in suspects if now - since[job_id] >= wait_s]
        if confirmed:
            self.redis.hdel(key, *confirmed)
        return confirmed

    def _takes_turn(self, chore: str, every_s: float) -> bool:
        """Whether this worker does `chore` now: the first to ask in each `every_s` window of
        the deployment does (a Redis key that lives for the window)."""
        return bool(
            self.redis.set(f"{self.settings.queue_prefix}:turn:{chore}", self.name, nx=True, px=int(every_s * 1000))
        )

    def requeue_orphans(self) -> list[str]:
        """Queued jobs RQ lost (a Redis restart) or that wait on a dead worker's queue go back
        on a queue. One worker at a time does it, at most once per heartbeat TTL."""
        if not self._takes_turn("requeue", self.settings.heartbeat_ttl_s):
            return []
        return jobs.requeue_orphans(self.sessions, self.redis, self.settings, min_age_s=self.settings.heartbeat_ttl_s)

    def maybe_sweep_artifacts(self) -> bool:
        """Start the janitor in its own thread when a turn is due; a long listing must not
        delay heartbeats. One worker in the deployment sweeps the store per interval (a Redis
        key lives for the interval), and one worker on every other machine sweeps that
        machine's own temporaries (a key per host)."""
        interval = self.settings.janitor_interval_s
        if not interval:
            return False
        deployment = self._takes_turn("janitor", interval)
        this_machine = self._takes_turn(f"janitor-local:{socket.gethostname()}", interval)
        if deployment:
            sweep = janitor.sweep  # this machine's temporaries included
        elif this_machine:
            sweep = janitor.sweep_local
        else:
            return False

        def run() -> None:
            try:
                sweep(self.sessions, self.artifacts, grace_s=self.settings.janitor_grace_s)
            except Exception:
                log.exception("artifact sweep failed")

        threading.Thread(target=run, name="janitor", daemon=True).start()
        return True

    def forget(self) -> None:
        broker.forget(self.redis, self.settings, self.name)


_runtime: WorkerRuntime | None = None


def memory_budget_bytes(settings: Settings) -> int:
    """WORKER_MEMORY_BUDGET_MB, or by default most of the device: 90% of a GPU's memory (the
    rest for activations and CUDA's own), half of the machine's memory for a CPU worker (the
    rest for activations, the OS and the other processes on it)."""
    if settings.worker_memory_budget_mb is not None:
        return settings.worker_memory_budget_mb * 2**20
    if settings.worker_device.startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(torch.device(settings.worker_device)).total_memory * 0.9)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def build_runtime(settings: Settings) -> WorkerRuntime:
    if settings.extraction_compile and hidden_states.inductor_compiler() is None:
        log.warning(
            "EXTRACTION_COMPILE is set but TorchInductor finds no C++ compiler ($CXX, else g++): "
            "this worker runs its blocks eagerly"
        )
        settings = settings.model_copy(update={"extraction_compile": False})
    return WorkerRuntime(
        settings=settings,
        name=settings.worker_name or f"{socket.gethostname()}.{os.getpid()}",
        sessions=session_factory(create_registry_engine(settings.resolved_database_url)),
        redis=broker.connect(settings, socket_timeout=REDIS_COMMAND_TIMEOUT_S),  # RQ has a connection of its own
        models=ResidentModels(budget_bytes=memory_budget_bytes(settings), device=settings.worker_device),
        artifacts=open_store(settings),
    )


def install(runtime: WorkerRuntime) -> None:
    global _runtime
    _runtime = runtime


def current() -> WorkerRuntime:
    """The process's runtime; built from the environment if a job arrives before `install`."""
    global _runtime
    if _runtime is None:
        _runtime = build_runtime(get_settings())
    return _runtime
