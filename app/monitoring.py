"""`GET /metrics` in Prometheus' text format.

Most figures belong to the whole deployment, not to one gateway, so they are read where
they live at scrape time: jobs by kind and status from the registry, queue depths and
worker memory from Redis, and job durations from a histogram the workers keep in Redis
(bucket counters they increment as jobs finish). Only HTTP request figures are this
gateway process's own. Any gateway answers for the deployment. Storage use per top-level
folder of the artifact store is listed from the store itself, at most once every
STORAGE_METRICS_TTL_S and at most STORAGE_METRICS_MAX_OBJECTS objects a folder
(`StorageUsage`), so a scrape stays cheap on a bucket of millions of objects."""

import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import sqlalchemy.exc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app import broker
from app.janitor import SERVICE_FOLDERS
from app.registry.tables import Job
from app.settings import Settings
from app.storage import ArtifactStore, StoreUnavailable

DURATION_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0, 7200.0, float("inf"))


def _durations_key(settings: Settings) -> str:
    return f"{settings.queue_prefix}:metrics:job-seconds"


def record_job_duration(connection: redis.Redis, settings: Settings, kind: str, status: str, seconds: float) -> None:
    """Count a finished job into the shared histogram (called by the worker that ran it)."""
    bucket = next(bound for bound in DURATION_BUCKETS if seconds <= bound)
    pipeline = connection.pipeline(transaction=False)
    pipeline.hincrby(_durations_key(settings), f"{kind}|{status}|le={bucket}", 1)
    pipeline.hincrbyfloat(_durations_key(settings), f"{kind}|{status}|sum", seconds)
    pipeline.execute()


@dataclass(frozen=True)
class FolderUsage:
    """What one listing counted under a top-level folder of the store. `complete` is False
    when the listing stopped at its bound: `bytes` and `objects` are then lower bounds."""

    bytes: int
    objects: int
    complete: bool


class StorageUsage:
    """Bytes and objects under each of the store's top-level folders (`SERVICE_FOLDERS`,
    one per resource kind, `staging` for uploads and scratch), temporaries of interrupted
    writes included (they take space too). A listing serves every scrape for `ttl_s`
    seconds, and stops after `max_objects` objects in a folder, so that on a bucket, where
    listing is paged (a thousand keys a request), a listing costs at most `max_objects` /
    1000 requests a folder, however many objects the bucket holds."""

    def __init__(
        self, store: ArtifactStore, ttl_s: float, max_objects: int, folders: Sequence[str] = SERVICE_FOLDERS
    ) -> None:
        self.store, self.ttl_s, self.max_objects, self.folders = store, ttl_s, max_objects, folders
        self._lock = threading.Lock()
        self._listed_at: float | None = None
        self._usage: dict[str, FolderUsage] = {}

    def usage(self) -> dict[str, FolderUsage]:
        """The figures of the last listing, listing again once they are `ttl_s` old; a store
        that cannot be listed raises `StoreUnavailable` (or OSError) and is asked again at
        the next scrape."""
        with self._lock:  # concurrent scrapes wait for one listing rather than each making one
            if self._listed_at is None or time.monotonic() - self._listed_at >= self.ttl_s:
                self._usage = {folder: self._count(folder) for folder in self.folders}
                self._listed_at = time.monotonic()
            return self._usage

    def _count(self, folder: str) -> FolderUsage:
        listed = list(itertools.islice(self.store.iter_objects(folder), self.max_objects + 1))
        counted = listed[: self.max_objects]
        return FolderUsage(
            bytes=sum(stored.size for stored in counted),
            objects=len(counted),
            complete=len(listed) <= self.max_objects,
        )


class DeploymentCollector(Collector):
    def __init__(
        self,
        sessions: sessionmaker[Session],
        connection: redis.Redis,
        settings: Settings,
        storage: StorageUsage | None = None,
    ) -> None:
        self.sessions, self.connection, self.settings, self.storage = sessions, connection, settings, storage

    def collect(self) -> Iterator[Any]:
        """Each backend's figures, or none when it is away: the scrape still answers, with
        `confprobe_backend_up` saying which part is missing."""
        up = GaugeMetricFamily(
            "confprobe_backend_up", "1 when the gateway could read this backend's figures.", labels=["backend"]
        )
        try:
            yield self._jobs()
            up.add_metric(["database"], 1)
        except sqlalchemy.exc.SQLAlchemyError:
            up.add_metric(["database"], 0)
        try:
            families = [*self._queues_and_workers(), self._durations()]
            up.add_metric(["redis"], 1)
        except redis.exceptions.RedisError:
            families = []
            up.add_metric(["redis"], 0)
        yield from families
        if self.storage is not None:
            try:
                storage = self._storage(self.storage.usage())
                up.add_metric(["store"], 1)
            except (StoreUnavailable, OSError):
                storage = []
                up.add_metric(["store"], 0)
            yield from storage
        yield up

    def _storage(self, usage: dict[str, FolderUsage]) -> list[GaugeMetricFamily]:
        labels = ["kind"]
        stored_bytes = GaugeMetricFamily(
            "confprobe_storage_bytes", "Bytes in the artifact store under each top-level folder.", labels=labels
        )
        objects = GaugeMetricFamily(
            "confprobe_storage_objects", "Objects in the artifact store under each top-level folder.", labels=labels
        )
        complete = GaugeMetricFamily(
            "confprobe_storage_listing_complete",
            "1 when the folder was listed whole; 0 when the listing stopped at STORAGE_METRICS_MAX_OBJECTS "
            "and the bytes and objects are lower bounds.",
            labels=labels,
        )
        for folder, counted in usage.items():
            stored_bytes.add_metric([folder], counted.bytes)
            objects.add_metric([folder], counted.objects)
            complete.add_metric([folder], 1 if counted.complete else 0)
        return [stored_bytes, objects, complete]

    def _jobs(self) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            "confprobe_jobs", "Jobs in the registry by kind and status.", labels=["kind", "status"]
        )
        with self.sessions() as session:
            for kind, status, count in session.execute(
                select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)
            ):
                family.add_metric([kind, status], count)
        return family

    def _queues_and_workers(self) -> Iterator[GaugeMetricFamily]:
        workers = broker.live_workers(self.connection, self.settings)
        queues = [broker.default_queue(self.settings)] + [
            broker.worker_queue(self.settings, w["name"]) for w in workers
        ]
        pipeline = self.connection.pipeline(transaction=False)
        for queue in queues:
            pipeline.llen(broker.rq_queue_key(queue))
        depth = GaugeMetricFamily(
            "confprobe_queue_depth",
            "Jobs waiting on each RQ queue (shared, and each live worker's own).",
            labels=["queue"],
        )
        for queue, length in zip(queues, pipeline.execute(), strict=True):
            depth.add_metric([queue], length)
        yield depth

        live = GaugeMetricFamily("confprobe_workers", "Workers with a fresh heartbeat.")
        live.add_metric([], len(workers))
        yield live
        labels = ["worker", "device"]
        used = GaugeMetricFamily(
            "confprobe_worker_memory_used_bytes", "Memory a worker's resident models take.", labels=labels
        )
        budget = GaugeMetricFamily(
            "confprobe_worker_memory_budget_bytes", "Memory a worker may fill with resident models.", labels=labels
        )
        resident = GaugeMetricFamily(
            "confprobe_worker_resident_models", "Models a worker holds resident.", labels=labels
        )
        busy = GaugeMetricFamily("confprobe_worker_busy", "1 while a worker runs a job.", labels=labels)
        for worker in workers:
            names = [worker["name"], worker.get("device", "")]
            used.add_metric(names, worker.get("memory_used_bytes", 0))
            budget.add_metric(names, worker.get("memory_budget_bytes", 0))
            resident.add_metric(names, len(worker.get("resident_models", [])))
            busy.add_metric(names, 1 if worker.get("current_job") else 0)
        yield from (used, budget, resident, busy)

    def _durations(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            "confprobe_job_duration_seconds",
            "Seconds from start to finish of jobs, by kind and final status.",
            labels=["kind", "status"],
        )
        series: dict[tuple[str, str], dict[str, float]] = {}
        for field, value in self.connection.hgetall(_durations_key(self.settings)).items():
            kind, status, what = broker.text(field).split("|")
            series.setdefault((kind, status), {})[what] = float(value)
        for (kind, status), values in sorted(series.items()):
            cumulative, buckets = 0.0, []
            for bound in DURATION_BUCKETS:
                cumulative += values.get(f"le={bound}", 0.0)
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            family.add_metric([kind, status], buckets=buckets, sum_value=values.get("sum", 0.0))
        return family


class RequestMetrics:
    """Pure-ASGI middleware counting this gateway's requests by route template (not by raw
    path, so ids do not explode the label set) and timing them."""

    def __init__(self, app: Any, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "confprobe_http_requests",
            "HTTP requests this gateway answered.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.seconds = Histogram(
            "confprobe_http_request_duration_seconds",
            "Time to answer, by route.",
            ["method", "route"],
            registry=registry,
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.requests.labels(scope["method"], route, str(status)).inc()
            self.seconds.labels(scope["method"], route).observe(time.perf_counter() - started)
