"""One-tensor safetensors files written without an in-memory copy read back, through the
safetensors library itself, as the arrays and metadata that were written."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from workers import arrays


@pytest.mark.parametrize("shape", [(3, 2, 5), (1, 1, 1), (7, 3, 384)])
def test_an_allocated_file_filled_in_place_reads_back_as_written(tmp_path: Path, shape: tuple[int, ...]) -> None:
    expected = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    path = tmp_path / "states.safetensors"
    out = arrays.allocate(path, "hidden_states", shape, {"layers": json.dumps([1, 2])})
    for row in reversed(range(shape[0])):  # in any order, as batches finish
        out[row] = expected[row]
    del out  # no flush: a shared mapping writes into the page cache the file is read from
    np.testing.assert_array_equal(load_file(path)["hidden_states"], expected)
    with safe_open(path, framework="numpy") as handle:
        assert handle.metadata() == {"layers": "[1, 2]"}
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    assert (8 + header_length) % 8 == 0  # the data section is aligned, as the format asks


def test_windows_of_rows_mapped_one_at_a_time_fill_the_file_as_one_mapping_would(tmp_path: Path) -> None:
    expected = np.random.default_rng(1).standard_normal((1000, 2, 3)).astype(np.float32)
    path = tmp_path / "states.safetensors"
    arrays.allocate(path, "hidden_states", expected.shape, {})
    for start in range(0, 1000, 333):  # windows not aligned to pages
        window = arrays.mapped_rows(path, "hidden_states", start, min(start + 333, 1000))
        window[:] = expected[start : start + 333]
        del window
    np.testing.assert_array_equal(load_file(path)["hidden_states"], expected)
    with pytest.raises(ValueError, match="rows 990:1001"):
        arrays.mapped_rows(path, "hidden_states", 990, 1001)


def test_a_written_array_reads_back_equal_whatever_its_layout(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.float64).reshape(2, 3, 4).transpose(1, 0, 2)  # not contiguous, not float32
    arrays.write(tmp_path / "shard.safetensors", "hidden_states", array, {})
    loaded = load_file(tmp_path / "shard.safetensors")["hidden_states"]
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, array.astype(np.float32))


def test_a_mapped_tensor_reads_as_the_safetensors_library_reads_it(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "two.safetensors"
    first = np.random.default_rng(1).standard_normal((4, 2, 3)).astype(np.float32)
    save_file({"other": np.ones((5,), dtype=np.float32), "hidden_states": first}, str(path), metadata={"a": "b"})
    mapped = arrays.mapped(path, "hidden_states")
    assert mapped.shape == (4, 2, 3)
    np.testing.assert_array_equal(mapped[[3, 0], 1], first[[3, 0], 1])


def test_a_mapped_tensor_that_is_not_float32_is_refused(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "halves.safetensors"
    save_file({"hidden_states": np.ones((2, 2), dtype=np.float16)}, str(path))
    with pytest.raises(ValueError, match="F16, not F32"):
        arrays.mapped(path, "hidden_states")
