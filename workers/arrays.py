"""Float32 arrays written as one-tensor safetensors files without an in-memory copy.

`safetensors.numpy.save_file` turns every tensor into `bytes` before it writes, so saving
an array costs its size again in memory. An extraction result can be gigabytes; here the
file is laid out first (the 8-byte header length, the JSON header, then the data, 8-byte
aligned, as the format says) and its data section is mapped, so rows are written into
place as they are computed or read from the cache, and the page cache — not the worker's
heap — holds them until they reach the disk.
"""

import json
import os
import struct
from pathlib import Path

import numpy as np


def _header(name: str, shape: tuple[int, ...], metadata: dict[str, str]) -> bytes:
    nbytes = int(np.prod(shape, dtype=np.int64)) * 4
    header = {"__metadata__": metadata, name: {"dtype": "F32", "shape": list(shape), "data_offsets": [0, nbytes]}}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def allocate(path: Path, name: str, shape: tuple[int, ...], metadata: dict[str, str]) -> np.memmap:
    """A new file at `path` holding tensor `name` of `shape` (float32, zeros until written),
    and its data mapped for writing. A shared mapping writes into the page cache itself, so
    the file reads as written at once, with no `flush()` (an msync that would wait for the
    disk); a store that promises durability syncs the file when it publishes it."""
    header = _header(name, shape, metadata)
    with path.open("wb") as handle:
        handle.write(header)
        handle.flush()
        # the blocks are reserved now, so a full disk is an OSError here — not a SIGBUS that
        # kills the worker when a write through the mapping finds no room
        os.posix_fallocate(handle.fileno(), 0, len(header) + int(np.prod(shape, dtype=np.int64)) * 4)
    return np.memmap(path, dtype="<f4", mode="r+", offset=len(header), shape=shape)


def write(path: Path, name: str, array: np.ndarray, metadata: dict[str, str]) -> None:
    """`array` (float32) as a one-tensor safetensors file, streamed from its own buffer."""
    array = np.ascontiguousarray(array, dtype="<f4")
    with path.open("wb") as handle:
        handle.write(_header(name, array.shape, metadata))
        array.tofile(handle)


def _entry(path: Path, name: str) -> tuple[tuple[int, ...], int]:
    """Tensor `name`'s shape and the offset of its data in the safetensors file at `path`."""
    with path.open("rb") as handle:
        (header_length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_length))
    entry = header[name]
    if entry["dtype"] != "F32":
        raise ValueError(f"{path}: tensor {name} is {entry['dtype']}, not F32")
    shape = tuple(int(size) for size in entry["shape"])
    begin, end = (int(offset) for offset in entry["data_offsets"])
    if end - begin != int(np.prod(shape, dtype=np.int64)) * 4:
        raise ValueError(f"{path}: tensor {name} has {end - begin} bytes for shape {list(shape)}")
    return shape, 8 + header_length + begin


def mapped(path: Path, name: str) -> np.memmap:
    """Tensor `name` (float32) of the safetensors file at `path`, mapped read-only: indexing
    it reads just the rows it picks, through the page cache, with no copy of the whole file."""
    shape, offset = _entry(path, name)
    return np.memmap(path, dtype="<f4", mode="r", offset=offset, shape=shape)


def mapped_rows(path: Path, name: str, start: int, stop: int) -> np.memmap:
    """Rows `start` to `stop` (not included) of tensor `name` in the file at `path`, mapped
    for writing: a window of a large result is written, then unmapped, so the pages it
    touched leave the process's memory with it."""
    shape, offset = _entry(path, name)
    if not 0 <= start <= stop <= shape[0]:
        raise ValueError(f"{path}: rows {start}:{stop} of a tensor of {shape[0]} rows")
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * 4
    return np.memmap(path, dtype="<f4", mode="r+", offset=offset + start * row_bytes, shape=(stop - start, *shape[1:]))
