"""What every artifact store promises, whatever holds the bytes.

Artifacts are named by relative POSIX keys (`datasets/<sha>.jsonl`, `probes/<id>/report.json`);
a folder artifact (a PEFT adapter, a probe) is the keys under a prefix. Every write is
atomic: a reader sees the whole artifact or nothing, and a write that fails or is
interrupted leaves nothing under its key. Artifacts are never changed once written (their
keys carry a content hash or a fresh id), which is what lets a worker keep a local copy.
"""

import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import BinaryIO

# Marks temporary names (`.<name>.<random>.partial`), so a janitor can find what an
# interrupted process left behind.
PARTIAL_SUFFIX = ".partial"
SCRATCH_FOLDER = "staging"  # jobs' scratch folders, beside the store's own folders
CHUNK_BYTES = 1 << 20


class StoreUnavailable(RuntimeError):
    """The store cannot be reached or refuses us (network, credentials, missing bucket):
    not the request's fault, and worth retrying."""


class ArtifactMissing(FileNotFoundError):
    """`key` is not in the store: never written, or removed from under the row that names it."""

    def __init__(self, key: str, location: str, *, folder: bool = False) -> None:
        self.key = checked_key(key)
        super().__init__(f"artifact {'folder ' if folder else ''}{self.key} is not in {location}")


def checked_key(key: str) -> str:
    """`key` in its one canonical form (`a//b/./c` is `a/b/c`, so every backend names the same
    object). Raises ValueError for a key that is empty, absolute, or climbs out with `..`."""
    relative = PurePosixPath(key)
    if not key or "\x00" in key or relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ValueError(f"artifact key {key!r} escapes the store")
    return relative.as_posix()


def checked_prefix(prefix: str) -> str:
    """A folder prefix; `""` is the whole store, which only listing accepts."""
    return "" if prefix == "" else checked_key(prefix)


def is_partial(key: str) -> bool:
    """Whether `key` is (inside) a temporary name that an interrupted write left behind."""
    return any(part.startswith(".") and part.endswith(PARTIAL_SUFFIX) for part in PurePosixPath(key).parts)


@dataclass(frozen=True)
class StoredObject:
    """One stored file, as `iter_objects` lists it."""

    key: str
    size: int
    modified: datetime  # timezone-aware
    partial: bool  # a leftover temporary name, not an artifact


@dataclass(frozen=True)
class PendingUpload:
    """A multipart upload that was started and neither completed nor aborted, as
    `list_multipart_uploads` lists it. Readers and listings never see it, but its parts take
    space (and are billed) until it is aborted; a worker killed mid-upload leaves one."""

    key: str
    upload_id: str
    size: int  # bytes in the parts sent so far
    last_activity: datetime  # its start or its newest part, whichever is later; timezone-aware


@dataclass(frozen=True)
class LocalLeftover:
    """A temporary file or folder on this machine, outside the artifact keys, as
    `local_leftovers` lists it: an upload being prepared, a download being received, a
    job's scratch folder. Once its process is gone, nothing will ever use it."""

    path: Path
    size: int  # bytes in it (every file, for a folder)
    last_activity: datetime  # the newest change to it or anything inside it; timezone-aware


class ArtifactStore(ABC):
    """A place for artifacts: a local folder, a shared folder, or an S3-compatible bucket."""

    location: str  # where the artifacts are, for messages: a folder or an s3:// URL

    # --- reading -----------------------------------------------------------------------

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int:
        """Bytes in `key`; FileNotFoundError if it is not there."""

    @abstractmethod
    def iter_bytes(
        self, key: str, start: int = 0, end: int | None = None, chunk_bytes: int = CHUNK_BYTES
    ) -> Iterator[bytes]:
        """Bytes `start` to `end` (exclusive; None: to the end) in chunks of at most
        `chunk_bytes`, read as they are sent, never held whole. The object is opened
        before this returns, so a missing key (FileNotFoundError) or an unreachable store
        (StoreUnavailable) is raised here, not half-way through a response."""

    def read_bytes(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        """The whole object, or bytes `start` to `end` of it."""
        return b"".join(self.iter_bytes(key, start, end))

    @abstractmethod
    def direct_path(self, key: str) -> Path | None:
        """The file itself when the store is a folder this machine sees (so it can be served
        as a file); None when reading it means downloading."""

    @abstractmethod
    def local_path(self, key: str) -> Path:
        """A local file with the object's bytes, for libraries that read paths: the stored
        file itself, or a copy downloaded once into this machine's cache and reused."""

    @abstractmethod
    def local_folder(self, prefix: str) -> Path:
        """A local folder with every object under `prefix` (a PEFT adapter, a probe), the
        same way as `local_path`."""

    @abstractmethod
    def iter_objects(self, prefix: str = "") -> Iterator[StoredObject]:
        """Every stored object under the folder `prefix` (`""`: all of them), with its size
        and modification time, in no particular order; leftovers of interrupted writes
        are listed too, marked `partial`."""

    # --- writing -----------------------------------------------------------------------

    @abstractmethod
    def writer(self, key: str) -> AbstractContextManager[BinaryIO]:
        """A file object to write `key` through; the object appears only when the block
        ends cleanly, and nothing appears if it raises."""

    @abstractmethod
    def temporary_path(self, key: str) -> AbstractContextManager[Path]:
        """A local path for libraries that write files themselves (safetensors); stored as
        `key` when the block ends cleanly, removed otherwise."""

    def write_bytes(self, key: str, data: bytes) -> None:
        with self.writer(key) as handle:
            handle.write(data)

    @abstractmethod
    def publish_folder(self, prefix: str, folder: Path) -> bool:
        """Store every file in the local `folder` under `prefix`, and say whether this call
        created the artifact (False: `prefix` already held it — artifacts are immutable, so
        it is the same one). `folder` may be moved away; the caller must not use it after.
        Symbolic links are refused (ValueError) before anything is written. Register the
        artifact only after this returns: a reader must never find a row before its files."""

    @property
    @abstractmethod
    def scratch_root(self) -> Path:
        """The local folder that holds `scratch` folders: on the same filesystem as the store
        when there is one, so publishing is a rename."""

    @contextmanager
    def scratch(self, name: str) -> Iterator[Path]:
        """A fresh local folder for a job's work in progress, removed when the block ends."""
        folder = self._scratch_folder(name)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def discard_scratch(self, name: str) -> None:
        """Remove the scratch folder `name` that a killed process left on this machine."""
        shutil.rmtree(self._scratch_folder(name), ignore_errors=True)

    def _scratch_folder(self, name: str) -> Path:
        return self.scratch_root.joinpath(*PurePosixPath(checked_key(name)).parts)

    @abstractmethod
    def remove_partials(self, key: str) -> int:
        """Remove what interrupted writes of `key` left: temporary files (in the store, or on
        this machine before an upload) and unfinished multipart uploads; return how many.
        Only for a caller that knows no live writer uses them — a job's next attempt, once
        the earlier ones are fenced off — so that a retry on a nearly full disk does not
        wait for the janitor's grace period to get its space back."""

    # --- leftovers of interrupted work ------------------------------------------------

    def list_multipart_uploads(self, prefix: str) -> list[PendingUpload]:
        """Uploads under the folder `prefix` that were started and never completed or
        aborted, whatever their age. Only a bucket has them: a folder store writes a
        temporary file instead, which `iter_objects` lists."""
        return []

    def abort_multipart_upload(self, key: str, upload_id: str) -> None:  # noqa: B027 (optional: only a bucket has uploads to abort)
        """Throw away the parts of an upload `list_multipart_uploads` listed; one already
        completed or aborted is no error."""

    @abstractmethod
    def local_leftovers(self, older_than: datetime) -> list[LocalLeftover]:
        """This machine's temporaries that lie outside the artifact keys (so `iter_objects`
        never lists them) and have not changed since `older_than`: what a killed process
        left behind."""

    @abstractmethod
    def remove_local_leftover(self, leftover: LocalLeftover) -> bool:
        """Remove what `local_leftovers` listed, unless a process has come back to it since;
        whether it was removed."""

    def trim_local_cache(self, untouched_since: datetime, dry_run: bool = False) -> list[LocalLeftover]:
        """Evict this machine's least recently used copies of artifacts until they fit in the
        store's cache limit, never one used since `untouched_since`; what was (or, with
        `dry_run`, would be) evicted. Evicted copies are downloaded again when next needed.
        Only a bucket keeps copies: a folder store is read in place."""
        return []

    # --- removing ----------------------------------------------------------------------

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key` (and this machine's cached copy of it); a missing key is no error."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under the folder `prefix` (not the whole store: `""` is
        refused), and this machine's cached copies."""
