"""The artifact store as a folder: on the local disk (the embedded default), or on a
filesystem that several machines mount (NFS, CephFS, a cloud file share).

A write goes to a temporary name beside its final one (`.<name>.<random>.partial`) and is
renamed into place: a rename within a folder is atomic, so a reader never sees half an
artifact. On a shared filesystem (`durable`) the file is synced before the rename and its
folder after it, so another machine that is told about the artifact finds it whole.
"""

import errno
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from app.storage.base import (
    CHUNK_BYTES,
    PARTIAL_SUFFIX,
    SCRATCH_FOLDER,
    ArtifactMissing,
    ArtifactStore,
    LocalLeftover,
    StoredObject,
    checked_key,
    checked_prefix,
    is_partial,
)


def refuse_links(folder: Path) -> list[Path]:
    """The regular files under `folder`; ValueError for a symbolic link or anything else."""
    files = []
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise ValueError(f"{path.relative_to(folder)} in {folder} is not a regular file or folder")
        if path.is_file():
            files.append(path)
    return files


def partial_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


def partials_of(folder: Path, name: str) -> list[Path]:
    """The temporary names in `folder` of writes of `name`: `.<name>.<8 random>.partial`, as
    `partial_name` and `tempfile.mkstemp` make them."""
    pattern = re.compile(rf"\.{re.escape(name)}\.[A-Za-z0-9_]{{8}}{re.escape(PARTIAL_SUFFIX)}")
    try:
        return sorted(path for path in folder.iterdir() if pattern.fullmatch(path.name))
    except (FileNotFoundError, NotADirectoryError):
        return []


def remove_paths(paths: list[Path]) -> int:
    """Remove files and folders that may vanish meanwhile; how many this call removed."""
    removed = 0
    for path in paths:
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed += 1
        except FileNotFoundError:
            continue
    return removed


def partial_names(top: Path) -> Iterator[Path]:
    """Temporary names (files and folders) anywhere under `top`, not looking inside them."""
    for folder, subfolders, files in os.walk(top):
        for name in [*subfolders, *files]:
            if is_partial(name):
                yield Path(folder, name)
        subfolders[:] = [name for name in subfolders if not is_partial(name)]


def measure(path: Path) -> tuple[LocalLeftover, bool] | None:
    """`path` as a leftover (its bytes, and the newest change to it or anything in it), and
    whether it is or holds a file; None if it is gone."""
    try:
        status = path.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(status.st_mode):
        return LocalLeftover(path, status.st_size, datetime.fromtimestamp(status.st_mtime, UTC)), True
    size, newest, holds_files = 0, status.st_mtime, False
    for folder, subfolders, files in os.walk(path):
        for names, are_files in ((subfolders, False), (files, True)):
            for name in names:
                try:
                    inner = Path(folder, name).lstat()
                except FileNotFoundError:  # removed while we walked
                    continue
                newest = max(newest, inner.st_mtime)
                if are_files:
                    size, holds_files = size + inner.st_size, True
    return LocalLeftover(path, size, datetime.fromtimestamp(newest, UTC)), holds_files


def idle_trees(paths: Iterable[Path], older_than: datetime, *, empty_only: bool = False) -> Iterator[LocalLeftover]:
    """The largest files and folders among `paths` and below them in which nothing changed
    since `older_than` (with `empty_only`: folders with no file anywhere inside)."""
    for path in paths:
        measured = measure(path)
        if measured is None:
            continue
        leftover, holds_files = measured
        if leftover.last_activity < older_than and not (empty_only and holds_files):
            yield leftover
        elif path.is_dir() and not path.is_symlink():
            yield from idle_trees(sorted(path.iterdir()), older_than, empty_only=empty_only)


def remove_leftover(leftover: LocalLeftover, *, files: bool) -> bool:
    """Remove what `local_leftovers` listed, unless it has changed since (a process came back
    to it, or made a new one of the same name) or is gone; without `files`, only empty folders
    go, so a file written meanwhile is never lost. Whether it was removed."""
    measured = measure(leftover.path)
    if measured is None or measured[0].last_activity > leftover.last_activity:
        return False
    path = leftover.path
    if path.is_dir() and not path.is_symlink():
        if files:
            shutil.rmtree(path, ignore_errors=True)
        else:
            for folder, _, _ in os.walk(path, topdown=False):
                try:
                    os.rmdir(folder)
                except OSError:  # not empty after all
                    pass
        return not path.exists()
    if not files:
        return False
    path.unlink(missing_ok=True)
    return True


def sync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sync_directory(path: Path) -> None:
    """Make a rename or removal in `path` durable: the entry lives in the folder, not the file."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class FolderStore(ArtifactStore):
    """Artifacts as files under `root`; `durable` for a filesystem other machines read."""

    def __init__(self, root: Path, *, durable: bool = False) -> None:
        self.root = root
        self.durable = durable
        self.location = str(root)

    def path(self, key: str) -> Path:
        """The file behind `key`; keys are relative and never leave the store."""
        return self.root.joinpath(*PurePosixPath(checked_key(key)).parts)

    # --- reading -----------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            raise ArtifactMissing(key, self.location) from None

    def iter_bytes(
        self, key: str, start: int = 0, end: int | None = None, chunk_bytes: int = CHUNK_BYTES
    ) -> Iterator[bytes]:
        try:
            handle = self.path(key).open("rb")
        except FileNotFoundError:
            raise ArtifactMissing(key, self.location) from None
        handle.seek(start)
        return _chunks(handle, None if end is None else end - start, chunk_bytes)

    def direct_path(self, key: str) -> Path | None:
        return self.path(key)

    def local_path(self, key: str) -> Path:
        path = self.path(key)
        if not path.is_file():
            raise ArtifactMissing(key, self.location)
        return path

    def local_folder(self, prefix: str) -> Path:
        path = self.path(prefix)
        if not path.is_dir():
            raise ArtifactMissing(prefix, self.location, folder=True)
        return path

    def iter_objects(self, prefix: str = "") -> Iterator[StoredObject]:
        prefix = checked_prefix(prefix)
        top = self.path(prefix) if prefix else self.root
        for folder, subfolders, files in os.walk(top):
            subfolders.sort()
            for name in sorted(files):
                path = Path(folder, name)
                try:
                    status = path.stat()
                except FileNotFoundError:  # removed while we walked
                    continue
                key = path.relative_to(self.root).as_posix()
                yield StoredObject(key, status.st_size, datetime.fromtimestamp(status.st_mtime, UTC), is_partial(key))

    # --- writing -----------------------------------------------------------------------

    @contextmanager
    def writer(self, key: str) -> Iterator[BinaryIO]:
        with self.temporary_path(key) as temporary, temporary.open("wb") as handle:
            yield handle

    def remove_partials(self, key: str) -> int:
        target = self.path(key)
        return remove_paths(partials_of(target.parent, target.name))

    @contextmanager
    def temporary_path(self, key: str) -> Iterator[Path]:
        target = self.path(key)
        try:
            descriptor, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX)
        except FileNotFoundError:  # a new folder, or an empty one the janitor has just removed
            target.parent.mkdir(parents=True, exist_ok=True)
            descriptor, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX)
        os.close(descriptor)
        temporary = Path(name)
        try:
            yield temporary
            sync_file(temporary)
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        if self.durable:
            sync_directory(target.parent)

    def publish_folder(self, prefix: str, folder: Path) -> bool:
        refuse_links(folder)
        target = self.path(prefix)
        if target.exists():
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = partial_name(target)
        try:
            try:
                os.rename(folder, temporary)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                shutil.copytree(folder, temporary)  # the scratch folder is on another filesystem
            if self.durable:
                for file in refuse_links(temporary):
                    sync_file(file)
            try:
                os.rename(temporary, target)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                shutil.rmtree(temporary, ignore_errors=True)  # published meanwhile by another writer
                return False
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        if self.durable:
            sync_directory(target.parent)
        return True

    @property
    def scratch_root(self) -> Path:
        return self.root / SCRATCH_FOLDER

    # --- leftovers of interrupted work ------------------------------------------------

    def local_leftovers(self, older_than: datetime) -> list[LocalLeftover]:
        """Scratch folders and temporary names live in the store, so every file a killed
        process left is a stored object (`iter_objects` lists it, and the janitor removes it);
        what stays behind is their folders, empty: those under `staging/` and temporary
        names, with no file anywhere inside."""
        scratch = self.scratch_root
        candidates = sorted(scratch.iterdir()) if scratch.is_dir() else []
        candidates += [path for path in partial_names(self.root) if path.is_dir() and not path.is_relative_to(scratch)]
        return list(idle_trees(candidates, older_than, empty_only=True))

    def remove_local_leftover(self, leftover: LocalLeftover) -> bool:
        return remove_leftover(leftover, files=False)

    # --- removing ----------------------------------------------------------------------

    def delete(self, key: str) -> None:
        path = self.path(key)
        path.unlink(missing_ok=True)
        if self.durable and path.parent.is_dir():
            sync_directory(path.parent)

    def delete_prefix(self, prefix: str) -> None:
        """The folder is renamed to a temporary name first, so it leaves at once, and an
        interrupted removal leaves a leftover a janitor recognises."""
        target = self.path(prefix)
        if not target.is_dir():
            return
        doomed = partial_name(target)
        try:
            os.rename(target, doomed)
        except FileNotFoundError:  # removed meanwhile
            return
        if self.durable:
            sync_directory(target.parent)
        shutil.rmtree(doomed, ignore_errors=True)


def _chunks(handle: BinaryIO, remaining: int | None, chunk_bytes: int) -> Iterator[bytes]:
    with handle:
        while remaining is None or remaining > 0:
            chunk = handle.read(chunk_bytes if remaining is None else min(chunk_bytes, remaining))
            if not chunk:
                return
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk
