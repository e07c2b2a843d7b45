"""Safe extraction of untrusted adapter archives (`.tar`, `.tar.gz`, `.zip`).

Users upload these, so the archive is read as hostile: every member's name and kind is
checked before a byte of it is written, and its size is counted on the decompressed stream
as it is read, never taken from a header. Only regular files are written, with default
permissions (modes, owners and times in the archive are ignored); directories exist only as
the parents of files. Any rejection or error removes the destination folder whole, so a
failed upload leaves nothing behind.

Standard library only: the gateway imports this module.
"""

import gzip
import lzma
import re
import shutil
import stat
import struct
import tarfile
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Generator
from contextlib import closing, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO, Literal

from app.inputs.pickled_weights import PICKLE_SUFFIXES, holds_pickle
from app.inputs.user_files import NotARegularFile, open_regular_file

ArchiveFormat = Literal["tar", "tar.gz", "zip"]
MemberKind = Literal["file", "directory", "link", "special_file"]
RejectionCode = Literal[
    "path_traversal",
    "link",
    "special_file",
    "too_many_files",
    "too_large",
    "duplicate_name",
    "pickle_weights",
    "unsupported_format",
    "corrupt_archive",
    "name_too_long",
]

CHUNK_BYTES = 1 << 20
# tarfile reads a pax or GNU long-name header whole into memory before it yields the member,
# so the bytes it may read between two members are capped; real headers take a few KiB.
TAR_METADATA_BYTES = 1 << 20
FORMAT_HEAD_BYTES = 262  # a tar's `ustar` magic ends at byte 262
ZIP_ENCRYPTED_FLAG = 0x1
# zipfile reads the whole central directory into memory, one object per entry, before it
# lists anything; its size is bounded by the entries allowed. A real entry takes 46 fixed
# bytes, its name and a few extra fields: well under this.
ZIP_DIRECTORY_BYTES_PER_ENTRY = 4096
# A name longer than the filesystems' limits fails when written (ENAMETOOLONG): it is
# refused, as a name, before.
MAX_NAME_COMPONENT_BYTES = 255
MAX_NAME_BYTES = 1024
WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")
# Backslashes count as separators too: an archive made on Windows may use them, and a name
# that climbs out with `..\` must be caught whichever way it is spelled.
SEPARATORS = re.compile(r"[\\/]")
# What a malformed archive raises from the standard library's readers.
CORRUPTION_ERRORS = (
    tarfile.TarError,
    zipfile.BadZipFile,
    gzip.BadGzipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    struct.error,
    ValueError,
    RecursionError,  # tarfile follows a chain of pax headers recursively
)


@dataclass(frozen=True)
class ArchiveLimits:
    max_files: int
    max_total_bytes: int
    """Bytes after decompression, all files together."""


class ArchiveRejected(Exception):
    """An archive the service will not extract: a stable `code`, a message naming the
    offending `member` (None when no single member is to blame), and the HTTP `status`:
    413 for the size and count limits, 422 otherwise."""

    def __init__(self, code: RejectionCode, message: str, member: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.member = member
        self.status = 413 if code in ("too_many_files", "too_large") else 422


@dataclass(frozen=True)
class _Member:
    name: str
    kind: MemberKind
    open: Callable[[], IO[bytes]]


def archive_format(path: Path) -> ArchiveFormat:
    """The archive's format by its magic bytes; the file name is the user's and may lie."""
    with _open_archive(path) as handle:
        return archive_format_of(handle.read(FORMAT_HEAD_BYTES))


def _open_archive(path: Path) -> BinaryIO:
    """The archive opened without blocking, refused unless it is a regular file: a FIFO or a
    device under a user-named path would otherwise hang or never end the read."""
    try:
        return open_regular_file(path)
    except NotARegularFile as error:
        raise ArchiveRejected("special_file", f"the archive is a {error.kind}, not a regular file") from error


def archive_format_of(head: bytes) -> ArchiveFormat:
    """`archive_format` from the first `FORMAT_HEAD_BYTES` of the file."""
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip with members, an empty zip
        return "zip"
    if head[257:262] == b"ustar":
        return "tar"
    raise ArchiveRejected(
        "unsupported_format", "the upload is not a .tar, .tar.gz or .zip archive (judged by its content)"
    )


def extract_archive(archive: Path, destination: Path, limits: ArchiveLimits) -> list[Path]:
    """Extract the regular files of `archive` into `destination`, which must not exist yet,
    and return their paths in archive order. Raises `ArchiveRejected`; on any error the
    destination is removed before the error propagates."""
    destination.mkdir()
    try:
        return _extract(archive, destination, limits)
    except BaseException:
        shutil.rmtree(destination, ignore_errors=True)
        raise


def _extract(archive: Path, destination: Path, limits: ArchiveLimits) -> list[Path]:
    extraction = _Extraction(destination, limits)
    try:
        # opened once: what is checked is what is read, even if the path changes meanwhile
        with _open_archive(archive) as handle:
            archive_type = archive_format_of(handle.read(FORMAT_HEAD_BYTES))
            handle.seek(0)
            with closing(_members(handle, archive_type, limits)) as members:
                for member in members:
                    extraction.add(member)
    except NotImplementedError as error:  # a zip compression method Python cannot read
        raise ArchiveRejected(
            "unsupported_format", f"member {extraction.current!r}: {error}", extraction.current
        ) from error
    except CORRUPTION_ERRORS as error:
        near = f" near member {extraction.current!r}" if extraction.current else ""
        raise ArchiveRejected(
            "corrupt_archive", f"the archive is corrupt or truncated{near}: {error}", extraction.current
        ) from error
    return extraction.files


def _members(archive: BinaryIO, archive_type: ArchiveFormat, limits: ArchiveLimits) -> Generator[_Member]:
    if archive_type == "zip":
        return _zip_members(archive, limits)
    return _tar_members(archive, compressed=archive_type == "tar.gz")


def _tar_members(raw: BinaryIO, compressed: bool) -> Generator[_Member]:
    """Members in stream order (`r|`): the archive is read once, front to back, and each
    member's data must be consumed before the next member is asked for."""
    with gzip.GzipFile(fileobj=raw) if compressed else nullcontext(raw) as stream:
        metered = _MeteredStream(stream, allowance=TAR_METADATA_BYTES)
        # a stream mode only reads, which is all the metered stream offers
        with tarfile.open(fileobj=metered, mode="r|") as tar:  # type: ignore[call-overload]
            for info in tar:
                # this member's data, then the headers of the next one
                metered.allow(info.size + TAR_METADATA_BYTES)
                yield _Member(info.name, _tar_member_kind(info), partial(_tar_member_data, tar, info))


def _tar_member_kind(info: tarfile.TarInfo) -> MemberKind:
    if info.issym() or info.islnk():
        return "link"
    if info.isdir():
        return "directory"
    if info.isreg():
        return "file"
    return "special_file"


def _tar_member_data(tar: tarfile.TarFile, info: tarfile.TarInfo) -> IO[bytes]:
    data = tar.extractfile(info)
    if data is None:
        raise tarfile.ReadError(f"member {info.name!r} has no data")
    return data


class _MeteredStream:
    """The decompressed tar stream as tarfile sees it, refusing to hand over more bytes than
    it has been allowed since the last member."""

    def __init__(self, stream: IO[bytes] | gzip.GzipFile, allowance: int) -> None:
        self.stream = stream
        self.allowance = allowance

    def allow(self, size: int) -> None:
        self.allowance = size

    def read(self, size: int) -> bytes:
        data = self.stream.read(size)
        self.allowance -= len(data)
        if self.allowance < 0:
            raise ArchiveRejected(
                "too_large", f"the tar headers between two members hold more than {TAR_METADATA_BYTES} bytes"
            )
        return data


def _zip_members(archive: BinaryIO, limits: ArchiveLimits) -> Generator[_Member]:
    _check_zip_directory(archive, limits)
    with zipfile.ZipFile(archive) as bundle:
        if len(bundle.infolist()) > limits.max_files:  # the record's count may lie; the directory cannot
            raise _too_many_entries(len(bundle.infolist()), limits)
        for info in bundle.infolist():
            if info.flag_bits & ZIP_ENCRYPTED_FLAG:
                raise ArchiveRejected("unsupported_format", f"member {info.filename!r} is encrypted", info.filename)
            yield _Member(info.filename, _zip_member_kind(info), partial(bundle.open, info))


def _check_zip_directory(archive: BinaryIO, limits: ArchiveLimits) -> None:
    """Refuse a zip whose end-of-central-directory record (zip64's included) announces more
    entries, files and folders together, than `limits.max_files`, or a central directory
    larger than that many entries need, before `zipfile` reads the directory into memory.
    The record is read by the same routine `zipfile.ZipFile` uses, so the numbers checked are
    the ones it would act on."""
    record = zipfile._EndRecData(archive)  # type: ignore[attr-defined]  # reads only the archive's tail
    if not record:
        raise zipfile.BadZipFile("no end-of-central-directory record")
    entries, directory_bytes = record[zipfile._ECD_ENTRIES_TOTAL], record[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
    if entries > limits.max_files:
        raise _too_many_entries(entries, limits)
    allowed = max(limits.max_files, 1) * ZIP_DIRECTORY_BYTES_PER_ENTRY
    if directory_bytes > allowed:
        raise ArchiveRejected(
            "too_large",
            f"the zip's central directory takes {directory_bytes} bytes; {limits.max_files} entries need at most {allowed}",
        )
    archive.seek(0)


def _too_many_entries(entries: int, limits: ArchiveLimits) -> ArchiveRejected:
    return ArchiveRejected(
        "too_many_files",
        f"the zip lists {entries} entries (files and folders); at most {limits.max_files} are accepted",
    )


def _zip_member_kind(info: zipfile.ZipInfo) -> MemberKind:
    """By the unix mode that zip tools keep in the high half of `external_attr` (0 when the
    archive was made elsewhere), and by the trailing slash of a directory's name."""
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "link"
    if info.is_dir() or stat.S_ISDIR(mode):
        return "directory"
    if stat.S_IFMT(mode) in (0, stat.S_IFREG):
        return "file"
    return "special_file"


class _Extraction:
    """The state of one extraction: files written so far, names taken, bytes counted."""

    def __init__(self, destination: Path, limits: ArchiveLimits) -> None:
        self.destination = destination
        self.resolved_destination = destination.resolve()
        self.limits = limits
        self.files: list[Path] = []
        self.file_keys: set[str] = set()
        self.directory_keys: set[str] = set()
        self.directory_count = 0
        self.total_bytes = 0
        self.current: str | None = None

    def add(self, member: _Member) -> None:
        self.current = member.name
        parts = _relative_parts(member.name)
        if member.kind == "link":
            raise ArchiveRejected(
                "link", f"member {member.name!r} is a symbolic or hard link; links are not accepted", member.name
            )
        if member.kind == "special_file":
            raise ArchiveRejected(
                "special_file", f"member {member.name!r} is not a regular file or a directory", member.name
            )
        if member.kind == "directory":
            self._admit_directory(member.name, parts)
            return
        target = self._admit_file(member.name, parts)
        with member.open() as data:
            self._copy(data, target, member.name)
        if holds_pickle(target):
            raise _pickle_weights(member.name)
        self.files.append(target)

    def _admit_directory(self, name: str, parts: tuple[str, ...]) -> None:
        # Directory entries are never written, but tarfile keeps every member it has read in
        # memory, so a flood of them is bounded like files are.
        self.directory_count += 1
        if self.directory_count > self.limits.max_files:
            raise ArchiveRejected(
                "too_many_files",
                f"member {name!r} is directory number {self.directory_count}; at most {self.limits.max_files} are accepted",
                name,
            )
        if not parts:
            return
        key = _collision_key(parts)
        if key in self.file_keys:
            raise _duplicate(name)
        self.directory_keys.update(_ancestor_keys(parts) | {key})

    def _admit_file(self, name: str, parts: tuple[str, ...]) -> Path:
        """The path `name` is written to, once it has passed every check on names."""
        if not parts:
            raise ArchiveRejected("path_traversal", f"member {name!r} does not name a file inside the archive", name)
        if len(self.files) >= self.limits.max_files:
            raise ArchiveRejected(
                "too_many_files", f"member {name!r} is one file more than the {self.limits.max_files} accepted", name
            )
        key, ancestors = _collision_key(parts), _ancestor_keys(parts)
        if key in self.file_keys or key in self.directory_keys or not self.file_keys.isdisjoint(ancestors):
            raise _duplicate(name)
        if PurePosixPath(parts[-1]).suffix.lower() in PICKLE_SUFFIXES:
            raise _pickle_weights(name)
        target = self.destination.joinpath(*parts)
        # the component checks above should make this impossible; it guards against any
        # spelling of a name they miss
        if not target.resolve().is_relative_to(self.resolved_destination):
            raise ArchiveRejected("path_traversal", f"member {name!r} resolves outside the extraction folder", name)
        self.file_keys.add(key)
        self.directory_keys.update(ancestors)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def _copy(self, data: IO[bytes], target: Path, name: str) -> None:
        # Read at most one byte past what the limit leaves, so a bomb is stopped there.
        with target.open("xb") as handle:
            while chunk := data.read(min(CHUNK_BYTES, self.limits.max_total_bytes - self.total_bytes + 1)):
                self.total_bytes += len(chunk)
                if self.total_bytes > self.limits.max_total_bytes:
                    raise ArchiveRejected(
                        "too_large",
                        f"member {name!r} takes the archive past {self.limits.max_total_bytes} bytes once decompressed",
                        name,
                    )
                handle.write(chunk)


def _relative_parts(name: str) -> tuple[str, ...]:
    """The components of a member's name with `.` and empty ones dropped; absolute names and
    `..` are refused."""
    if name.startswith(("/", "\\")) or WINDOWS_DRIVE.match(name):
        raise ArchiveRejected("path_traversal", f"member {name!r} is an absolute path", name)
    parts = tuple(part for part in SEPARATORS.split(name) if part not in ("", "."))
    if ".." in parts:
        raise ArchiveRejected("path_traversal", f"member {name!r} climbs out of the archive with '..'", name)
    if "\x00" in name:
        raise ArchiveRejected("path_traversal", f"member {name!r} has a NUL byte in its name", name)
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES or any(
        len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_COMPONENT_BYTES for part in parts
    ):
        shown = name[:80] + "…" if len(name) > 80 else name
        raise ArchiveRejected(
            "name_too_long",
            f"member {shown!r} has a name over {MAX_NAME_BYTES} bytes or a part of it over {MAX_NAME_COMPONENT_BYTES} bytes",
            shown,
        )
    return parts


def _collision_key(parts: tuple[str, ...]) -> str:
    """Names that become one file on a case-insensitive or Unicode-normalising filesystem
    (Windows, macOS) share a key."""
    return unicodedata.normalize("NFC", "/".join(parts)).casefold()


def _ancestor_keys(parts: tuple[str, ...]) -> set[str]:
    return {_collision_key(parts[:depth]) for depth in range(1, len(parts))}


def _duplicate(name: str) -> ArchiveRejected:
    return ArchiveRejected(
        "duplicate_name",
        f"member {name!r} collides with an earlier member (names are compared without './', repeated slashes or letter case)",
        name,
    )


def _pickle_weights(name: str) -> ArchiveRejected:
    return ArchiveRejected(
        "pickle_weights",
        f"member {name!r} holds pickle-based weights, which can run code when loaded; "
        "convert the adapter to safetensors (save_pretrained(..., safe_serialization=True)) and upload it again",
        name,
    )
