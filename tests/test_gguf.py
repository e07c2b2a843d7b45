"""The GGUF header reader: the real SmolLM2-135M-Instruct file read as the `gguf` package and
transformers read it, and crafted hostile files refused quickly, with little memory."""

import hashlib
import math
import os
import struct
import subprocess
import sys
import time
import tracemalloc
from array import array
from pathlib import Path
from typing import Any

import pytest

from app.inputs.gguf import (
    DEFAULT_LIMITS,
    NUMBER_TYPES,
    GgufLimits,
    InvalidGguf,
    file_sha256,
    model_info,
    read_header,
    read_model_info,
)
from app.inputs.gguf_architectures import (
    TRANSFORMERS_GGUF_ARCHITECTURES,
    TRANSFORMERS_GGUF_LEGACY_ARCHITECTURES,
    TRANSFORMERS_GGUF_NEW_READER_ARCHITECTURES,
    TRANSFORMERS_GGUF_RENAMES,
    transformers_loads,
)
from app.inputs.user_files import NotARegularFile
from tests.conftest import ROOT
from tests.special_files import call_without_blocking

UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
SCALAR_FORMATS = {
    UINT8: "B",
    INT8: "b",
    UINT16: "H",
    INT16: "h",
    UINT32: "I",
    INT32: "i",
    FLOAT32: "f",
    UINT64: "Q",
    INT64: "q",
    FLOAT64: "d",
}


# --- writing GGUF files byte by byte, hostile ones included ------------------------------


def encoded_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def pair(key: str | bytes, value_type: int, value: bytes) -> bytes:
    return encoded_string(key) + struct.pack("<I", value_type) + value


def string_pair(key: str, text: str) -> bytes:
    return pair(key, STRING, encoded_string(text))


def u32_pair(key: str, number: int) -> bytes:
    return pair(key, UINT32, struct.pack("<I", number))


def array_value(item_type: int, count: int, items: bytes = b"") -> bytes:
    return struct.pack("<IQ", item_type, count) + items


def gguf_file(
    pairs: list[bytes], *, magic: bytes = b"GGUF", version: int = 3, tensors: int = 0, keys: int | None = None
) -> bytes:
    count = len(pairs) if keys is None else keys
    return magic + struct.pack("<IQQ", version, tensors, count) + b"".join(pairs)


LLAMA_PAIRS = [
    string_pair("general.architecture", "llama"),
    string_pair("general.name", "tiny"),
    u32_pair("llama.block_count", 2),
    u32_pair("llama.embedding_length", 16),
]


@pytest.fixture
def write(tmp_path: Path) -> Any:
    def written(content: bytes, name: str = "model.gguf") -> Path:
        path = tmp_path / name
        path.write_bytes(content)
        return path

    return written


def refusal(path: Path, limits: GgufLimits = DEFAULT_LIMITS) -> InvalidGguf:
    """The reader's refusal of a file, which must come within a second and with under 1 MiB
    allocated, whatever the file declares."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(InvalidGguf) as caught:
            read_model_info(path, limits)
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 1 << 20
    return caught.value


# --- the real file -----------------------------------------------------------------------


def test_the_smollm2_file_is_a_30_layer_576_wide_llama_with_a_chat_template(smollm2_gguf: Path) -> None:
    info = read_model_info(smollm2_gguf)
    assert info.architecture == "llama"
    assert info.name == "Smollm2 135M 8k Lc100K Mix1 Ep2"
    assert (info.num_layers, info.hidden_size, info.context_length) == (30, 576, 8192)
    assert (info.attention_heads, info.key_value_heads) == (9, 3)
    assert info.vocab_size == 49152
    assert info.has_chat_template
    assert info.loads_in_transformers


def test_every_metadata_value_is_what_the_gguf_package_reads(smollm2_gguf: Path) -> None:
    from gguf import GGUFReader

    header = read_header(smollm2_gguf)
    reference = GGUFReader(smollm2_gguf)
    fields = {name: field for name, field in reference.fields.items() if not name.startswith("GGUF.")}
    assert header.version == reference.fields["GGUF.version"].contents() == 3
    assert header.tensor_count == len(reference.tensors) == 272
    assert list(header.metadata) == list(fields)
    for key, field in fields.items():
        value = header.metadata[key]
        expected = field.contents()
        assert (list(value) if isinstance(value, tuple | array) else value) == expected, key
    last = list(fields.values())[-1]
    assert header.size == last.offset + sum(int(part.nbytes) for part in last.parts)


def test_the_header_alone_reads_the_same_so_no_tensor_data_is_needed(smollm2_gguf: Path, write: Any) -> None:
    header = read_header(smollm2_gguf)
    with smollm2_gguf.open("rb") as file:
        header_only = write(file.read(header.size), "header-only.gguf")
    assert read_header(header_only) == header
    assert os.path.getsize(smollm2_gguf) > 50 * header.size


def test_the_real_header_reads_in_well_under_a_second_and_little_memory(smollm2_gguf: Path) -> None:
    started = time.perf_counter()
    header = read_header(smollm2_gguf)
    assert time.perf_counter() - started < 2.0  # about 0.1 s on a slow machine; room for a busy one
    assert header.size < 2 << 20
    tracemalloc.start()
    try:
        read_header(smollm2_gguf)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20


def test_the_streamed_sha256_is_the_files_sha256(smollm2_gguf: Path) -> None:
    with smollm2_gguf.open("rb") as file:
        expected = hashlib.file_digest(file, "sha256").hexdigest()
    assert file_sha256(smollm2_gguf) == expected


@pytest.mark.slow
def test_transformers_loads_the_same_model_from_the_file(smollm2_gguf: Path, smollm2_folder: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    info = read_model_info(smollm2_gguf)
    config = AutoConfig.from_pretrained(smollm2_folder)
    assert config.model_type == info.architecture
    assert (config.num_hidden_layers, config.hidden_size) == (info.num_layers, info.hidden_size) == (30, 576)
    assert config.max_position_embeddings == info.context_length
    assert (config.num_attention_heads, config.num_key_value_heads) == (info.attention_heads, info.key_value_heads)
    assert config.vocab_size == info.vocab_size
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    assert len(tokenizer) == info.vocab_size
    assert tokenizer.chat_template


@pytest.mark.parametrize("cut", [0, 3, 4, 7, 15, 23, 24, 1000, 500_000, -1])
def test_the_real_file_cut_short_anywhere_in_its_header_is_refused(smollm2_gguf: Path, write: Any, cut: int) -> None:
    size = read_header(smollm2_gguf).size
    with smollm2_gguf.open("rb") as file:
        path = write(file.read(cut % size))
    with pytest.raises(InvalidGguf, match="ends inside"):
        read_header(path)


# --- what transformers loads -------------------------------------------------------------


def test_the_architecture_lists_are_transformers_own() -> None:
    from transformers.integrations.gguf import GGUF_ARCHS, GGUF_CONFIG_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    assert set(GGUF_CONFIG_ARCHS) == set(GGUF_ARCHS) == TRANSFORMERS_GGUF_NEW_READER_ARCHITECTURES
    legacy = {name for name in GGUF_SUPPORTED_ARCHITECTURES if name in CONFIG_MAPPING_NAMES}
    assert legacy == TRANSFORMERS_GGUF_LEGACY_ARCHITECTURES
    assert set(TRANSFORMERS_GGUF_RENAMES.values()) <= TRANSFORMERS_GGUF_LEGACY_ARCHITECTURES


@pytest.mark.parametrize(
    "architecture",
    [*sorted(TRANSFORMERS_GGUF_ARCHITECTURES), "deci", "rwkv6", "bert", "gemma", "phi2", "qwen35_moe"],
)
def test_transformers_refuses_exactly_the_architectures_said_unloadable(tmp_path: Path, architecture: str) -> None:
    from transformers import AutoConfig

    (tmp_path / "model.gguf").write_bytes(gguf_file([string_pair("general.architecture", architecture)]))
    try:
        AutoConfig.from_pretrained(tmp_path, gguf_file="model.gguf")
        refused = False
    except Exception as error:  # a metadata-only file may fail later, on a missing key
        refused = "is not supported" in str(error) or "does not recognize" in str(error)
    assert refused is not transformers_loads(architecture)


# --- value types -------------------------------------------------------------------------


def test_every_value_type_reads_as_the_gguf_package_reads_it(write: Any) -> None:
    from gguf import GGUFReader

    scalars = {f"scalar.{code}": (value_type, 7 if code != "f" else 0.5) for value_type, code in SCALAR_FORMATS.items()}
    pairs = [
        pair(key, value_type, struct.pack("<" + SCALAR_FORMATS[value_type], value))
        for key, (value_type, value) in scalars.items()
    ]
    pairs += [
        pair("scalar.bool", BOOL, b"\x01"),
        string_pair("scalar.string", "héllo"),
        pair("array.int32", ARRAY, array_value(INT32, 3, struct.pack("<3i", -1, 0, 1))),
        pair("array.float64", ARRAY, array_value(FLOAT64, 2, struct.pack("<2d", 1.5, -2.25))),
        pair("array.bool", ARRAY, array_value(BOOL, 3, b"\x01\x00\x01")),
        pair("array.string", ARRAY, array_value(STRING, 2, encoded_string("a") + encoded_string("bc"))),
        pair("array.empty", ARRAY, array_value(UINT8, 0)),
    ]
    path = write(gguf_file(pairs))
    metadata = read_header(path).metadata
    reference = GGUFReader(path).fields
    for key, value in metadata.items():
        assert (list(value) if isinstance(value, tuple | array) else value) == reference[key].contents(), key
    assert metadata["scalar.bool"] is True
    assert metadata["array.bool"] == (True, False, True)
    assert metadata["array.string"] == ("a", "bc")


def test_arrays_of_arrays_read_as_tuples_of_arrays(write: Any) -> None:
    inner = array_value(UINT16, 2, struct.pack("<2H", 1, 2)) + array_value(UINT16, 0)
    path = write(gguf_file([pair("nested", ARRAY, array_value(ARRAY, 2, inner))]))
    nested = read_header(path).metadata["nested"]
    assert isinstance(nested, tuple)
    assert [item.tolist() if isinstance(item, array) else item for item in nested] == [[1, 2], []]


def test_number_arrays_are_kept_as_compact_as_in_the_file() -> None:
    for name, code in NUMBER_TYPES.values():
        assert array(code).itemsize == struct.calcsize("<" + code), name


def test_an_invalid_utf8_token_reads_as_a_replacement_character(write: Any) -> None:
    path = write(gguf_file([pair("tokenizer.ggml.tokens", ARRAY, array_value(STRING, 1, encoded_string(b"a\xff")))]))
    assert read_header(path).metadata["tokenizer.ggml.tokens"] == ("a\ufffd",)


def test_a_version_2_file_reads_as_version_3(write: Any) -> None:
    assert read_model_info(write(gguf_file(LLAMA_PAIRS, version=2))) == read_model_info(write(gguf_file(LLAMA_PAIRS)))


# --- hostile and broken files ------------------------------------------------------------


@pytest.mark.parametrize("cut", range(0, len(gguf_file(LLAMA_PAIRS)), 5))
def test_a_file_cut_short_is_refused_naming_where(write: Any, cut: int) -> None:
    assert "ends inside" in str(refusal(write(gguf_file(LLAMA_PAIRS)[:cut])))


@pytest.mark.parametrize("start", [b"GGML", b"\x00\x00\x00\x00", b'{"a"', b"PK\x03\x04"])
def test_a_file_that_is_not_gguf_is_refused(write: Any, start: bytes) -> None:
    assert "not a GGUF file" in str(refusal(write(gguf_file(LLAMA_PAIRS, magic=start))))


@pytest.mark.parametrize("version", [0, 1, 4, 99, 2**32 - 1])
def test_versions_other_than_2_and_3_are_refused(write: Any, version: int) -> None:
    assert f"version {version} is not supported" in str(refusal(write(gguf_file(LLAMA_PAIRS, version=version))))


def test_a_big_endian_file_is_refused_as_such(write: Any) -> None:
    content = b"GGUF" + struct.pack(">IQQ", 3, 0, 0)
    assert "big-endian" in str(refusal(write(content)))


@pytest.mark.parametrize("keys", [2**60, 2**64 - 1, 4097])
def test_a_key_count_over_the_bound_is_refused(write: Any, keys: int) -> None:
    assert "metadata keys, over the limit" in str(refusal(write(gguf_file(LLAMA_PAIRS, keys=keys))))


def test_more_keys_than_the_file_holds_are_refused(write: Any) -> None:
    assert "ends inside the key of metadata pair 5" in str(refusal(write(gguf_file(LLAMA_PAIRS, keys=5))))


def test_a_tensor_count_over_the_bound_is_refused(write: Any) -> None:
    assert "tensors, over the limit" in str(refusal(write(gguf_file(LLAMA_PAIRS, tensors=2**60))))


@pytest.mark.parametrize("length", [2**60, 2**64 - 1, (16 << 20) + 1])
def test_a_string_longer_than_the_bound_is_refused_naming_its_key(write: Any, length: int) -> None:
    content = gguf_file([*LLAMA_PAIRS, pair("general.license", STRING, struct.pack("<Q", length) + b"MIT")])
    error = refusal(write(content))
    assert error.key == "general.license"
    assert "over the limit" in str(error)
    assert str(error).startswith("general.license: ")


def test_a_string_longer_than_the_file_is_refused_before_it_is_read(write: Any) -> None:
    content = gguf_file([*LLAMA_PAIRS, pair("general.license", STRING, struct.pack("<Q", 15 << 20) + b"MIT")])
    assert "ends inside a string" in str(refusal(write(content)))


def test_a_key_longer_than_the_bound_is_refused(write: Any) -> None:
    content = gguf_file([*LLAMA_PAIRS, struct.pack("<Q", 2**60) + b"general"])
    assert "the key of metadata pair 5 is 1,152,921,504,606,846,976 bytes long" in str(refusal(write(content)))


@pytest.mark.parametrize("item_type", [UINT8, FLOAT64, BOOL, STRING, ARRAY])
def test_an_array_of_2_to_the_40_items_is_refused(write: Any, item_type: int) -> None:
    content = gguf_file([*LLAMA_PAIRS, pair("tokenizer.ggml.tokens", ARRAY, array_value(item_type, 2**40))])
    error = refusal(write(content))
    assert error.key == "tokenizer.ggml.tokens"
    assert "an array of 1,099,511,627,776 items" in str(error)


@pytest.mark.parametrize("item_type", [UINT64, STRING, ARRAY])
def test_an_array_longer_than_the_file_is_refused_before_its_items_are_read(write: Any, item_type: int) -> None:
    content = gguf_file([*LLAMA_PAIRS, pair("tokenizer.ggml.tokens", ARRAY, array_value(item_type, 1 << 20))])
    assert "ends inside" in str(refusal(write(content)))


def test_arrays_over_the_total_item_bound_are_refused(write: Any) -> None:
    limits = GgufLimits(max_array_items=4, max_total_items=6)
    content = gguf_file(
        [
            *LLAMA_PAIRS,
            pair("first", ARRAY, array_value(UINT8, 4, bytes(4))),
            pair("second", ARRAY, array_value(UINT8, 4, bytes(4))),
        ]
    )
    assert "arrays of over 6 items in all" in str(refusal(write(content), limits))


def test_arrays_nested_three_deep_are_refused(write: Any) -> None:
    deepest = array_value(UINT8, 1, b"\x00")
    content = gguf_file([*LLAMA_PAIRS, pair("nested", ARRAY, array_value(ARRAY, 1, array_value(ARRAY, 1, deepest)))])
    error = refusal(write(content))
    assert error.key == "nested"
    assert "arrays nested 3 deep" in str(error)


def test_the_items_of_nested_arrays_count_towards_the_total_bound(write: Any) -> None:
    nested = array_value(ARRAY, 600, array_value(UINT8, 1, b"\x00") * 600)
    error = refusal(write(gguf_file([*LLAMA_PAIRS, pair("nested", ARRAY, nested)])), GgufLimits(max_total_items=1000))
    assert "arrays of over 1,000 items in all" in str(error)


def test_a_header_over_the_byte_budget_is_refused(write: Any) -> None:
    content = gguf_file([*LLAMA_PAIRS, string_pair("general.license", "x" * 5000)])
    assert "past 4,096 bytes" in str(refusal(write(content), GgufLimits(max_header_bytes=4096)))


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        (pair("general.flag", BOOL, b"\x02"), "general.flag: a bool that is neither 0 nor 1"),
        (pair("general.odd", 13, b""), "general.odd: unknown value type 13"),
        (pair("general.odd", ARRAY, array_value(99, 1)), "general.odd: an array of unknown value type 99"),
        (pair(b"\xff\xfe", UINT8, b"\x00"), "the key of metadata pair 5 is not UTF-8 text"),
        (pair(b"", UINT8, b"\x00"), "the key of metadata pair 5 is empty"),
        (u32_pair("llama.block_count", 3), "llama.block_count: appears twice"),
    ],
)
def test_malformed_pairs_are_refused_naming_the_problem(write: Any, entry: bytes, problem: str) -> None:
    assert str(refusal(write(gguf_file([*LLAMA_PAIRS, entry])))) == problem


@pytest.mark.parametrize("missing", ["general.architecture", "llama.block_count", "llama.embedding_length"])
def test_a_file_missing_a_required_key_is_refused_naming_it(write: Any, missing: str) -> None:
    pairs = [entry for entry in LLAMA_PAIRS if missing.encode() not in entry]
    path = write(gguf_file(pairs))
    read_header(path)  # the header itself is sound
    error = refusal(path)
    assert (error.key, error.problem) == (missing, "is missing")


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        (string_pair("llama.block_count", "30"), "llama.block_count: must be a whole number, not a string"),
        (pair("llama.block_count", BOOL, b"\x01"), "llama.block_count: must be a whole number, not a bool"),
        (
            pair("llama.block_count", FLOAT32, struct.pack("<f", 30.0)),
            "llama.block_count: must be a whole number, not a float",
        ),
        (u32_pair("llama.block_count", 0), "llama.block_count: 0 is out of range (1 to 2,147,483,647)"),
        (
            pair("llama.block_count", UINT64, struct.pack("<Q", 2**40)),
            "llama.block_count: 1,099,511,627,776 is out of range (1 to 2,147,483,647)",
        ),
        (
            pair("llama.block_count", INT32, struct.pack("<i", -3)),
            "llama.block_count: -3 is out of range (1 to 2,147,483,647)",
        ),
        (u32_pair("general.architecture", 1), "general.architecture: must be a string, not an integer"),
        (
            string_pair("general.architecture", "llama\nx"),
            "general.architecture: 'llama\\nx' is not an architecture name",
        ),
        (
            pair("tokenizer.ggml.tokens", ARRAY, array_value(INT32, 1, bytes(4))),
            "tokenizer.ggml.tokens: must be an array of strings, not an array of numbers",
        ),
    ],
)
def test_a_model_fact_of_the_wrong_type_or_range_is_refused(write: Any, entry: bytes, problem: str) -> None:
    key = entry[8 : 8 + struct.unpack("<Q", entry[:8])[0]]
    pairs = [other for other in LLAMA_PAIRS if key not in other]
    assert str(refusal(write(gguf_file([*pairs, entry])))) == problem


def test_per_layer_head_counts_give_the_largest(write: Any) -> None:
    heads = pair("llama.attention.head_count_kv", ARRAY, array_value(INT32, 4, struct.pack("<4i", 0, 8, 0, 4)))
    info = read_model_info(write(gguf_file([*LLAMA_PAIRS, u32_pair("llama.attention.head_count", 8), heads])))
    assert (info.attention_heads, info.key_value_heads) == (8, 8)


def test_optional_facts_are_none_or_their_fallbacks_when_absent(write: Any) -> None:
    info = model_info(read_header(write(gguf_file([*LLAMA_PAIRS, u32_pair("llama.vocab_size", 100)]))).metadata)
    assert (info.context_length, info.attention_heads, info.key_value_heads) == (None, None, None)
    assert info.vocab_size == 100
    assert not info.has_chat_template


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    with pytest.raises(NotARegularFile):
        call_without_blocking(lambda: read_header(fifo), [fifo])
    with pytest.raises(NotARegularFile):
        call_without_blocking(lambda: file_sha256(fifo), [fifo])


def test_the_reader_imports_neither_numpy_nor_torch_nor_gguf() -> None:
    probe = (
        "import sys\n"
        "import app.inputs.gguf\n"
        "print([name for name in ['numpy', 'torch', 'transformers', 'gguf'] if name in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_float_values_keep_their_float32_value(write: Any) -> None:
    path = write(gguf_file([pair("eps", FLOAT32, struct.pack("<f", 1e-5))]))
    value = read_header(path).metadata["eps"]
    assert isinstance(value, float)
    assert value == struct.unpack("<f", struct.pack("<f", 1e-5))[0]
    assert not math.isclose(value, 1e-5, rel_tol=1e-12)
