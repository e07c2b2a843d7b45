"""The janitor removes exactly the artifacts no registry row refers to — and nothing a job
still at work may be about to register, and nothing outside the service's folders."""

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from app import janitor
from app.registry.tables import Adapter, Comparison, Job, utcnow
from app.settings import Settings
from app.storage import ArtifactStore, open_store
from tests.api.test_models import register
from tests.conftest import ROOT, S3Server, settings_environment, wait_until
from workers import runtime

STATEMENTS = b'{"text": "Paris is in France.", "label": 1}\n{"text": "Rome is in Spain.", "label": 0}\n'


@pytest.fixture(params=["local", "s3"])
def store_settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    if request.param == "local":
        return settings
    s3: S3Server = request.getfixturevalue("s3_server")
    return settings.model_copy(update={"artifact_store": f"s3://{s3.bucket}/{s3.new_prefix()}", "s3_endpoint_url": s3.endpoint_url, "artifact_dir": None})


def _fill(api: Any, settings: Settings, store: ArtifactStore, tiny_llama: Path) -> dict[str, list[str]]:
    """A registry with a dataset, an adapter and a queued upload, and a store holding their
    files beside orphans of every kind."""
    dataset = api.post("/v1/datasets", files={"file": ("s.jsonl", STATEMENTS)}, data={"name": "s"}).json()
    model = register(api, tiny_llama).json()
    with runtime.build_runtime(settings).sessions() as session, session.begin():
        session.add(Adapter(
            id="adp_kept", name="a", base_model_id=model["id"], source_kind="upload", source="x", r=4, lora_alpha=8.0,
            target_modules=["q_proj"], sha256="f" * 64, size_bytes=3, artifact="adapters/" + "f" * 64,
        ))  # fmt: skip
        session.add(Comparison(
            id="cmp_kept", job_id="job_c", model_id=model["id"], adapter_ids=[], dataset_id=dataset["id"], layers=[1], method="logistic",
            token_position="last", artifact="comparisons/cmp_kept/report.json",
        ))  # fmt: skip
        session.add(Job(id="job_waiting_upload", kind="adapter_import", status="queued", queue="q", params={"upload": "staging/uploads/upl_queued.archive"}))
        session.add(Job(id="job_done_upload", kind="adapter_import", status="cancelled", queue="q", params={"upload": "staging/uploads/upl_cancelled.archive"}))
    kept = [
        f"adapters/{'f' * 64}/adapter_model.safetensors",
        f"adapters/{'f' * 64}/adapter_config.json",
        "staging/uploads/upl_queued.archive",
        "comparisons/cmp_kept/report.json",
        "comparisons/cmp_kept/rendered/v1/report.svg",  # renderings are kept beside their report
        "elsewhere/not-ours.txt",  # outside the service's folders: never touched
    ]
    orphans = [
        "staging/uploads/upl_cancelled.archive",  # its job was cancelled before it ran
        f"adapters/{'e' * 64}/adapter_model.safetensors",  # published, then the worker died before the row
        "probes/prb_gone/report.json",
        "comparisons/cmp_gone/report.json",
        "extractions/ext_gone/hidden_states.safetensors",
        "staging/job_dead/files/weights.bin",  # scratch of a killed job
        "cache/space/.shard.safetensors.abc123.partial",  # a temporary name a killed writer never renamed
    ]
    for key in kept + orphans:
        store.write_bytes(key, b"xyz")
    assert dataset["id"]
    return {"kept": kept, "orphans": orphans}


def _keys(store: ArtifactStore) -> set[str]:
    return {stored.key for stored in store.iter_objects("")}


def test_orphans_go_and_everything_referenced_stays(api: Any, store_settings: Settings, tiny_llama: Path) -> None:
    store = open_store(store_settings)
    api.app.state.artifacts = store
    files = _fill(api, store_settings, store, tiny_llama)
    dataset_files = {key for key in _keys(store) if key.startswith("datasets/")}
    assert len(dataset_files) == 1
    sessions = runtime.build_runtime(store_settings).sessions

    dry = janitor.sweep(sessions, store, grace_s=0, dry_run=True)
    assert sorted(dry.removed) == sorted(files["orphans"]) and dry.freed_bytes == 3 * len(files["orphans"])
    assert set(files["orphans"]) <= _keys(store)  # a dry run removes nothing

    report = janitor.sweep(sessions, store, grace_s=0)
    assert sorted(report.removed) == sorted(files["orphans"])
    assert _keys(store) == set(files["kept"]) | dataset_files
    assert api.get(f"/v1/datasets/{api.get('/v1/datasets').json()['items'][0]['id']}").status_code == 200
    assert janitor.sweep(sessions, store, grace_s=0).removed == []


def test_nothing_younger_than_the_grace_period_or_the_oldest_running_job_is_touched(api: Any, settings: Settings, tiny_llama: Path) -> None:
    store = open_store(settings)
    files = _fill(api, settings, store, tiny_llama)
    sessions = runtime.build_runtime(settings).sessions
    assert janitor.sweep(sessions, store, grace_s=3600).removed == []

    with sessions() as session, session.begin():  # a job at work since before the orphans were written
        session.add(Job(id="job_busy", kind="extraction", status="running", queue="q", params={}, started_at=utcnow() - timedelta(minutes=5)))
    assert janitor.sweep(sessions, store, grace_s=0).removed == []
    assert set(files["orphans"]) <= _keys(store)


def test_the_cli_reports_what_it_removed(api: Any, settings: Settings, tiny_llama: Path) -> None:
    store = open_store(settings)
    files = _fill(api, settings, store, tiny_llama)
    env = settings_environment(settings)
    result = subprocess.run([sys.executable, "-m", "app.cli", "janitor", "--grace-s", "0", "--json"], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    report = json.loads(result.stdout)
    assert sorted(report["removed"]) == sorted(files["orphans"]) and report["dry_run"] is False
    assert not set(files["orphans"]) & _keys(store)


def test_one_worker_a_turn_sweeps_in_the_background(api: Any, settings: Settings) -> None:
    settings = settings.model_copy(update={"janitor_interval_s": 60, "janitor_grace_s": 0})
    store = open_store(settings)
    store.write_bytes("probes/prb_gone/report.json", b"{}")
    first, second = runtime.build_runtime(settings), runtime.build_runtime(settings.model_copy(update={"worker_name": "another"}))
    assert first.maybe_sweep_artifacts() is True
    assert second.maybe_sweep_artifacts() is False  # the deployment's turn is taken for the interval
    wait_until(lambda: not store.exists("probes/prb_gone/report.json"), 10, "the sweep to remove the orphan")
    assert runtime.build_runtime(settings.model_copy(update={"janitor_interval_s": 0})).maybe_sweep_artifacts() is False
