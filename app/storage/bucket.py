"""The artifact store as an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, …), for workers
on several machines that share no filesystem.

An S3 object appears whole or not at all: a single PUT, or a multipart upload once it is
completed (a failed one is aborted, and its parts never show). So every write goes to a
local temporary file first and is uploaded when it is complete. Workers read artifacts
through a local cache (`objects/` for files, `folders/` for folder artifacts), filled by
downloading to a temporary name and renaming it into place; artifacts never change, so a
cached copy stays good.

boto3 is imported when the first request is made, so a gateway on the local store never
pays for it. Credentials and region come from the standard AWS settings (environment
variables, `~/.aws`, instance roles).
"""

import hashlib
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from app.storage.base import (
    CHUNK_BYTES,
    PARTIAL_SUFFIX,
    SCRATCH_FOLDER,
    ArtifactMissing,
    ArtifactStore,
    LocalLeftover,
    PendingUpload,
    StoredObject,
    StoreUnavailable,
    checked_key,
    checked_prefix,
    is_partial,
)
from app.storage.folder import (
    idle_trees,
    partial_name,
    partial_names,
    partials_of,
    refuse_links,
    remove_leftover,
    remove_paths,
    sync_file,
)

DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes
MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
NO_SUCH_UPLOAD = "NoSuchUpload"  # completed or aborted meanwhile
UPLOADS_FOLDER = "uploads"  # local files being written, uploaded when they are complete


class BucketStore(ArtifactStore):
    """Artifacts as objects `<prefix><key>` in `bucket`; local copies under `local_dir`, at most
    `cache_max_bytes` of them once the janitor has trimmed them (None: no limit)."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        local_dir: Path,
        *,
        endpoint_url: str | None = None,
        multipart_threshold: int = 8 * 2**20,
        cache_max_bytes: int | None = None,
    ) -> None:
        self.cache_max_bytes = cache_max_bytes
        self.bucket = bucket
        self.prefix = f"{checked_key(prefix)}/" if prefix else ""
        self.local_dir = local_dir
        self.endpoint_url = endpoint_url
        self.multipart_threshold = multipart_threshold
        self.location = f"s3://{bucket}/{self.prefix}"
        self._client: Any = None
        self._client_lock = threading.Lock()

    # --- the connection ------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The boto3 client, made on first use (clients are thread-safe; making one is not)."""
        with self._client_lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                options: dict[str, Any] = {
                    "retries": {"mode": "standard", "max_attempts": 3},
                    "connect_timeout": 5,
                    "read_timeout": 60,
                }
                if self.endpoint_url:
                    # S3-compatible servers are addressed by path (no bucket DNS names), and
                    # many do not accept the checksum trailers boto3 sends to AWS by default.
                    options |= {
                        "s3": {"addressing_style": "path"},
                        "request_checksum_calculation": "when_required",
                        "response_checksum_validation": "when_required",
                    }
                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=self.endpoint_url, config=Config(**options)
                )
            return self._client

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.multipart_threshold)

    @contextmanager
    def _translated(self, key: str) -> Iterator[None]:
        """botocore's errors as the store's: a missing object is FileNotFoundError, as on a
        folder; anything else the service or the network says is StoreUnavailable."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            code = error_code(exc)
            if code in MISSING_CODES:
                raise ArtifactMissing(key, self.location) from exc
            raise StoreUnavailable(
                f"the artifact store {self.location} refused a request for {key}: {code or exc}"
            ) from exc
        except (BotoCoreError, Boto3Error) as exc:  # Boto3Error: an upload or download that failed
            raise StoreUnavailable(f"the artifact store {self.location} is unreachable: {exc}") from exc

    def _name(self, key: str) -> str:
        return self.prefix + checked_key(key)

    def _folder_name(self, prefix: str) -> str:
        prefix = checked_prefix(prefix)
        return self.prefix + (f"{prefix}/" if prefix else "")

    # --- reading -----------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except FileNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        with self._translated(key):
            return int(self.client.head_object(Bucket=self.bucket, Key=self._name(key))["ContentLength"])

    def iter_bytes(
        self, key: str, start: int = 0, end: int | None = None, chunk_bytes: int = CHUNK_BYTES
    ) -> Iterator[bytes]:
        if end is not None and end <= start:
            return iter(())
        request = {"Bucket": self.bucket, "Key": self._name(key)}
        if start or end is not None:
            request["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        with self._translated(key):
            body = self.client.get_object(**request)["Body"]
        return self._chunks(key, body, chunk_bytes)

    def _chunks(self, key: str, body: Any, chunk_bytes: int) -> Iterator[bytes]:
        try:
            with self._translated(key):
                yield from body.iter_chunks(chunk_bytes)
        finally:
            body.close()

    def direct_path(self, key: str) -> Path | None:
        return None

    def _cached(self, area: str, key: str) -> Path:
        return self.local_dir.joinpath(area, self.bucket, *PurePosixPath(self.prefix + key).parts)

    def local_path(self, key: str) -> Path:
        cached = self._cached("objects", checked_key(key))
        if _used(cached):
            return cached
        if not cached.is_file():
            cached.parent.mkdir(parents=True, exist_ok=True)
            temporary = partial_name(cached)
            try:
                self._download(key, temporary)
                os.replace(temporary, cached)
            finally:
                temporary.unlink(missing_ok=True)
        return cached

    def local_folder(self, prefix: str) -> Path:
        cached = self._cached("folders", checked_key(prefix))
        if _used(cached):
            return cached
        keys = [stored.key for stored in self.iter_objects(prefix)]
        if not keys:
            raise ArtifactMissing(prefix, self.location, folder=True)
        cached.parent.mkdir(parents=True, exist_ok=True)
        temporary = partial_name(cached)
        try:
            for key in keys:
                destination = temporary.joinpath(*PurePosixPath(key).relative_to(checked_key(prefix)).parts)
                destination.parent.mkdir(parents=True, exist_ok=True)
                self._download(key, destination)
            try:
                temporary.rename(cached)
            except OSError:
                if not cached.is_dir():
                    raise  # not another download finishing first
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
        return cached

    def _download(self, key: str, destination: Path) -> None:
        with self._translated(key), destination.open("wb") as handle:
            self.client.download_fileobj(self.bucket, self._name(key), handle, Config=self._transfer_config())
        sync_file(destination)

    def iter_objects(self, prefix: str = "") -> Iterator[StoredObject]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._folder_name(prefix)
        )
        with self._translated(prefix):
            for page in pages:
                for item in page.get("Contents", []):
                    yield StoredObject(
                        item["Key"][len(self.prefix) :], int(item["Size"]), item["LastModified"], partial=False
                    )

    # --- writing -----------------------------------------------------------------------

    @contextmanager
    def _upload_file(self, key: str) -> Iterator[Path]:
        """A local temporary file, removed whatever happens; named for `key`, so that what a
        killed writer left can be found (`remove_partials`)."""
        folder = self.local_dir / UPLOADS_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(dir=folder, prefix=f".{_upload_name(key)}.", suffix=PARTIAL_SUFFIX)
        os.close(descriptor)
        try:
            yield Path(name)
        finally:
            Path(name).unlink(missing_ok=True)

    def _upload(self, source: Path | BinaryIO, key: str) -> None:
        """One PUT, or a multipart upload that boto3 completes or aborts: never half an object."""
        with self._translated(key):
            if isinstance(source, Path):
                self.client.upload_file(str(source), self.bucket, self._name(key), Config=self._transfer_config())
            else:
                self.client.upload_fileobj(source, self.bucket, self._name(key), Config=self._transfer_config())

    @contextmanager
    def writer(self, key: str) -> Iterator[BinaryIO]:
        checked_key(key)
        with self._upload_file(key) as temporary:
            with temporary.open("wb") as handle:
                yield handle
            self._upload(temporary, key)

    @contextmanager
    def temporary_path(self, key: str) -> Iterator[Path]:
        checked_key(key)
        with self._upload_file(key) as temporary:
            yield temporary
            self._upload(temporary, key)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._upload(io.BytesIO(data), key)

    def publish_folder(self, prefix: str, folder: Path) -> bool:
        """Uploads every file even when `prefix` already holds some, so an upload that died
        half-way is completed rather than kept; an upload that fails now takes away what it
        added."""
        files = refuse_links(folder)
        prefix = checked_key(prefix)
        existed = next(self.iter_objects(prefix), None) is not None
        try:
            for file in files:
                self._upload(file, f"{prefix}/{file.relative_to(folder).as_posix()}")
        except BaseException:
            if not existed:
                self.delete_prefix(prefix)
            raise
        return not existed

    @property
    def scratch_root(self) -> Path:
        return self.local_dir / SCRATCH_FOLDER

    # --- leftovers of interrupted work ------------------------------------------------

    def list_multipart_uploads(self, prefix: str) -> list[PendingUpload]:
        """An upload's age is that of its newest part, not of its start: a large upload that
        began long ago may still be sending parts."""
        pending = []
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=self._folder_name(prefix)
        )
        with self._translated(prefix):
            for page in pages:
                for upload in page.get("Uploads", []):
                    parts = self._parts(upload["Key"], upload["UploadId"])
                    if parts is None:
                        continue
                    pending.append(
                        PendingUpload(
                            key=upload["Key"][len(self.prefix) :],
                            upload_id=upload["UploadId"],
                            size=sum(int(part["Size"]) for part in parts),
                            last_activity=max([upload["Initiated"], *(part["LastModified"] for part in parts)]),
                        )
                    )
        return pending

    def _parts(self, name: str, upload_id: str) -> list[dict[str, Any]] | None:
        """The parts an upload has received; None when it was completed or aborted meanwhile."""
        from botocore.exceptions import ClientError

        pages = self.client.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=name, UploadId=upload_id)
        try:
            return [part for page in pages for part in page.get("Parts", [])]
        except ClientError as exc:
            if error_code(exc) == NO_SUCH_UPLOAD:
                return None
            raise

    def remove_partials(self, key: str) -> int:
        key = checked_key(key)
        removed = remove_paths(partials_of(self.local_dir / UPLOADS_FOLDER, _upload_name(key)))
        for upload in self.list_multipart_uploads(PurePosixPath(key).parent.as_posix() if "/" in key else ""):
            if upload.key == key:
                self.abort_multipart_upload(key, upload.upload_id)
                removed += 1
        return removed

    def abort_multipart_upload(self, key: str, upload_id: str) -> None:
        from botocore.exceptions import ClientError

        with self._translated(key):
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._name(key), UploadId=upload_id)
            except ClientError as exc:
                if error_code(exc) != NO_SUCH_UPLOAD:
                    raise

    def local_leftovers(self, older_than: datetime) -> list[LocalLeftover]:
        """Files being prepared for upload (`uploads/`), downloads being received (temporary
        names among the cached copies) and scratch folders (`staging/`). The cached copies
        themselves are not leftovers: they are kept for reuse."""
        candidates = sorted((self.local_dir / UPLOADS_FOLDER).glob(f"*{PARTIAL_SUFFIX}"))
        for area in ("objects", "folders"):
            candidates += partial_names(self.local_dir / area)
        scratch = self.scratch_root
        candidates += sorted(scratch.iterdir()) if scratch.is_dir() else []
        return list(idle_trees(candidates, older_than))

    def remove_local_leftover(self, leftover: LocalLeftover) -> bool:
        return remove_leftover(leftover, files=True)

    def cached_copies(self) -> list[LocalLeftover]:
        """This machine's copies of objects and folder artifacts, each with its size and its
        last use (`local_path` and `local_folder` touch a copy each time they hand it out)."""
        copies = []
        for area in ("objects", "folders"):
            for folder, subfolders, files in os.walk(self.local_dir / area / self.bucket):
                subfolders[:] = sorted(name for name in subfolders if not is_partial(name))
                names = [name for name in files if not is_partial(name)]
                if area == "objects":
                    copies += [found for name in names if (found := _measured(Path(folder, name))) is not None]
                elif names:  # a folder artifact: the first folder down that holds files
                    subfolders[:] = []
                    if (found := _measured(Path(folder))) is not None:
                        copies.append(found)
        return copies

    def trim_local_cache(self, untouched_since: datetime, dry_run: bool = False) -> list[LocalLeftover]:
        if self.cache_max_bytes is None:
            return []
        copies = sorted(self.cached_copies(), key=lambda copy: copy.last_activity)
        total = sum(copy.size for copy in copies)
        evicted = []
        for copy in copies:
            if total <= self.cache_max_bytes or copy.last_activity >= untouched_since:
                break
            if dry_run or _evict(copy):
                evicted.append(copy)
                total -= copy.size
        return evicted

    # --- removing ----------------------------------------------------------------------

    def delete(self, key: str) -> None:
        with self._translated(key):
            self.client.delete_object(Bucket=self.bucket, Key=self._name(key))
        self._cached("objects", checked_key(key)).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        prefix = checked_key(prefix)
        names = [self.prefix + stored.key for stored in self.iter_objects(prefix)]
        for start in range(0, len(names), DELETE_BATCH):
            batch = [{"Key": name} for name in names[start : start + DELETE_BATCH]]
            with self._translated(prefix):
                answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise StoreUnavailable(
                    f"the artifact store {self.location} did not delete {first.get('Key')}: {first.get('Code')}"
                )
        shutil.rmtree(self._cached("folders", prefix), ignore_errors=True)
        shutil.rmtree(self._cached("objects", prefix), ignore_errors=True)


def _upload_name(key: str) -> str:
    """What a local upload file of `key` is named after: a digest, as keys hold slashes."""
    return "upload-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def error_code(exc: Any) -> str:
    """The service's error code in a botocore ClientError (`NoSuchKey`, `404`, …)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def _used(cached: Path) -> bool:
    """Mark a local copy as just used (its time is what the cache trimming goes by); whether
    it is there."""
    try:
        os.utime(cached)
    except FileNotFoundError:
        return False
    return True


def _measured(path: Path) -> LocalLeftover | None:
    """A cached copy's bytes and last use: a file's own time, or a folder's (touched on use)."""
    try:
        status = path.stat()
        size = (
            status.st_size
            if path.is_file()
            else sum(inner.stat().st_size for inner in path.rglob("*") if inner.is_file())
        )
    except FileNotFoundError:
        return None
    return LocalLeftover(path, size, datetime.fromtimestamp(status.st_mtime, UTC))


def _evict(copy: LocalLeftover) -> bool:
    """Remove a cached copy so that no reader finds half of it (a folder is renamed to a
    temporary name first, then removed) — unless it was handed out since it was listed."""
    path = copy.path
    try:
        if datetime.fromtimestamp(path.stat().st_mtime, UTC) > copy.last_activity:
            return False
    except FileNotFoundError:
        return False
    if path.is_dir():
        doomed = partial_name(path)
        try:
            path.rename(doomed)
        except FileNotFoundError:
            return False
        shutil.rmtree(doomed, ignore_errors=True)
        return True
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
