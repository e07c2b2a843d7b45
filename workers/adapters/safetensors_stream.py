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

COPY_CHUNK = 8 << 20
HASH_BACKLOG = 3
MAX_HEADER_BYTES = 100 << 20
ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


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
    """Every tensor's name, dtype, shape and byte range, and the file's metadata; checks
    that the ranges tile the data section, so a hostile header cannot point elsewhere."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw_length = handle.read(8)
        if len(raw_length) != 8:
            raise InvalidSafetensors(f"{path.name} is too short to be a safetensors file")
        (header_length,) = struct.unpack("<Q", raw_length)
        if header_length > min(MAX_HEADER_BYTES, size - 8):
            raise InvalidSafetensors(f"{path.name} has an impossible header length")
        try:
            header = json.loads(handle.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidSafetensors(f"{path.name} has an unreadable header: {exc}") from exc
    if not isinstance(header, dict):
        raise InvalidSafetensors(f"{path.name} has an unreadable header")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_length
    tensors: dict[str, StoredTensor] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(int(n) for n in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidSafetensors(f"{path.name}: tensor {name!r} has a malformed entry") from exc
        expected = ITEM_SIZES.get(dtype, 0) * int(np.prod(shape, dtype=np.int64))
        if dtype not in ITEM_SIZES or end - start != expected or start < 0 or data_start + end > size:
            raise InvalidSafetensors(f"{path.name}: tensor {name!r} ({dtype}, {list(shape)}) does not match its byte range")
        tensors[name] = StoredTensor(name, dtype, shape, data_start + start, data_start + end)
    covered = sorted((t.start, t.end) for t in tensors.values())
    if any(previous_end > start for (_, previous_end), (start, _) in zip(covered, covered[1:], strict=False)):
        raise InvalidSafetensors(f"{path.name}: tensors overlap")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


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


def write(source: Path, tensors: Sequence[OutputTensor], destination: Path, metadata: dict[str, str]) -> str:
    """Write the new file; returns its sha256. Transposed tensors are the only ones held in
    memory, one at a time."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for tensor in tensors:
        length = tensor.source.end - tensor.source.start
        header[tensor.name] = {"dtype": tensor.source.dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + length]}
        offset += length
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    digest = hashlib.sha256()
    # Hashing runs on another core while this thread writes (hashlib releases the GIL on
    # large buffers); a single-thread executor keeps the chunks in order, and at most
    # HASH_BACKLOG chunks wait for it, so memory stays a few chunks whatever the file size.
    pending: deque[Future[None]] = deque()
    with source.open("rb") as reader, destination.open("wb") as writer, ThreadPoolExecutor(max_workers=1) as hasher:
        chunks = chain([struct.pack("<Q", len(encoded)), encoded], (chunk for tensor in tensors for chunk in _chunks(reader, tensor)))
        for chunk in chunks:
            writer.write(chunk)
            pending.append(hasher.submit(digest.update, chunk))
            if len(pending) > HASH_BACKLOG:
                pending.popleft().result()
        for future in pending:
            future.result()
    return digest.hexdigest()
