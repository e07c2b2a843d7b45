"""Reading a safetensors file's header as hostile input, for sizing a model's weights and for
rewriting an adapter's.

The format: an 8-byte little-endian header length, a JSON header of `{name: {dtype, shape,
data_offsets}}` (and an optional `__metadata__` of strings), then the raw bytes of every
tensor. The header is believed only as far as the file backs it: its length is bounded by
the caller's limit and by the file, every entry's types are checked, each tensor's shape
must need exactly the bytes of its range, and the ranges must tile the data section, as the
safetensors library requires, so no range points elsewhere or claims bytes twice.
"""

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from app.inputs.user_files import open_regular_file

MAX_DIMENSIONS = 8
MAX_DIMENSION = 1 << 40  # no real dimension is near; the byte-range check bounds the product
# Bits per number of each safetensors dtype code.
DTYPE_BITS = {
    **dict.fromkeys(("BOOL", "U8", "I8", "F8_E4M3", "F8_E5M2", "F8_E8M0"), 8),
    **dict.fromkeys(("U16", "I16", "F16", "BF16"), 16),
    **dict.fromkeys(("U32", "I32", "F32"), 32),
    **dict.fromkeys(("U64", "I64", "F64", "C64"), 64),
    **dict.fromkeys(("F6_E2M3", "F6_E3M2"), 6),
    "F4": 4,
}


class InvalidSafetensors(ValueError):
    pass


@dataclass(frozen=True)
class HeaderBounds:
    """What a caller accepts: at most `max_bytes` of header (a refusal names the bound
    `name`), and tensors of the dtype codes `dtypes`."""

    max_bytes: int
    name: str
    dtypes: tuple[str, ...] = tuple(DTYPE_BITS)


@dataclass(frozen=True)
class StoredTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, StoredTensor]
    metadata: dict[str, str]


def read_header(path: Path, bounds: HeaderBounds) -> SafetensorsHeader:
    """Every tensor's name, dtype, shape and byte range, and the file's metadata. The file
    is opened only if it is a regular file (`NotARegularFile` otherwise: a FIFO would block
    the worker for good), and a header longer than the bound or than the file is refused
    before it is read."""
    with open_regular_file(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise InvalidSafetensors(f"{path.name} is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(bounds.max_bytes, size - 8):
            raise InvalidSafetensors(
                f"{path.name} declares a {length:,}-byte header, more than the file or "
                f"{bounds.name} ({bounds.max_bytes:,} bytes) allows"
            )
        header = _parsed(path.name, handle.read(length))
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise InvalidSafetensors(f"{path.name}: __metadata__ must map names to strings")
    data_start = 8 + length
    tensors = {
        name: _stored_tensor(path.name, name, entry, data_start, bounds.dtypes) for name, entry in header.items()
    }
    _check_tiling(path.name, tensors, data_start, size)
    return SafetensorsHeader(tensors, {str(key): value for key, value in metadata.items()})


def _refuse_constant(name: str) -> None:
    raise InvalidSafetensors(f"the header holds {name}, which JSON does not allow")


def _parsed(file_name: str, raw: bytes) -> dict[str, object]:
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


def _stored_tensor(file_name: str, name: str, entry: object, data_start: int, dtypes: tuple[str, ...]) -> StoredTensor:
    """One header entry, checked: a dtype of `dtypes`, a shape of at most `MAX_DIMENSIONS`
    whole numbers from 0 to `MAX_DIMENSION`, and whole-number offsets whose range holds
    exactly the bytes the shape needs."""
    problem = _entry_problem(entry, dtypes)
    if problem:
        raise InvalidSafetensors(f"{file_name}: tensor {name[:100]!r} does not match its byte range: {problem}")
    assert isinstance(entry, dict)  # _entry_problem has checked
    (start, end), shape = entry["data_offsets"], tuple(entry["shape"])
    return StoredTensor(name, entry["dtype"], shape, data_start + start, data_start + end)


def _entry_problem(entry: object, dtypes: tuple[str, ...]) -> str | None:
    """What is wrong with a header entry, or None."""
    if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"}:
        return "not an entry of dtype, shape and data_offsets"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in dtypes:
        return f"unknown dtype {str(dtype)[:40]!r} (known: {', '.join(dtypes)})"
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMENSIONS
        or not all(_is_whole(n) and 0 <= n <= MAX_DIMENSION for n in shape)
    ):
        return f"a malformed shape (at most {MAX_DIMENSIONS} whole numbers from 0 to {MAX_DIMENSION})"
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_whole(n) for n in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        return "malformed data_offsets (two whole numbers, start <= end)"
    needed = (math.prod(shape) * DTYPE_BITS[dtype] + 7) // 8
    if offsets[1] - offsets[0] != needed:
        return f"{dtype} {shape} takes {needed:,} bytes, the range holds {offsets[1] - offsets[0]:,}"
    return None


def _check_tiling(file_name: str, tensors: dict[str, StoredTensor], data_start: int, size: int) -> None:
    """The byte ranges, in order, start at the data section, meet end to end, and end with
    the file: none overlaps another, none points past the file."""
    position = data_start
    for tensor in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if tensor.start != position:
            problem = "overlaps another" if tensor.start < position else "leaves a gap before it"
            raise InvalidSafetensors(f"{file_name}: the byte range of tensor {tensor.name[:100]!r} {problem}")
        position = tensor.end
    if position != size:
        problem = "past the end of the file" if position > size else "short of the end of the file"
        raise InvalidSafetensors(f"{file_name}: the tensors' byte ranges end {problem}")
