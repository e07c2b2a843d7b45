"""A worker reads a model folder as hostile input: special files fail the job instead of
blocking it, a config whose sizes pass the service's bounds is refused before anything is
built from it, and safetensors headers are believed only as far as the file backs them."""

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from app.inputs.model_configs import MAX_HIDDEN_SIZE, MAX_INTERMEDIATE_SIZE, MAX_LAYERS
from app.inputs.model_sources import ModelShape, resolve_source
from app.registry.models import new_model
from app.registry.tables import Model
from tests import tiny_models
from tests.api.test_models import answered
from workers.errors import JobFailed
from workers.model_footprint import SAFETENSORS_HEADER_MAX_BYTES, estimate_footprint, parameter_floor
from workers.model_loading import load_model
from workers.resident_models import ResidentModels


@pytest.fixture(scope="module")
def llama_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.save_tiny_llama(tmp_path_factory.mktemp("template") / "llama")


@pytest.fixture
def folder(llama_template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(llama_template, tmp_path / "llama"))


def unchecked_row(folder: Path, quantization: str | None = None) -> Model:
    """A model row for `folder` as registration left it: the folder may change afterwards,
    so the row says nothing about what the worker will find there now."""
    shape = ModelShape(architecture="LlamaForCausalLM", model_type="llama", num_layers=2, hidden_size=16)
    return new_model(
        folder.name, resolve_source(str(folder), None), None, "float32", quantization, shape, "fingerprint"
    )


def with_config(folder: Path, **changes: Any) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return config


def fifo_in_place_of(path: Path) -> Path:
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


def job_failure(call: Callable[[], Any], fifos: list[Path] | None = None) -> JobFailed:
    """The JobFailed `call` raises, which it must do without blocking."""

    def outcome() -> Any:
        try:
            return call()
        except JobFailed as failure:
            return failure

    failure = answered(outcome, fifos)
    assert isinstance(failure, JobFailed), f"expected the job to fail, got {failure!r}"
    return failure


def without_safetensors(folder: Path) -> Path:
    """The folder with its weights pickled instead, so the estimate must come from its config."""
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


# --- Special files ---------------------------------------------------------------------


def test_a_fifo_named_model_safetensors_fails_the_estimate_with_a_clear_code(folder: Path) -> None:
    fifo = fifo_in_place_of(folder / "model.safetensors")
    failure = job_failure(lambda: estimate_footprint(unchecked_row(folder)), [fifo])
    assert failure.code == "model_file_not_regular"
    assert failure.details == {"file": "model.safetensors"} and "FIFO" in failure.message


def test_a_fifo_named_as_the_shard_index_fails_the_estimate_with_a_clear_code(folder: Path) -> None:
    fifo = fifo_in_place_of(folder / "model.safetensors.index.json")
    failure = job_failure(lambda: estimate_footprint(unchecked_row(folder)), [fifo])
    assert failure.code == "model_file_not_regular" and failure.details["file"] == "model.safetensors.index.json"


def test_a_config_json_that_is_a_fifo_fails_the_load_with_a_clear_code(folder: Path) -> None:
    fifo = fifo_in_place_of(folder / "config.json")
    failure = job_failure(lambda: load_model(unchecked_row(folder), "cpu"), [fifo])
    assert failure.code == "model_file_not_regular" and failure.details["file"] == "config.json"


def test_a_tokenizer_file_that_is_a_fifo_fails_the_load_before_transformers_opens_it(folder: Path) -> None:
    fifo = fifo_in_place_of(folder / "tokenizer.json")
    failure = job_failure(lambda: load_model(unchecked_row(folder), "cpu"), [fifo])
    assert failure.code == "model_file_not_regular" and failure.details["file"] == "tokenizer.json"


def test_a_weights_file_linked_to_a_device_fails_the_job_without_reading_it(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to("/dev/zero")
    failure = job_failure(lambda: ResidentModels(budget_bytes=10**9, device="cpu").get(unchecked_row(folder)))
    assert failure.code == "model_file_not_regular" and "character device" in failure.message


# --- Safetensors headers ---------------------------------------------------------------


def write_safetensors(path: Path, header: dict[str, Any], data: bytes, claimed_length: int | None = None) -> Path:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded) if claimed_length is None else claimed_length) + encoded + data)
    return path


def test_a_header_length_past_its_bound_is_refused_without_reading_it(folder: Path) -> None:
    write_safetensors(folder / "model.safetensors", {}, b"", claimed_length=SAFETENSORS_HEADER_MAX_BYTES + 1)
    failure = job_failure(lambda: estimate_footprint(unchecked_row(folder)))
    assert failure.code == "model_load_failed" and "SAFETENSORS_HEADER_MAX_BYTES" in failure.message


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [10**9, 10**9], "data_offsets": [0, 16]},
        {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 10**12]},
        {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]},
        {"dtype": "NOPE", "shape": [2, 2], "data_offsets": [0, 16]},
        {"dtype": "F32", "shape": "2x2", "data_offsets": [0, 16]},
    ],
    ids=["huge-shape", "range-past-the-end", "negative-shape", "unknown-dtype", "malformed"],
)
def test_a_tensor_whose_shape_the_file_does_not_back_is_refused(folder: Path, entry: dict[str, Any]) -> None:
    write_safetensors(folder / "model.safetensors", {"model.embed_tokens.weight": entry}, bytes(16))
    failure = job_failure(lambda: estimate_footprint(unchecked_row(folder)))
    assert failure.code == "model_load_failed" and "does not match its byte range" in failure.message


def test_tensors_claiming_the_same_bytes_are_refused(folder: Path) -> None:
    entry = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    write_safetensors(folder / "model.safetensors", {"a.weight": entry, "b.weight": entry}, bytes(16))
    failure = job_failure(lambda: estimate_footprint(unchecked_row(folder)))
    assert failure.code == "model_load_failed" and "overlap" in failure.message


@pytest.mark.parametrize("shard", ["../elsewhere/model.safetensors", "/etc/passwd"])
def test_a_shard_index_naming_a_file_outside_the_folder_is_refused(folder: Path, shard: str) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    failure = job_failure(lambda: estimate_footprint(unchecked_row(folder)))
    assert failure.code == "model_load_failed" and "outside the model folder" in failure.message


# --- Absurd configs --------------------------------------------------------------------


@pytest.mark.parametrize("quantization", [None, "8bit"])
def test_a_config_past_the_size_bounds_is_refused_before_anything_is_built(
    folder: Path, quantization: str | None
) -> None:
    with_config(without_safetensors(folder), num_hidden_layers=10**9)
    failure = job_failure(lambda: estimate_footprint(unchecked_row(folder, quantization)))
    assert failure.code == "unsupported_model"
    assert failure.details == {"config_key": "num_hidden_layers", "bound": MAX_LAYERS}


def test_a_config_past_the_size_bounds_also_fails_a_direct_load(folder: Path) -> None:
    with_config(folder, hidden_size=10**9)
    failure = job_failure(lambda: load_model(unchecked_row(folder), "cpu"))
    assert failure.code == "unsupported_model" and failure.details["config_key"] == "hidden_size"


def test_a_config_whose_arithmetic_passes_the_budget_is_estimated_from_it_without_a_build(folder: Path) -> None:
    config = with_config(
        without_safetensors(folder),
        num_hidden_layers=MAX_LAYERS,
        hidden_size=MAX_HIDDEN_SIZE,
        intermediate_size=MAX_INTERMEDIATE_SIZE,
    )
    floor_bytes = parameter_floor(config) * 4  # float32
    assert (
        estimate_footprint(unchecked_row(folder), budget_bytes=2**30) == floor_bytes
    )  # the floor itself: no model was built
    failure = job_failure(lambda: ResidentModels(budget_bytes=2**30, device="cpu").get(unchecked_row(folder)))
    assert failure.code == "over_memory_budget" and failure.details["needed_bytes"] == floor_bytes


@pytest.mark.parametrize(
    "save",
    [
        tiny_models.save_tiny_llama,
        lambda path: tiny_models.save_tiny_llama(path, tied=True),
        tiny_models.save_tiny_qwen2,
        tiny_models.save_tiny_gpt2,
        tiny_models.save_tiny_bert,
    ],
    ids=["llama", "llama-tied", "qwen2", "gpt2", "bert"],
)
def test_the_parameter_floor_is_below_the_real_parameter_count(tmp_path: Path, save: Callable[[Path], Path]) -> None:
    folder = save(tmp_path / "model")
    loaded = load_model(unchecked_row(folder), "cpu")
    assert 0 < parameter_floor(json.loads((folder / "config.json").read_text())) <= loaded.parameter_count


def test_within_the_budget_the_estimate_still_comes_from_the_model_built_empty(folder: Path) -> None:
    row = unchecked_row(without_safetensors(folder))
    assert (
        estimate_footprint(row, budget_bytes=10**9)
        == estimate_footprint(row)
        == pytest.approx(load_model(row, "cpu").footprint_bytes, rel=0.01)
    )
