"""Pickle-based weights, found by their bytes whatever the file is called: loading a pickle
can run code, so an adapter archive holding one is refused. A torch checkpoint is a zip with
a `data.pkl`; its names are read from the central directory one record at a time."""

import io
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
PICKLE_PROTOCOLS = range(2, 6)
# A central directory record's fixed part; the name, extra field and comment lengths are
# its fields 12, 13 and 14 (zipfile's structCentralDir).
ZIP_DIRECTORY_RECORD = struct.Struct("<4s4B4HL2L5H2L")


def holds_pickle(path: Path) -> bool:
    """A raw pickle (protocol 2 to 5, as `torch.save` writes in its legacy format) or a torch
    zip checkpoint, whatever the file is called."""
    with path.open("rb") as handle:
        head = handle.read(2)
    if len(head) == 2 and head[0] == 0x80 and head[1] in PICKLE_PROTOCOLS:
        return True
    return is_torch_checkpoint(path)


def is_torch_checkpoint(path: Path) -> bool:
    """A zip (as torch writes its checkpoints) with a `data.pkl` in it. Its names are read
    from the central directory record by record: `zipfile.ZipFile` would hold the whole
    directory, and a member may be a zip listing millions of entries."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with path.open("rb") as handle:
            return any(name.rsplit(b"/", 1)[-1] == b"data.pkl" for name in zip_directory_names(handle))
    except (zipfile.BadZipFile, EOFError, struct.error, ValueError):
        return False  # too damaged to list: whatever it is, it holds no readable data.pkl


def zip_directory_names(handle: BinaryIO) -> Iterator[bytes]:
    """The raw names in a zip's central directory, one record in memory at a time; the
    directory is found where `zipfile.ZipFile` finds it."""
    record = zipfile._EndRecData(handle)  # type: ignore[attr-defined]
    if not record:
        raise zipfile.BadZipFile("no end-of-central-directory record")
    size = record[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
    start = record[zipfile._ECD_LOCATION] - size  # type: ignore[attr-defined]
    if record[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:  # type: ignore[attr-defined]
        start -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator  # type: ignore[attr-defined]
    if start < 0:
        raise zipfile.BadZipFile("the central directory starts before the file")
    handle.seek(start)
    consumed = 0
    while consumed < size:
        fixed = handle.read(ZIP_DIRECTORY_RECORD.size)
        if len(fixed) != ZIP_DIRECTORY_RECORD.size or fixed[:4] != b"PK\x01\x02":
            raise zipfile.BadZipFile("a central directory record is damaged")
        fields = ZIP_DIRECTORY_RECORD.unpack(fixed)
        name_length, extra_length, comment_length = fields[12], fields[13], fields[14]
        yield handle.read(name_length)
        handle.seek(extra_length + comment_length, io.SEEK_CUR)
        consumed += ZIP_DIRECTORY_RECORD.size + name_length + extra_length + comment_length
