"""GGUF models on a worker: loaded through transformers into the registered dtype, kept
dequantized in the worker's cache, sized without loading, and refused when the file is not
what was registered."""

import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from app.inputs.model_sources import fingerprint, resolve_source, source_shape
from app.registry.models import new_model
from app.registry.tables import Model
from tests.test_gguf import LLAMA_PAIRS, gguf_file, string_pair, u32_pair
from workers import gguf_models
from workers.errors import JobFailed
from workers.gguf_models import MANIFEST_NAME, cache_entry, dequantized_folder, intact_entry
from workers.model_footprint import estimate_footprint
from workers.model_loading import LoadedModel, load_model

pytestmark = pytest.mark.slow


def gguf_row(path: Path, dtype: str = "float32") -> Model:
    source = resolve_source(str(path), None)
    return new_model(path.name, source, None, dtype, None, source_shape(source), fingerprint(source))


@dataclass(frozen=True)
class FirstLoad:
    row: Model
    cache_dir: Path
    loaded: LoadedModel
    seconds: float


@pytest.fixture(scope="session")
def first_load(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> FirstLoad:
    """The SmolLM2 GGUF file loaded by a worker with an empty cache, once a session."""
    row = gguf_row(smollm2_gguf)
    cache_dir = tmp_path_factory.mktemp("gguf-cache")
    started = time.perf_counter()
    loaded = load_model(row, "cpu", cache_dir)
    return FirstLoad(row, cache_dir, loaded, time.perf_counter() - started)


def same_weights(model: Any, reference: Any) -> bool:
    ours, theirs = model.state_dict(), reference.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_a_gguf_model_loads_with_the_weights_transformers_dequantizes(
    first_load: FirstLoad,
    smollm2_gguf_model: Any,
) -> None:
    loaded = first_load.loaded
    assert loaded.is_causal_lm and type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.model.dtype == torch.float32
    assert same_weights(loaded.model, smollm2_gguf_model)
    assert loaded.tokenizer.chat_template
    print(f"first GGUF load: {first_load.seconds:.1f} s")


def test_the_first_load_leaves_a_dequantized_copy_the_next_load_comes_from(
    first_load: FirstLoad, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = cache_entry(first_load.cache_dir, first_load.row)
    assert entry.name == f"{first_load.row.fingerprint}-float32"
    assert {"config.json", "model.safetensors", "tokenizer.json", MANIFEST_NAME} <= {p.name for p in entry.iterdir()}
    assert [p.name for p in first_load.cache_dir.iterdir()] == [entry.name]  # no scratch folder left

    def never(*_: Any) -> None:
        raise AssertionError("the GGUF file was dequantized again")

    monkeypatch.setattr(gguf_models, "_write_dequantized", never)
    started = time.perf_counter()
    again = load_model(first_load.row, "cpu", first_load.cache_dir)
    seconds = time.perf_counter() - started
    assert same_weights(again.model, first_load.loaded.model)
    assert seconds < first_load.seconds / 4
    print(f"cached GGUF load: {seconds:.2f} s")


def test_a_folder_of_the_same_model_loads_in_about_the_time_of_the_cached_copy(
    first_load: FirstLoad, tmp_path: Path
) -> None:
    folder = tmp_path / "smollm2"
    shutil.copytree(cache_entry(first_load.cache_dir, first_load.row), folder)
    source = resolve_source(str(folder), None)
    row = new_model("folder", source, None, "float32", None, source_shape(source), fingerprint(source))
    started = time.perf_counter()
    loaded = load_model(row, "cpu")
    print(f"HF folder load: {time.perf_counter() - started:.2f} s")
    assert same_weights(loaded.model, first_load.loaded.model)


def test_a_damaged_cache_entry_is_ignored_and_rebuilt(
    first_load: FirstLoad, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = cache_entry(first_load.cache_dir, first_load.row)
    entry = cache_entry(tmp_path, first_load.row)
    shutil.copytree(good, entry)
    with (entry / "model.safetensors").open("r+b") as weights:
        weights.truncate(1000)
    assert not intact_entry(entry, first_load.row)
    builds = []

    def copy_of_the_good_entry(path: Path, dtype: Any, folder: Path) -> None:
        builds.append(path)
        shutil.copytree(good, folder, ignore=shutil.ignore_patterns(MANIFEST_NAME))

    monkeypatch.setattr(gguf_models, "_write_dequantized", copy_of_the_good_entry)
    assert dequantized_folder(first_load.row, torch.float32, tmp_path) == entry
    assert len(builds) == 1 and intact_entry(entry, first_load.row)
    assert (entry / "model.safetensors").stat().st_size == (good / "model.safetensors").stat().st_size


def test_a_build_that_fails_leaves_no_entry_and_no_scratch_folder(
    first_load: FirstLoad, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fails_halfway(path: Path, dtype: Any, folder: Path) -> None:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_models, "_write_dequantized", fails_halfway)
    with pytest.raises(JobFailed) as failed:
        dequantized_folder(first_load.row, torch.float32, tmp_path)
    assert failed.value.code == "model_load_failed" and "No space left" in failed.value.message
    assert list(tmp_path.iterdir()) == []


def test_the_footprint_of_a_gguf_model_is_estimated_without_loading_it(first_load: FirstLoad, tmp_path: Path) -> None:
    real = first_load.loaded.footprint_bytes
    assert estimate_footprint(first_load.row, gguf_cache_dir=tmp_path) == pytest.approx(real, rel=0.01)
    assert list(tmp_path.iterdir()) == []  # nothing was dequantized for it
    assert estimate_footprint(first_load.row, gguf_cache_dir=first_load.cache_dir) == pytest.approx(real, rel=0.01)


def test_a_file_changed_since_registration_is_refused_not_cached(
    smollm2_gguf: Path,
    tmp_path: Path,
) -> None:
    row = gguf_row(smollm2_gguf)
    row.fingerprint = hashlib.sha256(b"another file").hexdigest()
    with pytest.raises(JobFailed) as failed:
        load_model(row, "cpu", tmp_path)
    assert failed.value.code == "model_changed"
    assert list(tmp_path.iterdir()) == []


def rewritten_as_rwkv6(path: Path) -> Any:
    """The row of a Llama GGUF file registered at `path`, which is then rewritten as an RWKV-6
    file: an architecture transformers cannot load from GGUF."""
    path.write_bytes(gguf_file(LLAMA_PAIRS))
    row = gguf_row(path)
    pairs = [string_pair("general.architecture", "rwkv6"), u32_pair("rwkv6.block_count", 2)]
    path.write_bytes(gguf_file([*pairs, u32_pair("rwkv6.embedding_length", 16)]))
    return row


def test_a_gguf_file_rewritten_with_an_unsupported_architecture_fails_the_load(tmp_path: Path) -> None:
    row = rewritten_as_rwkv6(tmp_path / "model.gguf")
    with pytest.raises(JobFailed) as failed:
        load_model(row, "cpu", tmp_path / "cache")
    assert failed.value.code == "unsupported_model" and "rwkv6" in failed.value.message


def test_an_adapter_of_a_gguf_model_is_checked_against_the_module_shapes_of_the_loaded_model(
    first_load: FirstLoad, tmp_path: Path
) -> None:
    from tests.tiny_models import save_tinker_adapter
    from workers.adapters.convert import convert, model_base_modules, read_config

    modules = model_base_modules(first_load.row)
    model = first_load.loaded.model
    linears = {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert modules.linears == linears and modules.tied_embeddings
    assert modules.embeddings == {"model.embed_tokens": tuple(model.get_input_embeddings().weight.shape)}

    save_tinker_adapter(tmp_path / "tinker", model.config, a_scale=0.05, b_scale=0.01)
    peft = tmp_path / "peft"
    peft.mkdir()
    converted = convert(
        tmp_path / "tinker" / "adapter_model.safetensors",
        read_config(tmp_path / "tinker" / "adapter_config.json"),
        modules,
        peft,
        first_load.row.source,
    )
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # SmolLM2 ties its embeddings: the unembedding's LoRA goes on the input embedding
    assert set(converted.target_modules) == projections | {"embed_tokens"}
    assert any("tied input embedding" in note for note in converted.notes)


def test_an_adapter_import_refuses_a_gguf_base_rewritten_with_an_unsupported_architecture(tmp_path: Path) -> None:
    from workers.adapters.convert import model_base_modules

    row = rewritten_as_rwkv6(tmp_path / "model.gguf")
    with pytest.raises(JobFailed) as failed:
        model_base_modules(row)
    assert failed.value.code == "unsupported_model" and "rwkv6" in failed.value.message
