"""GGUF model files (llama.cpp's single-file format) read as hostile input: the header's
metadata, every GGUF value type and arrays included, within fixed bounds, and the few facts
the service records of a model. Standard library only: the gateway checks a GGUF source
without torch, transformers or the `gguf` package.

The layout, versions 2 and 3, little-endian: the magic `GGUF`, a uint32 version, a uint64
tensor count, a uint64 metadata count, then each metadata pair: a string key, a uint32 value
type and the value. A string is a uint64 byte length and that many UTF-8 bytes; an array is
a uint32 item type, a uint64 item count and the items. The tensor descriptions and the
tensor data after the metadata are never parsed (the file is read a 256 KiB chunk at a time,
so at most one chunk past the metadata is read).

Every length and count is checked against `GgufLimits` and against what is left of the file
before anything of that size is read or allocated, and parsing stops at `max_header_bytes`:
a crafted file costs at most that much reading, and numbers are kept in typed arrays as
compact as in the file. Every problem is an `InvalidGguf` that names it, and its key.
"""

import hashlib
import os
import re
import struct
import sys
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeAlias

from app.inputs.gguf_architectures import transformers_loads
from app.inputs.user_files import open_regular_file

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
READ_CHUNK_BYTES = 1 << 18
HASH_CHUNK_BYTES = 1 << 20
# The registry keeps counts in 32-bit integer columns.
MAX_COUNT = (1 << 31) - 1
ARCHITECTURE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

# A value: numbers of an array are kept in an `array.array` of their own width.
GgufValue: TypeAlias = "int | float | bool | str | array[int] | array[float] | tuple[GgufValue, ...]"

# Value type codes; each number type's name and struct code (also its `array.array` code).
BOOL, STRING, ARRAY = 7, 8, 9
NUMBER_TYPES = {
    0: ("uint8", "B"),
    1: ("int8", "b"),
    2: ("uint16", "H"),
    3: ("int16", "h"),
    4: ("uint32", "I"),
    5: ("int32", "i"),
    6: ("float32", "f"),
    10: ("uint64", "Q"),
    11: ("int64", "q"),
    12: ("float64", "d"),
}
NUMBER_LAYOUTS = {value_type: struct.Struct("<" + code) for value_type, (_, code) in NUMBER_TYPES.items()}
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")


class InvalidGguf(ValueError):
    """A file that is not a GGUF file this reader accepts; `key` is the metadata key the
    problem is in, when there is one, and the message names it."""

    def __init__(self, problem: str, key: str | None = None) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.problem = problem
        self.key = key


@dataclass(frozen=True)
class GgufLimits:
    """How much header a reader accepts. Real files have 20 to 60 keys, vocabularies of up to
    about 260k tokens (about a million array items in all, with scores and merges), chat
    templates of tens of KiB and headers of a few MiB."""

    max_header_bytes: int = 64 << 20
    max_keys: int = 4096
    max_tensors: int = 1 << 20
    max_key_bytes: int = 1024
    max_string_bytes: int = 16 << 20
    max_array_items: int = 1 << 20
    max_total_items: int = 1 << 21  # over all arrays, nested ones included
    max_array_depth: int = 2  # an array may hold arrays, which may not


DEFAULT_LIMITS = GgufLimits()


@dataclass(frozen=True)
class GgufHeader:
    version: int
    tensor_count: int
    metadata: Mapping[str, GgufValue]
    size: int  # bytes from the magic to the end of the metadata


@dataclass(frozen=True)
class GgufModelInfo:
    """What the service records of a GGUF model, from its metadata."""

    architecture: str  # `general.architecture`, llama.cpp's name
    name: str | None  # `general.name`
    num_layers: int  # `<architecture>.block_count`
    hidden_size: int  # `<architecture>.embedding_length`
    context_length: int | None  # `<architecture>.context_length`
    attention_heads: int | None  # `<architecture>.attention.head_count`
    key_value_heads: int | None  # `<architecture>.attention.head_count_kv`, else as many as heads
    vocab_size: int | None  # tokens in `tokenizer.ggml.tokens`, else `<architecture>.vocab_size`
    has_chat_template: bool  # `tokenizer.chat_template` is a non-empty string

    @property
    def loads_in_transformers(self) -> bool:
        return transformers_loads(self.architecture)


def read_header(path: Path, limits: GgufLimits = DEFAULT_LIMITS) -> GgufHeader:
    """The version, tensor count and metadata of a GGUF file. Raises `InvalidGguf`, or
    `NotARegularFile` (`app.inputs.user_files`) for a FIFO, device or directory, or the `OSError`
    of a missing or unreadable path."""
    with open_regular_file(path) as file:
        reader = _HeaderReader(file, os.fstat(file.fileno()).st_size, limits)
        return reader.header()


def read_model_info(path: Path, limits: GgufLimits = DEFAULT_LIMITS) -> GgufModelInfo:
    """`model_info` of a GGUF file's header."""
    return model_info(read_header(path, limits).metadata)


def model_info(metadata: Mapping[str, GgufValue]) -> GgufModelInfo:
    """The model facts of a header's metadata. Architecture, block count and embedding length
    are required; counts must be whole numbers from 1 (0 for head counts) to 2**31 - 1."""
    architecture = _text(metadata, "general.architecture")
    if architecture is None:
        raise InvalidGguf("is missing", "general.architecture")
    if not ARCHITECTURE_NAME.fullmatch(architecture):
        raise InvalidGguf(f"{architecture[:80]!r} is not an architecture name", "general.architecture")
    attention_heads = _count(metadata, f"{architecture}.attention.head_count", minimum=0)
    key_value_heads = _count(metadata, f"{architecture}.attention.head_count_kv", minimum=0)
    return GgufModelInfo(
        architecture=architecture,
        name=_text(metadata, "general.name"),
        num_layers=_required_count(metadata, f"{architecture}.block_count"),
        hidden_size=_required_count(metadata, f"{architecture}.embedding_length"),
        context_length=_count(metadata, f"{architecture}.context_length"),
        attention_heads=attention_heads,
        key_value_heads=attention_heads if key_value_heads is None else key_value_heads,
        vocab_size=_vocab_size(metadata, architecture),
        has_chat_template=bool(_text(metadata, "tokenizer.chat_template")),
    )


def file_sha256(path: Path) -> str:
    """The hex sha256 of a regular file, read a chunk at a time however large it is."""
    digest = hashlib.sha256()
    with open_regular_file(path) as file:
        while chunk := file.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# --- reading the header ----------------------------------------------------------------


class _HeaderReader:
    """Parses a header front to back, a chunk of the file at a time. Every read is checked
    against the header budget and the file's end before it is made, and every array against
    the item bounds before its items are read."""

    def __init__(self, file: BinaryIO, file_size: int, limits: GgufLimits) -> None:
        self._file = file
        self._file_size = file_size
        self._limits = limits
        self._buffer = b""
        self._buffer_start = 0  # the file offset of the buffer's first byte
        self._offset = 0  # of the next unparsed byte in the buffer
        self._items = 0  # array items read

    def header(self) -> GgufHeader:
        magic = self._take(4, "the magic number")
        if magic != MAGIC:
            raise InvalidGguf(f"not a GGUF file: it starts with {magic!r}, not {MAGIC!r}")
        version = self._number(U32, "the version")
        if version not in SUPPORTED_VERSIONS:
            if int.from_bytes(version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
                raise InvalidGguf("a big-endian GGUF file; only little-endian ones are read")
            raise InvalidGguf(f"GGUF version {version} is not supported, only versions 2 and 3")
        tensor_count = self._bounded(self._number(U64, "the tensor count"), self._limits.max_tensors, "tensors")
        key_count = self._bounded(self._number(U64, "the metadata count"), self._limits.max_keys, "metadata keys")
        metadata: dict[str, GgufValue] = {}
        for index in range(key_count):
            key = self._key(index)
            if key in metadata:
                raise InvalidGguf("appears twice", key)
            value_type = self._number(U32, "a value type", key)
            metadata[key] = self._value(value_type, key, depth=0)
        return GgufHeader(version=version, tensor_count=tensor_count, metadata=metadata, size=self._consumed)

    def _key(self, index: int) -> str:
        what = f"the key of metadata pair {index + 1}"
        length = self._number(U64, what)
        if length > self._limits.max_key_bytes:
            raise InvalidGguf(f"{what} is {length:,} bytes long, over the limit of {self._limits.max_key_bytes:,}")
        try:
            key = self._take(length, what).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidGguf(f"{what} is not UTF-8 text") from None
        if not key:
            raise InvalidGguf(f"{what} is empty")
        return key

    def _value(self, value_type: int, key: str, depth: int) -> GgufValue:
        if value_type in NUMBER_TYPES:
            return self._scalar(value_type, key)
        if value_type == BOOL:
            return self._bools(1, key)[0]
        if value_type == STRING:
            return self._string(key)
        if value_type == ARRAY:
            return self._array(key, depth + 1)
        raise InvalidGguf(f"unknown value type {value_type}", key)

    def _array(self, key: str, depth: int) -> GgufValue:
        if depth > self._limits.max_array_depth:
            raise InvalidGguf(f"arrays nested {depth} deep, over the limit of {self._limits.max_array_depth}", key)
        item_type = self._number(U32, "an array's item type", key)
        count = self._number(U64, "an array's length", key)
        if count > self._limits.max_array_items:
            raise InvalidGguf(f"an array of {count:,} items, over the limit of {self._limits.max_array_items:,}", key)
        self._items += count
        if self._items > self._limits.max_total_items:
            raise InvalidGguf(f"arrays of over {self._limits.max_total_items:,} items in all", key)
        if item_type in NUMBER_TYPES:
            return self._numbers(NUMBER_TYPES[item_type][1], count, key)
        if item_type == BOOL:
            return self._bools(count, key)
        if item_type not in (STRING, ARRAY):
            raise InvalidGguf(f"an array of unknown value type {item_type}", key)
        # every string or array item takes at least 8 bytes: a length too long for the file is refused now
        self._require(count * 8, "an array's items", key)
        if item_type == STRING:
            return self._strings(count, key)
        return tuple(self._array(key, depth + 1) for _ in range(count))

    def _numbers(self, code: str, count: int, key: str) -> "array[int] | array[float]":
        numbers = array(code)
        numbers.frombytes(self._take(count * numbers.itemsize, "an array's numbers", key))
        if sys.byteorder == "big":
            numbers.byteswap()
        return numbers

    def _bools(self, count: int, key: str) -> tuple[bool, ...]:
        raw = self._take(count, "a bool", key)
        if raw.translate(None, b"\x00\x01"):
            raise InvalidGguf("a bool that is neither 0 nor 1", key)
        return tuple(byte == 1 for byte in raw)

    def _string(self, key: str) -> str:
        length = self._number(U64, "a string's length", key)
        if length > self._limits.max_string_bytes:
            raise InvalidGguf(f"a string of {length:,} bytes, over the limit of {self._limits.max_string_bytes:,}", key)
        # invalid bytes become U+FFFD: a token's odd bytes do not make the file unreadable
        return self._take(length, "a string", key).decode("utf-8", errors="replace")

    def _strings(self, count: int, key: str) -> tuple[str, ...]:
        """A string array (a vocabulary: the hot loop). An item the buffer holds whole is cut
        from it directly; any other goes through `_string` and its checks."""
        limit = self._limits.max_string_bytes
        strings: list[str] = []
        for _ in range(count):
            buffer, offset = self._buffer, self._offset
            if offset + 8 <= len(buffer):
                (length,) = U64.unpack_from(buffer, offset)
                end = offset + 8 + length
                if length <= limit and end <= len(buffer):
                    strings.append(buffer[offset + 8 : end].decode("utf-8", errors="replace"))
                    self._offset = end
                    continue
            strings.append(self._string(key))
        return tuple(strings)

    def _bounded(self, count: int, limit: int, what: str) -> int:
        if count > limit:
            raise InvalidGguf(f"{count:,} {what}, over the limit of {limit:,}")
        return count

    def _scalar(self, value_type: int, key: str) -> int | float:
        layout = NUMBER_LAYOUTS[value_type]
        self._require(layout.size, f"a {NUMBER_TYPES[value_type][0]}", key)
        (value,) = layout.unpack_from(self._buffer, self._offset)
        self._offset += layout.size
        return value

    def _number(self, layout: struct.Struct, what: str, key: str | None = None) -> int:
        """A count, length or code: a uint32 or uint64."""
        self._require(layout.size, what, key)
        (value,) = layout.unpack_from(self._buffer, self._offset)
        self._offset += layout.size
        return value

    def _take(self, size: int, what: str, key: str | None = None) -> bytes:
        self._require(size, what, key)
        start = self._offset
        self._offset += size
        return self._buffer[start : self._offset]

    @property
    def _consumed(self) -> int:
        """Header bytes parsed so far."""
        return self._buffer_start + self._offset

    def _require(self, size: int, what: str, key: str | None) -> None:
        """Make the next `size` bytes parseable from the buffer, refusing them when they pass
        the header budget or the end of the file. The buffer only ever holds bytes within
        both, so bytes it already holds need no check."""
        buffered = len(self._buffer) - self._offset
        if buffered >= size:
            return
        if self._consumed + size > self._limits.max_header_bytes:
            raise InvalidGguf(f"{what} would take the header past {self._limits.max_header_bytes:,} bytes", key)
        if self._consumed + size > self._file_size:
            raise InvalidGguf(f"the file ends inside {what} (truncated at {self._file_size:,} bytes)", key)
        wanted = min(max(size - buffered, READ_CHUNK_BYTES), self._limits.max_header_bytes - self._consumed - buffered)
        self._buffer_start = self._consumed
        self._buffer = self._buffer[self._offset :] + self._file.read(wanted)
        self._offset = 0
        if len(self._buffer) < size:  # the file shrank while it was read
            raise InvalidGguf(f"the file ends inside {what}", key)


# --- model facts -----------------------------------------------------------------------


def _text(metadata: Mapping[str, GgufValue], key: str) -> str | None:
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidGguf(f"must be a string, not {_kind(value)}", key)
    return value


def _count(metadata: Mapping[str, GgufValue], key: str, minimum: int = 1) -> int | None:
    """A whole number in the registry's range; per-layer arrays (some models vary head
    counts by layer) give their largest, as transformers takes them."""
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, array) and value.typecode in "BbHhIiQq" and len(value) > 0:
        value = max(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidGguf(f"must be a whole number, not {_kind(value)}", key)
    if not minimum <= value <= MAX_COUNT:
        raise InvalidGguf(f"{value:,} is out of range ({minimum} to {MAX_COUNT:,})", key)
    return value


def _required_count(metadata: Mapping[str, GgufValue], key: str) -> int:
    count = _count(metadata, key)
    if count is None:
        raise InvalidGguf("is missing", key)
    return count


def _vocab_size(metadata: Mapping[str, GgufValue], architecture: str) -> int | None:
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        return _count(metadata, f"{architecture}.vocab_size")
    if not isinstance(tokens, tuple) or not all(isinstance(token, str) for token in tokens):
        raise InvalidGguf(f"must be an array of strings, not {_kind(tokens)}", "tokenizer.ggml.tokens")
    return len(tokens)


def _kind(value: GgufValue) -> str:
    if isinstance(value, array):
        return "an array of numbers"
    if isinstance(value, tuple):
        return "an array"
    return {bool: "a bool", int: "an integer", float: "a float", str: "a string"}[type(value)]
