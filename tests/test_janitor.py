"""The janitor removes exactly the artifacts no registry row refers to — and nothing a job
still at work may be about to register, and nothing outside the service's folders."""

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from app import janitor
from app.registry.tables import Adapter, Comparison, Job, utcnow
from app.settings import Settings
from app.storage import ArtifactStore, FolderStore, open_store
from app.storage.base import is_partial
from app.storage.bucket import BucketStore
from app.storage.folder import partial_name
from tests.api.test_models import register
from tests.conftest import ROOT, S3Server, settings_environment, wait_until
from workers import runtime

STATEMENTS = b'{"text": "Paris is in France.", "label": 1}\n{"text": "Rome is in Spain.", "label": 0}\n'


@pytest.fixture(params=["local", "s3"])
def store_settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    if request.param == "local":
        return settings
    s3: S3Server = request.getfixturevalue("s3_server")
    return settings.model_copy(
        update={
            "artifact_store": f"s3://{s3.bucket}/{s3.new_prefix()}",
            "s3_endpoint_url": s3.endpoint_url,
            "artifact_dir": None,
        }
    )


def _fill(api: Any, settings: Settings, store: ArtifactStore, tiny_llama: Path) -> dict[str, list[str]]:
    """A registry with a dataset, an adapter and a queued upload, and a store holding their
    files beside orphans of every kind."""
    dataset = api.post("/v1/datasets", files={"file": ("s.jsonl", STATEMENTS)}, data={"name": "s"}).json()
    model = register(api, tiny_llama).json()
    with runtime.build_runtime(settings).sessions() as session, session.begin():
        session.add(
            Adapter(
                id="adp_kept",
                name="a",
                base_model_id=model["id"],
                source_kind="upload",
                source="x",
                r=4,
                lora_alpha=8.0,
                target_modules=["q_proj"],
                sha256="f" * 64,
                identity="f" * 64,
                size_bytes=3,
                artifact="adapters/" + "f" * 64,
            )
        )
        session.add(
            Comparison(
                id="cmp_kept",
                job_id="job_c",
                model_id=model["id"],
                adapter_ids=[],
                dataset_id=dataset["id"],
                layers=[1],
                method="logistic",
                token_position="last",
                artifact="comparisons/cmp_kept/report.json",
            )
        )
        session.add(
            Job(
                id="job_waiting_upload",
                kind="adapter_import",
                status="queued",
                queue="q",
                params={"upload": "staging/uploads/upl_queued.archive"},
            )
        )
        session.add(
            Job(
                id="job_done_upload",
                kind="adapter_import",
                status="cancelled",
                queue="q",
                params={"upload": "staging/uploads/upl_cancelled.archive"},
            )
        )
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


def test_nothing_younger_than_the_grace_period_or_the_oldest_running_job_is_touched(
    api: Any, settings: Settings, tiny_llama: Path
) -> None:
    store = open_store(settings)
    files = _fill(api, settings, store, tiny_llama)
    sessions = runtime.build_runtime(settings).sessions
    assert janitor.sweep(sessions, store, grace_s=3600).removed == []

    with sessions() as session, session.begin():  # a job at work since before the orphans were written
        session.add(
            Job(
                id="job_busy",
                kind="extraction",
                status="running",
                queue="q",
                params={},
                started_at=utcnow() - timedelta(minutes=5),
            )
        )
    assert janitor.sweep(sessions, store, grace_s=0).removed == []
    assert set(files["orphans"]) <= _keys(store)


def test_the_cli_reports_what_it_removed(api: Any, settings: Settings, tiny_llama: Path) -> None:
    store = open_store(settings)
    files = _fill(api, settings, store, tiny_llama)
    env = settings_environment(settings)
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "janitor", "--grace-s", "0", "--json"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(result.stdout)
    assert sorted(report["removed"]) == sorted(files["orphans"]) and report["dry_run"] is False
    assert report["aborted_uploads"] == [] and report["local_removed"] == [] and report["freed_bytes"] > 0
    assert not set(files["orphans"]) & _keys(store)


def test_one_worker_a_turn_sweeps_in_the_background(api: Any, settings: Settings) -> None:
    settings = settings.model_copy(update={"janitor_interval_s": 60, "janitor_grace_s": 0})
    store = open_store(settings)
    store.write_bytes("probes/prb_gone/report.json", b"{}")
    first, second = (
        runtime.build_runtime(settings),
        runtime.build_runtime(settings.model_copy(update={"worker_name": "another"})),
    )
    assert first.maybe_sweep_artifacts() is True
    assert (
        second.maybe_sweep_artifacts() is False
    )  # the deployment's turn is taken for the interval, and this machine's
    wait_until(lambda: not store.exists("probes/prb_gone/report.json"), 10, "the sweep to remove the orphan")
    # a worker on another machine still sweeps that machine's own temporaries, once per interval
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtime.socket, "gethostname", lambda: "another-machine")
        elsewhere = runtime.build_runtime(settings.model_copy(update={"worker_name": "elsewhere"}))
        assert elsewhere.maybe_sweep_artifacts() is True
        assert (
            runtime.build_runtime(settings.model_copy(update={"worker_name": "elsewhere-2"})).maybe_sweep_artifacts()
            is False
        )
    assert runtime.build_runtime(settings.model_copy(update={"janitor_interval_s": 0})).maybe_sweep_artifacts() is False


# --- incomplete uploads to a bucket --------------------------------------------------------


@pytest.fixture
def s3_settings(settings: Settings, s3_server: S3Server) -> Settings:
    return settings.model_copy(
        update={
            "artifact_store": f"s3://{s3_server.bucket}/{s3_server.new_prefix()}",
            "s3_endpoint_url": s3_server.endpoint_url,
            "artifact_dir": None,
        }
    )


def start_upload(s3_server: S3Server, name: str) -> str:
    """What a worker killed mid-upload leaves in the bucket: an upload started, a part sent,
    never completed or aborted."""
    client = s3_server.client()
    upload_id = client.create_multipart_upload(Bucket=s3_server.bucket, Key=name)["UploadId"]
    client.upload_part(Bucket=s3_server.bucket, Key=name, UploadId=upload_id, PartNumber=1, Body=b"part")
    return upload_id


def incomplete_uploads(s3_server: S3Server, prefix: str) -> list[str]:
    """Names of the uploads under `prefix` still open, straight from the server."""
    answer = s3_server.client().list_multipart_uploads(Bucket=s3_server.bucket, Prefix=prefix)
    return sorted(upload["Key"] for upload in answer.get("Uploads", []))


def test_a_stale_incomplete_upload_is_aborted_and_a_recent_one_kept(s3_settings: Settings, s3_server: S3Server) -> None:
    store = open_store(s3_settings)
    assert isinstance(store, BucketStore)
    start_upload(s3_server, f"{store.prefix}extractions/ext_dead/hidden_states.safetensors")
    sessions = runtime.build_runtime(s3_settings).sessions

    # moto dates every upload's start in 2010: only its part says it is recent
    assert janitor.sweep(sessions, store, grace_s=3600).aborted_uploads == []
    dry = janitor.sweep(sessions, store, grace_s=0, dry_run=True)
    assert dry.aborted_uploads == ["extractions/ext_dead/hidden_states.safetensors"] and dry.freed_bytes == len(b"part")
    assert incomplete_uploads(s3_server, store.prefix) == [
        f"{store.prefix}extractions/ext_dead/hidden_states.safetensors"
    ]

    report = janitor.sweep(sessions, store, grace_s=0)
    assert report.aborted_uploads == ["extractions/ext_dead/hidden_states.safetensors"] and report.removed == []
    assert json.loads(json.dumps(report.as_dict()))["aborted_uploads"] == [
        "extractions/ext_dead/hidden_states.safetensors"
    ]
    assert incomplete_uploads(s3_server, store.prefix) == []
    assert janitor.sweep(sessions, store, grace_s=0).aborted_uploads == []


def test_an_incomplete_upload_of_a_job_still_running_is_kept(s3_settings: Settings, s3_server: S3Server) -> None:
    store = open_store(s3_settings)
    assert isinstance(store, BucketStore)
    sessions = runtime.build_runtime(s3_settings).sessions
    with sessions() as session, session.begin():
        session.add(
            Job(
                id="job_busy",
                kind="extraction",
                status="running",
                queue="q",
                params={},
                started_at=utcnow() - timedelta(minutes=5),
            )
        )
    start_upload(s3_server, f"{store.prefix}extractions/ext_busy/hidden_states.safetensors")
    assert janitor.sweep(sessions, store, grace_s=0).aborted_uploads == []
    assert incomplete_uploads(s3_server, store.prefix) == [
        f"{store.prefix}extractions/ext_busy/hidden_states.safetensors"
    ]


def test_uploads_outside_the_store_s_prefix_or_the_service_s_folders_are_never_touched(
    s3_settings: Settings, s3_server: S3Server
) -> None:
    store = open_store(s3_settings)
    assert isinstance(store, BucketStore)
    outside = [
        f"{store.prefix.rstrip('/')}-other/extractions/ext_x/hidden_states.safetensors",  # a prefix that merely starts like ours
        f"{s3_server.new_prefix()}/extractions/ext_x/hidden_states.safetensors",  # another deployment's
        f"{store.prefix}elsewhere/big.bin",  # ours, but not a folder of the service
    ]
    uploads = {name: start_upload(s3_server, name) for name in outside}
    try:
        report = janitor.sweep(runtime.build_runtime(s3_settings).sessions, store, grace_s=0)
        assert report.aborted_uploads == []
        for name in outside:
            assert incomplete_uploads(s3_server, name) == [name]
    finally:
        for name, upload_id in uploads.items():
            s3_server.client().abort_multipart_upload(Bucket=s3_server.bucket, Key=name, UploadId=upload_id)


# --- temporaries on this machine -----------------------------------------------------------

KILLED_MID_WRITE = """
import time

from app.settings import get_settings
from app.storage import open_store

store = open_store(get_settings())
with store.scratch("job_dead") as scratch, store.writer("extractions/ext_dead/hidden_states.safetensors") as handle:
    (scratch / "converted").mkdir()
    (scratch / "converted" / "weights.bin").write_bytes(b"w" * 1000)
    handle.write(b"s" * 1000)
    handle.flush()
    print("ready", flush=True)
    time.sleep(600)
"""


def kill_mid_write(settings: Settings) -> None:
    """A worker SIGKILLed while it works in a scratch folder and writes an artifact."""
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_MID_WRITE], env=settings_environment(settings), cwd=ROOT, stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == b"ready\n"
    finally:
        process.kill()
        process.wait()


def age(path: Path, seconds: float = 7200) -> None:
    """Make `path` and everything in it look untouched for `seconds`, as if its process had
    died that long ago."""
    when = time.time() - seconds
    for item in [*path.rglob("*"), path] if path.is_dir() else [path]:
        os.utime(item, (when, when), follow_symlinks=False)


def test_local_temporaries_a_killed_process_left_beside_an_s3_store_are_swept(s3_settings: Settings) -> None:
    store = open_store(s3_settings)
    assert isinstance(store, BucketStore)
    store.write_bytes("datasets/d.jsonl", b"rows")
    store.write_bytes("adapters/sha/adapter_config.json", b"{}")
    cached_file, cached_folder = store.local_path("datasets/d.jsonl"), store.local_folder("adapters/sha")
    kill_mid_write(s3_settings)
    # downloads that were being received when their process died, beside the copies they would have become
    download = partial_name(cached_file)
    download.write_bytes(b"ro")
    folder_download = partial_name(cached_folder)
    (folder_download / "nested").mkdir(parents=True)
    (folder_download / "nested" / "adapter_model.safetensors").write_bytes(b"weights")
    [upload] = (store.local_dir / "uploads").iterdir()
    scratch = store.local_dir / "staging" / "job_dead"
    for path in (cached_file, cached_folder, upload, download, folder_download, scratch):
        age(path)
    sessions = runtime.build_runtime(s3_settings).sessions

    with store.scratch("job_alive") as alive:  # a job at work now
        (alive / "weights.bin").write_bytes(b"w")
        dry = janitor.sweep_local(sessions, store, grace_s=3600, dry_run=True)
        report = janitor.sweep_local(sessions, store, grace_s=3600)
        assert alive.is_dir()
    leftovers = {str(path) for path in (upload, download, folder_download, scratch)}
    assert set(dry.local_removed) == set(report.local_removed) == leftovers
    assert report.freed_bytes == 1000 + len(b"ro") + len(b"weights") + 1000
    assert not any(Path(path).exists() for path in leftovers)
    assert cached_file.read_bytes() == b"rows" and (cached_folder / "adapter_config.json").read_bytes() == b"{}"
    assert (store.local_dir / "uploads").is_dir() and (store.local_dir / "staging").is_dir()
    assert report.removed == [] and store.exists("datasets/d.jsonl")  # the store itself is the deployment-wide sweep's


def test_the_sweep_evicts_least_recently_used_s3_copies_beyond_the_cache_limit(s3_settings: Settings) -> None:
    store = open_store(s3_settings.model_copy(update={"artifact_cache_max_mb": 1}))
    assert isinstance(store, BucketStore) and store.cache_max_bytes == 2**20
    store.write_bytes("extractions/big/hidden_states.safetensors", b"x" * 2**20)
    store.write_bytes("datasets/d.jsonl", b"rows")
    big, small = store.local_path("extractions/big/hidden_states.safetensors"), store.local_path("datasets/d.jsonl")
    age(big)
    sessions = runtime.build_runtime(s3_settings).sessions
    report = janitor.sweep_local(sessions, store, grace_s=3600)
    assert (
        report.cache_evicted == [str(big)]
        and report.freed_bytes == 2**20
        and report.as_dict()["cache_evicted"] == [str(big)]
    )
    assert not big.exists() and small.read_bytes() == b"rows"
    assert store.exists("extractions/big/hidden_states.safetensors")  # only this machine's copy went
    assert janitor.sweep_local(sessions, store, grace_s=3600).cache_evicted == []


def test_the_deployment_wide_sweep_also_sweeps_its_own_machine(s3_settings: Settings) -> None:
    store = open_store(s3_settings)
    assert isinstance(store, BucketStore)
    kill_mid_write(s3_settings)
    [upload] = (store.local_dir / "uploads").iterdir()
    sessions = runtime.build_runtime(s3_settings).sessions
    assert janitor.sweep(sessions, store, grace_s=3600).local_removed == []  # written a moment ago
    age(upload)
    age(store.local_dir / "staging" / "job_dead")
    report = janitor.sweep(sessions, store, grace_s=3600)
    assert sorted(report.local_removed) == sorted([str(upload), str(store.local_dir / "staging" / "job_dead")])
    assert report.as_dict()["local_removed"] == report.local_removed


def test_a_killed_process_s_scratch_in_a_folder_store_goes_as_objects_then_as_empty_folders(settings: Settings) -> None:
    store = open_store(settings)
    assert isinstance(store, FolderStore)
    kill_mid_write(settings)
    doomed = partial_name(store.path("probes/prb_gone"))  # a folder removal that was interrupted
    doomed.mkdir(parents=True)
    (doomed / "report.json").write_bytes(b"{}")
    staging, extraction = store.path("staging"), store.path("extractions/ext_dead")
    for path in (staging, extraction, doomed.parent):
        age(path)
    sessions = runtime.build_runtime(settings).sessions

    first = janitor.sweep(sessions, store, grace_s=3600)
    [temporary] = [key for key in first.removed if key.startswith("extractions/")]
    assert is_partial(temporary)
    assert sorted(first.removed) == sorted(
        [temporary, "staging/job_dead/converted/weights.bin", f"probes/{doomed.name}/report.json"]
    )
    assert first.local_removed == []  # the folders were emptied just now
    assert (staging / "job_dead" / "converted").is_dir() and doomed.is_dir()

    age(staging)
    age(doomed)
    dry = janitor.sweep(sessions, store, grace_s=3600, dry_run=True)
    second = janitor.sweep(sessions, store, grace_s=3600)
    assert sorted(dry.local_removed) == sorted(second.local_removed) == sorted([str(staging / "job_dead"), str(doomed)])
    assert second.removed == [] and not (staging / "job_dead").exists() and not doomed.exists()
    assert staging.is_dir() and store.path("probes").is_dir()
