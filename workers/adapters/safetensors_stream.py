"""Rewriting a safetensors file tensor by tensor — renamed, some transposed — without ever
holding the whole file in memory. The safetensors library writes only from a complete dict
of tensors, so the (simple, documented) format is written here directly: an 8-byte
little-endian header length, a JSON header of `{name: {dtype, shape, data_offsets}}`, then
the raw bytes of every tensor.
"""

import hashlib
import json
import math
import os
import struct
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import BinaryIO

import numpy as np

from app.inputs.user_files import NotARegularFile, open_regular_file

COPY_CHUNK = 8 << 20
HASH_BACKLOG = 3
MAX_HEADER_BYTES = 100 << 20
MAX_DIMENSIONS = 8
MAX_DIMENSION = 1 << 40  # no real dimension is near; the byte-range check bounds the product
ITEM_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


@dataclass(frozen=True)
class StoredTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


class InvalidSafetensors(ValueError):
    pass


def read_index(path: Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """Every tensor's name, dtype, shape and byte range, and the file's metadata. The file is
    opened only if it is a regular file (a FIFO would block the worker for good), and the
    header is hostile input: every entry's types are checked, and the ranges must tile the
    data section exactly, as the safetensors library requires, so no range points elsewhere."""
    try:
        handle = open_regular_file(path)
    except NotARegularFile as exc:
        raise InvalidSafetensors(f"{path.name} is a {exc.kind}, not a regular file") from exc
    with handle:
        size = os.fstat(handle.fileno()).st_size
        raw_length = handle.read(8)
        if len(raw_length) != 8:
            raise InvalidSafetensors(f"{path.name} is too short to be a safetensors file")
        (header_length,) = struct.unpack("<Q", raw_length)
        if header_length > min(MAX_HEADER_BYTES, size - 8):
            raise InvalidSafetensors(
                f"{path.name} declares a header of {header_length} bytes, more than the file or {MAX_HEADER_BYTES} bytes hold"
            )
        header = _parsed_header(path.name, handle.read(header_length))
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise InvalidSafetensors(f"{path.name}: __metadata__ must map names to strings")
    data_start = 8 + header_length
    tensors = {name: _stored_tensor(path.name, name, entry, data_start) for name, entry in header.items()}
    _check_tiling(path.name, tensors, data_start, size)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _refuse_constant(name: str) -> None:
    raise InvalidSafetensors(f"the header holds {name}, which JSON does not allow")


def _parsed_header(file_name: str, raw: bytes) -> dict[str, object]:
    try:
        header = json.loads(raw, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidSafetensors(f"{file_name} has an unreadable header: {str(exc)[:200]}") from exc
    except InvalidSafetensors as exc:
        raise InvalidSafetensors(f"{file_name}: {exc}") from exc
    if not isinstance(header, dict):
        raise InvalidSafetensors(f"{file_name}'s header is not a JSON object")
    return header


def _is_whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _stored_tensor(file_name: str, name: str, entry: object, data_start: int) -> StoredTensor:
    """One header entry, checked: a known dtype, a shape of at most `MAX_DIMENSIONS`
    whole numbers from 0 to `MAX_DIMENSION`, and whole-number offsets whose range holds
    exactly the bytes the shape needs."""
    if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"}:
        raise InvalidSafetensors(f"{file_name}: tensor {name!r} is not an entry of dtype, shape and data_offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEM_SIZES:
        raise InvalidSafetensors(
            f"{file_name}: tensor {name!r} has an unknown dtype {str(dtype)[:40]!r} (known: {', '.join(ITEM_SIZES)})"
        )
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMENSIONS
        or not all(_is_whole(n) and 0 <= n <= MAX_DIMENSION for n in shape)
    ):
        raise InvalidSafetensors(
            f"{file_name}: tensor {name!r} has a malformed shape (at most {MAX_DIMENSIONS} whole numbers from 0 to {MAX_DIMENSION})"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_whole(n) for n in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise InvalidSafetensors(
            f"{file_name}: tensor {name!r} has malformed data_offsets (two whole numbers, start <= end)"
        )
    start, end = offsets
    if end - start != ITEM_SIZES[dtype] * math.prod(shape):
        raise InvalidSafetensors(f"{file_name}: tensor {name!r} ({dtype}, {shape}) does not match its byte range")
    return StoredTensor(name, dtype, tuple(shape), data_start + start, data_start + end)


def _check_tiling(file_name: str, tensors: dict[str, StoredTensor], data_start: int, size: int) -> None:
    """The byte ranges, in order, start at the data section, meet end to end, and end with
    the file: none overlaps another, none points past the file."""
    position = data_start
    for tensor in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if tensor.start != position:
            problem = "overlaps another" if tensor.start < position else "leaves a gap before it"
            raise InvalidSafetensors(f"{file_name}: the byte range of tensor {tensor.name!r} {problem}")
        position = tensor.end
    if position != size:
        problem = "past the end of the file" if position > size else "short of the end of the file"
        raise InvalidSafetensors(f"{file_name}: the tensors' byte ranges end {problem}")


@dataclass(frozen=True)
class OutputTensor:
    """A tensor of the new file: `source` renamed to `name`, transposed if asked (2-D only)."""

    name: str
    source: StoredTensor
    transpose: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.source.shape)) if self.transpose else self.source.shape


def _chunks(handle: BinaryIO, tensor: OutputTensor) -> Iterator[bytes]:
    handle.seek(tensor.source.start)
    if tensor.transpose:
        item = ITEM_SIZES[tensor.source.dtype]
        raw = np.frombuffer(handle.read(tensor.source.end - tensor.source.start), dtype=np.dtype(f"V{item}"))
        yield np.ascontiguousarray(raw.reshape(tensor.source.shape).T).tobytes()
        return
    remaining = tensor.source.end - tensor.source.start
    while remaining:
        chunk = handle.read(min(COPY_CHUNK, remaining))
        if not chunk:
            raise InvalidSafetensors(f"{tensor.source.name} ends early")
        remaining -= len(chunk)
        yield chunk


def _open_source(source: Path) -> BinaryIO:
    try:
        return open_regular_file(source)
    except NotARegularFile as exc:
        raise InvalidSafetensors(f"{source.name} is a {exc.kind}, not a regular file") from exc


def write(source: Path, tensors: Sequence[OutputTensor], destination: Path, metadata: dict[str, str]) -> str:
    """Write the new file; returns its sha256. Transposed tensors are the only ones held in
    memory, one at a time."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for tensor in tensors:
        length = tensor.source.end - tensor.source.start
        header[tensor.name] = {
            "dtype": tensor.source.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + length],
        }
        offset += length
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    digest = hashlib.sha256()
    # Hashing runs on another core while this thread writes (hashlib releases the GIL on
    # large buffers); a single-thread executor keeps the chunks in order, and at most
    # HASH_BACKLOG chunks wait for it, so memory stays a few chunks whatever the file size.
    pending: deque[Future[None]] = deque()
    with _open_source(source) as reader, destination.open("xb") as writer, ThreadPoolExecutor(max_workers=1) as hasher:
        chunks = chain(
            [struct.pack("<Q", len(encoded)), encoded],
            (chunk for tensor in tensors for chunk in _chunks(reader, tensor)),
        )
        for chunk in chunks:
            writer.write(chunk)
            pending.append(hasher.submit(digest.update, chunk))
            if len(pending) > HASH_BACKLOG:
                pending.popleft().result()
        for future in pending:
            future.result()
    return digest.hexdigest()
