"""The artifact store's contract, held by each backend: a local folder, a shared folder
(`file://`), and an S3 bucket on a real S3-compatible server."""

import io
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from app.settings import Settings
from app.storage import (
    PARTIAL_SUFFIX,
    ArtifactMissing,
    ArtifactStore,
    FolderStore,
    StoreUnavailable,
    open_store,
)
from app.storage import bucket as bucket_module
from app.storage.bucket import BucketStore
from tests.conftest import S3Server, free_port

BACKENDS = ["local", "shared", "s3"]


def settings_for(backend: str, tmp_path: Path, s3_server: S3Server | None = None) -> Settings:
    var_dir = tmp_path / "var"
    if backend == "local":
        return Settings(var_dir=var_dir)
    if backend == "shared":
        return Settings(var_dir=var_dir, artifact_store=f"file://{tmp_path / 'shared'}")
    assert s3_server is not None
    return Settings(
        var_dir=var_dir,
        artifact_store=f"s3://{s3_server.bucket}/{s3_server.new_prefix()}",
        s3_endpoint_url=s3_server.endpoint_url,
    )


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    s3_server = request.getfixturevalue("s3_server") if request.param == "s3" else None
    return open_store(settings_for(request.param, tmp_path, s3_server))


def local_files(store: ArtifactStore) -> list[Path]:
    """Every file the store keeps on this machine: its folder, or an S3 store's cache and uploads."""
    top = store.root if isinstance(store, FolderStore) else store.local_dir  # type: ignore[attr-defined]
    return sorted(path for path in top.rglob("*") if path.is_file()) if top.exists() else []


def unfinished_uploads(store: ArtifactStore) -> list[Any]:
    if not isinstance(store, BucketStore):
        return []
    return store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix).get("Uploads", [])


# --- round trips ---------------------------------------------------------------------------


def test_bytes_written_are_read_back_whole_and_in_ranges(store: ArtifactStore) -> None:
    store.write_bytes("datasets/abc.jsonl", b"0123456789")
    assert store.exists("datasets/abc.jsonl") and not store.exists("datasets/other.jsonl")
    assert store.size("datasets/abc.jsonl") == 10
    assert store.read_bytes("datasets/abc.jsonl") == b"0123456789"
    assert store.read_bytes("datasets/abc.jsonl", 2, 5) == b"234"
    assert store.read_bytes("datasets/abc.jsonl", 7) == b"789"
    assert list(store.iter_bytes("datasets/abc.jsonl", 1, 9, chunk_bytes=3)) == [b"123", b"456", b"78"]


def test_writers_and_library_paths_store_what_was_written(store: ArtifactStore) -> None:
    with store.writer("reports/a.json") as handle:
        handle.write(b'{"a": ')
        handle.write(b"1}")
    with store.temporary_path("extractions/e/states.bin") as path:
        path.write_bytes(b"\x00\x01" * 1000)
    assert store.read_bytes("reports/a.json") == b'{"a": 1}'
    assert store.read_bytes("extractions/e/states.bin") == b"\x00\x01" * 1000


def test_a_key_has_one_canonical_name(store: ArtifactStore) -> None:
    store.write_bytes("a//b/./c.txt", b"same")
    assert store.read_bytes("a/b/c.txt") == b"same"
    assert [stored.key for stored in store.iter_objects("a")] == ["a/b/c.txt"]


def test_a_missing_key_is_file_not_found_on_every_read(store: ArtifactStore) -> None:
    for read in (store.size, store.read_bytes, store.iter_bytes, store.local_path, store.local_folder):
        with pytest.raises(ArtifactMissing) as missing:
            read("nothing//here")
        assert isinstance(missing.value, FileNotFoundError) and missing.value.key == "nothing/here", read
    assert local_files(store) == []


ESCAPING_KEYS = ["", ".", "/etc/passwd", "../outside", "a/../../outside", "a/\x00b"]


@pytest.mark.parametrize("key", ESCAPING_KEYS)
def test_keys_that_escape_the_store_are_refused_by_every_method(store: ArtifactStore, key: str, tmp_path: Path) -> None:
    source = tmp_path / "folder"
    source.mkdir()
    (source / "file").write_bytes(b"x")
    calls: list[Callable[[], Any]] = [
        lambda: store.write_bytes(key, b"x"),
        lambda: store.writer(key).__enter__(),
        lambda: store.temporary_path(key).__enter__(),
        lambda: store.read_bytes(key),
        lambda: store.iter_bytes(key),
        lambda: store.exists(key),
        lambda: store.size(key),
        lambda: store.local_path(key),
        lambda: store.local_folder(key),
        lambda: store.publish_folder(key, source),
        lambda: store.scratch(key).__enter__(),
        lambda: store.delete(key),
        lambda: store.delete_prefix(key),
    ]
    if key:  # "" lists the whole store
        calls.append(lambda: list(store.iter_objects(key)))
    for call in calls:
        with pytest.raises(ValueError, match="escapes"):
            call()
    assert not (tmp_path / "outside").exists()
    assert list(store.iter_objects()) == [] and (source / "file").exists()


# --- atomic writes -------------------------------------------------------------------------


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_writer_that_raises_leaves_no_object_and_no_temporary_file(
    store: ArtifactStore, error: type[BaseException]
) -> None:
    with pytest.raises(error), store.writer("datasets/broken.jsonl") as handle:
        handle.write(b"half of it")
        raise error()
    with pytest.raises(error), store.temporary_path("extractions/broken/states.bin") as path:
        path.write_bytes(b"half of it")
        raise error()
    assert not store.exists("datasets/broken.jsonl") and not store.exists("extractions/broken/states.bin")
    assert list(store.iter_objects()) == []
    assert local_files(store) == []
    assert unfinished_uploads(store) == []


def test_an_artifact_is_invisible_until_its_writer_finishes(store: ArtifactStore) -> None:
    with store.writer("probes/p/report.json") as handle:
        handle.write(b'{"half": ')
        assert not store.exists("probes/p/report.json")
        with pytest.raises(FileNotFoundError):
            store.read_bytes("probes/p/report.json")
        assert [stored.key for stored in store.iter_objects() if not stored.partial] == []
        handle.write(b"false}")
    assert store.read_bytes("probes/p/report.json") == b'{"half": false}'


def test_a_concurrent_reader_sees_the_whole_object_or_nothing(store: ArtifactStore) -> None:
    """12 MiB: above boto3's multipart threshold, so S3 gets it in parts."""
    content = os.urandom(12 * 2**20)
    seen: list[str] = []
    written = threading.Event()

    def read_until_whole() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                data = store.read_bytes("extractions/big/states.bin")
            except FileNotFoundError:
                seen.append("missing")
                continue
            seen.append("whole" if data == content else f"partial: {len(data)} bytes")
            if written.is_set():
                return

    reader = threading.Thread(target=read_until_whole)
    reader.start()
    with store.writer("extractions/big/states.bin") as handle:
        for start in range(0, len(content), 2**20):
            handle.write(content[start : start + 2**20])
            time.sleep(0.005)
    written.set()
    reader.join(90)
    assert seen and seen[-1] == "whole"
    assert set(seen) <= {"missing", "whole"}, [s for s in seen if s.startswith("partial")]
    assert unfinished_uploads(store) == []


# --- folders, listing, removal -------------------------------------------------------------


def test_objects_under_a_folder_prefix_are_listed_with_size_and_time(store: ArtifactStore) -> None:
    before = datetime.now(UTC) - timedelta(seconds=2)
    store.write_bytes("probes/p1/probe.json", b"12345")
    store.write_bytes("probes/p1/arrays/probe.safetensors", b"123")
    store.write_bytes("probes/p10/probe.json", b"1")
    store.write_bytes("datasets/d.jsonl", b"")
    after = datetime.now(UTC) + timedelta(seconds=2)
    listed = {stored.key: stored for stored in store.iter_objects("probes/p1")}
    assert {key: stored.size for key, stored in listed.items()} == {
        "probes/p1/probe.json": 5,
        "probes/p1/arrays/probe.safetensors": 3,
    }
    assert all(before <= stored.modified <= after and not stored.partial for stored in listed.values())
    assert {stored.key for stored in store.iter_objects()} == {*listed, "probes/p10/probe.json", "datasets/d.jsonl"}
    assert list(store.iter_objects("nothing")) == []


def test_delete_prefix_removes_a_folder_and_nothing_beside_it(store: ArtifactStore) -> None:
    for key in (
        "adapters/ab/adapter_config.json",
        "adapters/ab/weights/w.safetensors",
        "adapters/abc/adapter_config.json",
    ):
        store.write_bytes(key, b"x")
    store.local_folder("adapters/ab")
    store.delete_prefix("adapters/ab")
    store.delete_prefix("adapters/never-there")
    assert [stored.key for stored in store.iter_objects()] == ["adapters/abc/adapter_config.json"]
    with pytest.raises(FileNotFoundError):
        store.local_folder("adapters/ab")
    with pytest.raises(ValueError):
        store.delete_prefix("")


def test_delete_removes_a_key_and_a_missing_key_is_no_error(store: ArtifactStore) -> None:
    store.write_bytes("staging/uploads/u.archive", b"x")
    store.local_path("staging/uploads/u.archive")
    store.delete("staging/uploads/u.archive")
    store.delete("staging/uploads/u.archive")
    assert not store.exists("staging/uploads/u.archive")
    with pytest.raises(FileNotFoundError):
        store.local_path("staging/uploads/u.archive")


def adapter_folder(folder: Path) -> Path:
    (folder / "nested").mkdir(parents=True)
    (folder / "adapter_config.json").write_bytes(b"{}")
    (folder / "nested" / "adapter_model.safetensors").write_bytes(b"weights")
    return folder


ADAPTER_KEYS = ["adapters/sha/adapter_config.json", "adapters/sha/nested/adapter_model.safetensors"]


def test_a_published_folder_appears_whole_and_once(store: ArtifactStore, tmp_path: Path) -> None:
    with store.scratch("job_1") as scratch:
        assert store.publish_folder("adapters/sha", adapter_folder(scratch)) is True
    assert sorted(stored.key for stored in store.iter_objects("adapters/sha")) == ADAPTER_KEYS
    assert store.publish_folder("adapters/sha", adapter_folder(tmp_path / "again")) is False
    assert sorted(stored.key for stored in store.iter_objects("adapters/sha")) == ADAPTER_KEYS
    assert store.read_bytes("adapters/sha/nested/adapter_model.safetensors") == b"weights"
    assert [path for path in local_files(store) if path.name.endswith(PARTIAL_SUFFIX)] == []


def test_publishing_on_s3_completes_a_folder_an_interrupted_upload_left_half_done(
    s3_server: S3Server, tmp_path: Path
) -> None:
    store = open_store(settings_for("s3", tmp_path, s3_server))
    store.write_bytes("adapters/sha/adapter_config.json", b"{}")  # the first file of a worker that died
    assert store.publish_folder("adapters/sha", adapter_folder(tmp_path / "folder")) is False
    assert sorted(stored.key for stored in store.iter_objects("adapters/sha")) == ADAPTER_KEYS


def test_a_folder_with_a_link_is_refused_before_anything_is_stored(store: ArtifactStore, tmp_path: Path) -> None:
    folder = tmp_path / "hostile"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes(b"{}")
    (folder / "weights.safetensors").symlink_to("/etc/passwd")
    with pytest.raises(ValueError, match="not a regular file"):
        store.publish_folder("adapters/evil", folder)
    assert list(store.iter_objects()) == []


def test_scratch_is_an_empty_local_folder_removed_afterwards(store: ArtifactStore) -> None:
    with store.scratch("job_2") as scratch:
        assert scratch.is_dir() and list(scratch.iterdir()) == []
        (scratch / "work").write_bytes(b"x")
    assert not scratch.exists()


# --- leftovers of interrupted work ----------------------------------------------------------


KILLED_WRITER = """
import os, sys, time
from app.settings import Settings
from app.storage import open_store

store = open_store(Settings.model_validate_json(sys.argv[1]))
with store.temporary_path(sys.argv[2]) as path:
    path.write_bytes(os.urandom(1 << 20))
    print("written", flush=True)
    time.sleep(600)
"""


def killed_mid_write(settings: Settings, key: str) -> None:
    """A real process that dies (SIGKILL) while it writes `key`, as a worker killed mid-job."""
    import signal
    import subprocess
    import sys

    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, settings.model_dump_json(), key], stdout=subprocess.PIPE
    )
    assert writer.stdout is not None and writer.stdout.readline() == b"written\n"
    writer.send_signal(signal.SIGKILL)
    writer.wait(10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_what_a_killed_writer_left_of_a_key_is_removed_and_nothing_else(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    s3_server = request.getfixturevalue("s3_server") if backend == "s3" else None
    settings = settings_for(backend, tmp_path, s3_server)
    store = open_store(settings)
    store.write_bytes("extractions/e/states.bin", b"an earlier, finished artifact")
    killed_mid_write(settings, "extractions/e/states.bin")
    killed_mid_write(settings, "extractions/e/states.bin.more")
    killed_mid_write(settings, "extractions/other/states.bin")
    assert len([path for path in local_files(store) if path.name.endswith(PARTIAL_SUFFIX)]) == 3
    if isinstance(store, BucketStore):
        name = f"{store.prefix}extractions/e/states.bin"
        upload_id = store.client.create_multipart_upload(Bucket=store.bucket, Key=name)["UploadId"]
        store.client.upload_part(Bucket=store.bucket, Key=name, UploadId=upload_id, PartNumber=1, Body=b"12345")

    assert store.remove_partials("extractions/e/states.bin") == (2 if isinstance(store, BucketStore) else 1)
    assert unfinished_uploads(store) == []
    assert (
        len([path for path in local_files(store) if path.name.endswith(PARTIAL_SUFFIX)]) == 2
    )  # other keys' are not its to remove
    assert store.read_bytes("extractions/e/states.bin") == b"an earlier, finished artifact"
    assert store.remove_partials("extractions/e/states.bin") == 0


def test_incomplete_uploads_are_listed_under_a_folder_and_aborted_once(store: ArtifactStore) -> None:
    if not isinstance(store, BucketStore):
        assert store.list_multipart_uploads("extractions") == []  # a folder store writes temporary files instead
        return
    name = f"{store.prefix}extractions/e/states.bin"
    upload_id = store.client.create_multipart_upload(Bucket=store.bucket, Key=name)["UploadId"]
    store.client.upload_part(Bucket=store.bucket, Key=name, UploadId=upload_id, PartNumber=1, Body=b"12345")
    [pending] = store.list_multipart_uploads("extractions")
    assert (pending.key, pending.upload_id, pending.size) == ("extractions/e/states.bin", upload_id, 5)
    assert datetime.now(UTC) - timedelta(minutes=1) < pending.last_activity <= datetime.now(UTC)
    assert store.list_multipart_uploads("extractions/e2") == [] and store.list_multipart_uploads("probes") == []
    store.abort_multipart_upload("extractions/e/states.bin", upload_id)
    store.abort_multipart_upload("extractions/e/states.bin", upload_id)
    assert store.list_multipart_uploads("extractions") == [] and unfinished_uploads(store) == []


def abandoned_scratch(store: ArtifactStore) -> Path:
    """An empty scratch folder its process never removed (it was killed), untouched for two hours."""
    with store.scratch("job_dead") as scratch:
        pass
    scratch.mkdir(parents=True)
    long_ago = time.time() - 7200
    os.utime(scratch, (long_ago, long_ago))
    return scratch


def test_a_leftover_is_listed_once_idle_and_removed(store: ArtifactStore) -> None:
    scratch = abandoned_scratch(store)
    assert store.local_leftovers(datetime.now(UTC) - timedelta(hours=3)) == []
    [leftover] = store.local_leftovers(datetime.now(UTC) - timedelta(hours=1))
    assert leftover.path == scratch and leftover.size == 0
    assert store.remove_local_leftover(leftover) is True
    assert not scratch.exists() and scratch.parent.is_dir()
    assert store.local_leftovers(datetime.now(UTC)) == []


def test_a_leftover_a_process_came_back_to_is_not_removed(store: ArtifactStore) -> None:
    scratch = abandoned_scratch(store)
    [leftover] = store.local_leftovers(datetime.now(UTC) - timedelta(hours=1))
    (scratch / "converted").mkdir()  # a retried job made a fresh folder of the same name meanwhile
    assert store.remove_local_leftover(leftover) is False
    assert (scratch / "converted").is_dir()


# --- local copies --------------------------------------------------------------------------


def test_local_paths_and_folders_hold_the_stored_bytes(store: ArtifactStore) -> None:
    store.write_bytes("probes/p/probe.json", b'{"w": 1}')
    store.write_bytes("probes/p/probe.safetensors", b"arrays")
    assert store.local_path("probes/p/probe.json").read_bytes() == b'{"w": 1}'
    folder = store.local_folder("probes/p")
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == {
        "probe.json": b'{"w": 1}',
        "probe.safetensors": b"arrays",
    }


def test_folder_stores_hand_out_their_own_files(store: ArtifactStore) -> None:
    store.write_bytes("datasets/d.jsonl", b"rows")
    if isinstance(store, FolderStore):
        assert (
            store.local_path("datasets/d.jsonl")
            == store.direct_path("datasets/d.jsonl")
            == store.root / "datasets" / "d.jsonl"
        )
    else:
        assert store.direct_path("datasets/d.jsonl") is None


def test_s3_copies_are_downloaded_once_and_reused(s3_server: S3Server, tmp_path: Path) -> None:
    store = open_store(settings_for("s3", tmp_path, s3_server))
    assert isinstance(store, BucketStore)
    store.write_bytes("adapters/sha/adapter_config.json", b"{}")
    store.write_bytes("extractions/e/states.bin", b"states")
    path, folder = store.local_path("extractions/e/states.bin"), store.local_folder("adapters/sha")
    assert path.is_relative_to(tmp_path / "var" / "cache" / "artifacts") and folder.is_relative_to(
        tmp_path / "var" / "cache" / "artifacts"
    )
    # removed behind the store's back: the copies are what later reads get
    s3_server.client().delete_objects(
        Bucket=store.bucket,
        Delete={
            "Objects": [
                {"Key": f"{store.prefix}{key}"}
                for key in ("adapters/sha/adapter_config.json", "extractions/e/states.bin")
            ]
        },
    )
    assert store.local_path("extractions/e/states.bin").read_bytes() == b"states"
    assert (store.local_folder("adapters/sha") / "adapter_config.json").read_bytes() == b"{}"
    assert not store.exists("extractions/e/states.bin")
    assert [p for p in local_files(store) if p.name.endswith(PARTIAL_SUFFIX)] == []


def test_s3_copies_beyond_the_cache_limit_are_evicted_least_recently_used_first(
    s3_server: S3Server, tmp_path: Path
) -> None:
    store = open_store(settings_for("s3", tmp_path, s3_server))
    assert isinstance(store, BucketStore)
    store.cache_max_bytes = 2500
    now = datetime.now(UTC)

    def used_ago(path: Path, hours: float) -> None:
        when = (now - timedelta(hours=hours)).timestamp()
        os.utime(path, (when, when))

    for name in ("oldest", "older", "recent"):
        store.write_bytes(f"extractions/{name}/states.bin", name.encode() * (1000 // len(name)))
    store.write_bytes("adapters/sha/adapter_config.json", b"{}")
    store.write_bytes("adapters/sha/adapter_model.safetensors", b"w" * 1000)
    used_ago(store.local_path("extractions/oldest/states.bin"), 5)
    used_ago(store.local_path("extractions/older/states.bin"), 4)
    used_ago(store.local_folder("adapters/sha"), 3)  # a folder artifact is one copy
    store.local_path("extractions/recent/states.bin")
    # using a copy again makes it the most recent
    used_ago(store.local_path("extractions/older/states.bin"), 4)
    assert store.local_path("extractions/older/states.bin").stat().st_mtime > (now - timedelta(minutes=1)).timestamp()
    used_ago(store._cached("objects", "extractions/older/states.bin"), 2)

    copies = {copy.path: copy.size for copy in store.cached_copies()}
    assert sum(copies.values()) > store.cache_max_bytes and len(copies) == 4
    cutoff = now - timedelta(hours=1)
    assert [copy.path.name for copy in store.trim_local_cache(cutoff, dry_run=True)] == ["states.bin", "sha"]
    assert len(store.cached_copies()) == 4  # a dry run evicts nothing
    evicted = store.trim_local_cache(cutoff)
    assert [copy.path for copy in evicted] == [
        store._cached("objects", "extractions/oldest/states.bin"),
        store._cached("folders", "adapters/sha"),
    ]
    assert sum(copy.size for copy in store.cached_copies()) <= store.cache_max_bytes
    assert store.trim_local_cache(cutoff) == []
    # nothing used since the cutoff goes, even over the limit
    store.cache_max_bytes = 10
    assert [copy.path.parent.name for copy in store.trim_local_cache(cutoff)] == ["older"]
    assert [copy.path.parent.name for copy in store.cached_copies()] == ["recent"]
    # a copy handed out after it was listed is not evicted from under its reader
    [listed] = store.cached_copies()
    time.sleep(0.01)
    store.local_path("extractions/recent/states.bin")
    assert bucket_module._evict(listed) is False and listed.path.is_file()
    # an evicted copy is downloaded again, whole, when it is needed
    assert (store.local_folder("adapters/sha") / "adapter_model.safetensors").read_bytes() == b"w" * 1000
    assert store.local_path("extractions/oldest/states.bin").read_bytes() == b"oldest" * 166
    assert [p for p in local_files(store) if PARTIAL_SUFFIX in p.as_posix()] == []


def test_s3_objects_live_under_the_prefix_in_the_bucket(s3_server: S3Server, tmp_path: Path) -> None:
    store = open_store(settings_for("s3", tmp_path, s3_server))
    assert isinstance(store, BucketStore)
    store.write_bytes("datasets/d.jsonl", b"rows")
    assert s3_server.keys(store.prefix.rstrip("/")) == [f"{store.prefix}datasets/d.jsonl"]


# --- an unreachable bucket -----------------------------------------------------------------


def test_an_unreachable_or_missing_bucket_is_store_unavailable(s3_server: S3Server, tmp_path: Path) -> None:
    missing = BucketStore("no-such-bucket", "", tmp_path / "cache", endpoint_url=s3_server.endpoint_url)
    with pytest.raises(StoreUnavailable, match="NoSuchBucket"):
        missing.write_bytes("datasets/d.jsonl", b"rows")
    with pytest.raises(StoreUnavailable):
        list(missing.iter_objects())
    unreachable = BucketStore("bucket", "", tmp_path / "cache", endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StoreUnavailable, match="unreachable"):
        unreachable.exists("datasets/d.jsonl")
    assert local_files(missing) == []


class BreaksHalfWay(io.BytesIO):
    """A source that fails after its first part has been sent, like a disk going away."""

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() >= 6 * 2**20:
            raise OSError("the source went away")
        return super().read(size)


def test_an_s3_upload_that_fails_half_way_is_aborted_and_leaves_nothing(s3_server: S3Server, tmp_path: Path) -> None:
    store = open_store(settings_for("s3", tmp_path, s3_server))
    assert isinstance(store, BucketStore)
    calls: list[str] = []
    store.client.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    with pytest.raises(OSError, match="went away"):
        store._upload(BreaksHalfWay(os.urandom(12 * 2**20)), "extractions/e/states.bin")
    assert (
        "CreateMultipartUpload" in calls and "AbortMultipartUpload" in calls and "CompleteMultipartUpload" not in calls
    )
    assert not store.exists("extractions/e/states.bin")
    assert unfinished_uploads(store) == []
