"""Rewriting a safetensors file tensor by tensor — renamed, some transposed — without ever
holding the whole file in memory. The safetensors library writes only from a complete dict
of tensors, so the (simple, documented) format is written here directly: an 8-byte
little-endian header length, a JSON header of `{name: {dtype, shape, data_offsets}}`, then
the raw bytes of every tensor.
"""

import hashlib
import json
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
from workers.safetensors_header import HeaderBounds, InvalidSafetensors, StoredTensor, read_header

COPY_CHUNK = 8 << 20
HASH_BACKLOG = 3
MAX_HEADER_BYTES = 100 << 20
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
# Whole-byte dtypes only: a transposed tensor is moved number by number as raw bytes.
ADAPTER_HEADER_BOUNDS = HeaderBounds(MAX_HEADER_BYTES, "MAX_HEADER_BYTES", tuple(ITEM_SIZES))


def read_index(path: Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """Every tensor's name, dtype, shape and byte range, and the file's metadata, read and
    checked as hostile input by `workers.safetensors_header`, within this rewrite's bounds."""
    try:
        header = read_header(path, ADAPTER_HEADER_BOUNDS)
    except NotARegularFile as exc:
        raise InvalidSafetensors(f"{path.name} is a {exc.kind}, not a regular file") from exc
    return header.tensors, header.metadata


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
