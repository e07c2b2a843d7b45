"""Reading files whose path a user named (a model folder's `config.json`, an archive or a
weights file under `ADAPTER_ROOTS`, a Hugging Face cache's `refs/` file).

Such a path may name anything the filesystem holds: a FIFO, whose plain `open()` blocks
until a writer appears (forever, and no cancel or timeout reaches a thread blocked there);
a character device such as `/dev/zero` or `/dev/urandom`, which never ends; a directory. So
every such file is opened without blocking (`O_NONBLOCK`: a FIFO opens at once) and checked
to be a regular file on the open descriptor itself, so it cannot be swapped between the
check and the read; and a whole-file read is bounded.

Standard library only: the gateway imports this module.
"""

import os
import stat
from pathlib import Path
from typing import BinaryIO

# Plain-text metadata a user's folder holds (config.json, adapter_config.json, refs/main):
# real ones are a few KiB.
METADATA_MAX_BYTES = 1 << 20


class NotARegularFile(Exception):
    """The path names something other than a regular file (a FIFO, socket, device or
    directory). The message names the kind and the file's name, never where it lives."""

    def __init__(self, path: Path, kind: str) -> None:
        super().__init__(f"{path.name!r} is a {kind}, not a regular file")
        self.path = path
        self.kind = kind


class FileTooLarge(Exception):
    """A whole-file read would pass its bound."""

    def __init__(self, path: Path, limit: int) -> None:
        super().__init__(f"{path.name!r} is larger than {limit} bytes")
        self.path = path
        self.limit = limit


def file_kind(mode: int) -> str:
    """A file type in words, for messages."""
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISLNK(mode):
        return "symbolic link"
    return "regular file" if stat.S_ISREG(mode) else "special file"


def open_regular_file(path: Path) -> BinaryIO:
    """`path` opened for binary reading, only if it is a regular file (links followed).
    Raises `NotARegularFile`, or the `OSError` of a missing or unreadable path; never blocks."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFile(Path(path), file_kind(mode))
        # back to ordinary blocking reads: harmless for a regular file, and what callers expect
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def read_regular_file(path: Path, max_bytes: int = METADATA_MAX_BYTES) -> bytes:
    """The whole of a regular file no larger than `max_bytes`; `NotARegularFile` or
    `FileTooLarge` otherwise. Reads at most one byte past the bound, whatever the size the
    file claims."""
    with open_regular_file(path) as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileTooLarge(Path(path), max_bytes)
    return data


def regular_file_or_none(path: Path) -> os.stat_result | None:
    """The stat of `path` (links followed) when it is a regular file, None when nothing is
    there; `NotARegularFile` when something else is. Never opens the path."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(status.st_mode):
        raise NotARegularFile(path, file_kind(status.st_mode))
    return status
