"""`GET /metrics`: Prometheus text whose figures match what the API itself reports."""

from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from app import broker
from app.monitoring import FolderUsage, StorageUsage
from app.settings import Settings
from app.storage import FolderStore, open_store
from tests.conftest import Stack, wait_for_job, wait_until
from workers.runtime import memory_budget_bytes


def samples(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_queued_jobs_show_as_queue_depth_and_as_jobs_by_kind_and_status(api: Any, settings: Settings) -> None:
    for _ in range(3):
        assert api.post("/v1/jobs/ping").status_code == 202
    figures = samples(api)
    assert figures[("confprobe_queue_depth", (("queue", broker.default_queue(settings)),))] == 3
    assert figures[("confprobe_jobs", (("kind", "ping"), ("status", "queued")))] == 3
    assert figures[("confprobe_workers", ())] == 0

    api.post(f"/v1/jobs/{api.get('/v1/jobs').json()['items'][0]['id']}/cancel")
    figures = samples(api)
    assert figures[("confprobe_jobs", (("kind", "ping"), ("status", "queued")))] == 2
    assert figures[("confprobe_jobs", (("kind", "ping"), ("status", "cancelled")))] == 1
    assert figures[("confprobe_queue_depth", (("queue", broker.default_queue(settings)),))] == 2


def test_requests_are_counted_by_route_template_not_by_path(api: Any) -> None:
    ids = [api.post("/v1/jobs/ping").json()["job"]["id"] for _ in range(2)]
    before = samples(api).get(
        ("confprobe_http_requests_total", (("method", "GET"), ("route", "/v1/jobs/{job_id}"), ("status", "200"))), 0
    )
    for job_id in ids * 2:
        api.get(f"/v1/jobs/{job_id}")
    api.get("/v1/jobs/job_missing")
    figures = samples(api)
    assert (
        figures[
            ("confprobe_http_requests_total", (("method", "GET"), ("route", "/v1/jobs/{job_id}"), ("status", "200")))
        ]
        == before + 4
    )
    assert (
        figures[
            ("confprobe_http_requests_total", (("method", "GET"), ("route", "/v1/jobs/{job_id}"), ("status", "404")))
        ]
        == 1
    )
    assert not any(name == "confprobe_http_requests_total" and ids[0] in str(labels) for name, labels in figures)


def test_finished_jobs_fill_the_duration_histogram_and_workers_report_memory(stack: Stack) -> None:
    client = stack.client
    before = samples(client).get(
        ("confprobe_job_duration_seconds_count", (("kind", "ping"), ("status", "succeeded"))), 0
    )
    for _ in range(3):
        assert wait_for_job(client, client.post("/v1/jobs/ping").json()["job"]["id"])["status"] == "succeeded"
    figures = samples(client)
    count = figures[("confprobe_job_duration_seconds_count", (("kind", "ping"), ("status", "succeeded")))]
    assert count == before + 3
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in figures.items()
        if name == "confprobe_job_duration_seconds_bucket"
        and dict(labels)["kind"] == "ping"
        and dict(labels)["status"] == "succeeded"
    )
    assert [value for _, value in buckets] == sorted(value for _, value in buckets) and buckets[-1] == (
        float("inf"),
        count,
    )
    assert 0 < figures[("confprobe_job_duration_seconds_sum", (("kind", "ping"), ("status", "succeeded")))] < 60 * count

    workers = client.get("/v1/workers").json()["items"]
    labels = (("device", "cpu"), ("worker", stack.worker_name))
    assert figures[("confprobe_worker_memory_budget_bytes", labels)] == memory_budget_bytes(stack.settings)
    assert figures[("confprobe_workers", ())] == len(workers)
    succeeded = client.get("/v1/jobs", params={"kind": "ping", "status": "succeeded", "limit": 200}).json()["items"]
    assert figures[("confprobe_jobs", (("kind", "ping"), ("status", "succeeded")))] == len(succeeded)


def test_a_worker_holding_a_model_reports_the_footprint_its_check_recorded_as_memory_used(
    stack: Stack, tiny_llama: Path
) -> None:
    client = stack.client
    model = client.post("/v1/models", json={"name": "tiny", "source": str(tiny_llama)}).json()
    assert wait_for_job(client, model["check_job_id"])["status"] == "succeeded"
    model = client.get(f"/v1/models/{model['id']}").json()
    footprint = model["memory_footprint_bytes"]
    assert footprint >= model["parameter_count"] * 4 > 0  # float32 weights, at the least

    def holding_it() -> dict[str, Any] | None:
        worker = next(w for w in client.get("/v1/workers").json()["items"] if w["name"] == stack.worker_name)
        return worker if any(resident["model_id"] == model["id"] for resident in worker["resident_models"]) else None

    worker = wait_until(holding_it, 30, "the worker's heartbeat to list the model")  # it beats on its own clock
    assert (
        next(resident["bytes"] for resident in worker["resident_models"] if resident["model_id"] == model["id"])
        == footprint
    )
    used = samples(client)[("confprobe_worker_memory_used_bytes", (("device", "cpu"), ("worker", stack.worker_name)))]
    assert used == sum(resident["bytes"] for resident in worker["resident_models"]) >= footprint


def test_a_scrape_while_redis_is_away_still_answers_and_says_so(api: Any, settings: Settings) -> None:
    from app.monitoring import DeploymentCollector

    assert samples(api)[("confprobe_backend_up", (("backend", "redis"),))] == 1
    api.post("/v1/jobs/ping")
    collector = next(c for c in list(api.app.state.metrics._collector_to_names) if isinstance(c, DeploymentCollector))
    healthy, collector.connection = collector.connection, redis.Redis(port=1, socket_connect_timeout=0.2)
    try:
        figures = samples(api)
    finally:
        collector.connection = healthy
    assert figures[("confprobe_backend_up", (("backend", "redis"),))] == 0
    assert figures[("confprobe_backend_up", (("backend", "database"),))] == 1
    assert figures[("confprobe_jobs", (("kind", "ping"), ("status", "queued")))] == 1
    assert not any(name == "confprobe_queue_depth" for name, _ in figures)


STORE_FOLDERS = (
    "datasets",
    "extractions",
    "cache",
    "adapters",
    "probes",
    "probe_runs",
    "evaluations",
    "transfers",
    "comparisons",
    "finetunes",
    "staging",
)


def walked(root: Path) -> tuple[int, int]:
    """Bytes and files under `root`, counted on the filesystem."""
    files = [path for path in root.rglob("*") if path.is_file()] if root.is_dir() else []
    return sum(path.stat().st_size for path in files), len(files)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_storage_use_per_kind_is_the_bytes_and_objects_the_store_holds(api: Any, settings: Settings) -> None:
    rows = b'{"text": "Paris is in France.", "label": 1}\n{"text": "Rome is in Spain.", "label": 0}\n'
    assert api.post("/v1/datasets", files={"file": ("s.jsonl", rows)}).status_code == 201
    store = open_store(settings)
    store.write_bytes("probes/prb_a/report.json", b"{}" * 100)
    store.write_bytes("probes/prb_a/weights.safetensors", b"w" * 4096)
    store.write_bytes("cache/ab/abcd/shard-1.safetensors", b"v" * 12345)
    store.write_bytes("staging/uploads/upl_a.archive", b"a" * 7)
    figures = samples(api)
    root = settings.resolved_artifact_dir
    for folder in STORE_FOLDERS:
        labels = (("kind", folder),)
        assert (figures[("confprobe_storage_bytes", labels)], figures[("confprobe_storage_objects", labels)]) == walked(
            root / folder
        ), folder
        assert figures[("confprobe_storage_listing_complete", labels)] == 1
    assert figures[("confprobe_storage_objects", (("kind", "probes"),))] == 2
    assert figures[("confprobe_backend_up", (("backend", "store"),))] == 1


def test_a_folder_past_the_listing_bound_is_counted_up_to_it_and_said_to_be_incomplete(tmp_path: Path) -> None:
    store = FolderStore(tmp_path)
    for name in "abc":
        store.write_bytes(f"probes/{name}", b"x" * 10)
    store.write_bytes("datasets/d.jsonl", b"y" * 3)
    usage = StorageUsage(store, ttl_s=3600, max_objects=2, folders=("probes", "datasets")).usage()
    assert usage["probes"] == FolderUsage(bytes=20, objects=2, complete=False)
    assert usage["datasets"] == FolderUsage(bytes=3, objects=1, complete=True)


def test_storage_figures_are_listed_again_only_once_they_are_ttl_old(tmp_path: Path) -> None:
    store = FolderStore(tmp_path)
    store.write_bytes("probes/a", b"x")
    cached, fresh = (StorageUsage(store, ttl_s=ttl, max_objects=10, folders=("probes",)) for ttl in (3600, 0))
    assert cached.usage()["probes"].objects == fresh.usage()["probes"].objects == 1
    store.write_bytes("probes/b", b"x")
    assert cached.usage()["probes"].objects == 1
    assert fresh.usage()["probes"].objects == 2
