"""A model's footprint, and what attaching an adapter adds to it, are estimated from their
files without loading them, close to what they take once loaded."""

import shutil
from pathlib import Path

import pytest

from app.model_sources import fingerprint, read_model_shape, resolve_source
from app.registry.models import new_model
from app.registry.tables import Model
from tests import tiny_models
from workers.adapters.convert import base_modules, convert, read_config
from workers.models import (
    ResidentModels,
    estimate_adapter_footprint,
    estimate_footprint,
    load_model,
)


@pytest.fixture(scope="module")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three tiny Llamas, each larger than the two before it together."""
    root = tmp_path_factory.mktemp("llamas")
    return {name: tiny_models.save_tiny_llama(root / name, hidden_size=width) for name, width in (("small", 16), ("medium", 32), ("large", 48))}


def registered(folder: Path, dtype: str = "float32", quantization: str | None = None) -> Model:
    source = resolve_source(str(folder), None)
    return new_model(folder.name, source, None, dtype, quantization, read_model_shape(source.path), fingerprint(source))


def peft_adapter(tmp_path: Path, base: Path, r: int = 4) -> Path:
    """A LoRA adapter for `base`, as the service stores one: a Tinker export converted to PEFT."""
    export, destination = tmp_path / f"tinker-{base.name}-{r}", tmp_path / f"peft-{base.name}-{r}"
    tiny_models.save_tinker_adapter(export, base, r=r)
    destination.mkdir()
    convert(export / "adapter_model.safetensors", read_config(export / "adapter_config.json"), base_modules(str(base)), destination, str(base))
    return destination


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_the_estimate_from_safetensors_headers_is_the_loaded_footprint(llamas: dict[str, Path], dtype: str) -> None:
    row = registered(llamas["medium"], dtype)
    assert estimate_footprint(row) == pytest.approx(load_model(row, "cpu").footprint_bytes, rel=0.01)


def test_a_sharded_checkpoint_is_estimated_from_the_shards_its_index_names(llamas: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder = Path(shutil.copytree(llamas["medium"], tmp_path / "sharded"))
    (folder / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(llamas["medium"]).save_pretrained(folder, max_shard_size="40KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    shutil.copy(shards[0], folder / "consolidated.safetensors")  # some repositories ship a copy transformers ignores
    row = registered(folder)
    assert estimate_footprint(row) == pytest.approx(load_model(row, "cpu").footprint_bytes, rel=0.01)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_without_safetensors_weights_the_estimate_comes_from_the_config(llamas: dict[str, Path], tmp_path: Path, dtype: str) -> None:
    import torch
    from safetensors.torch import load_file

    folder = Path(shutil.copytree(llamas["medium"], tmp_path / "pickled"))
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    row = registered(folder, dtype)
    assert estimate_footprint(row) == pytest.approx(load_model(row, "cpu").footprint_bytes, rel=0.01)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_a_quantized_estimate_counts_the_quantized_layers_at_their_width(tmp_path: Path, quantization: str, tied: bool) -> None:
    pytest.importorskip("bitsandbytes")
    folder = tiny_models.save_tiny_llama(tmp_path / "wide", hidden_size=64, tied=tied)  # bitsandbytes' CPU kernels want multiples of 32
    row = registered(folder, quantization=quantization)
    real = load_model(row, "cpu").footprint_bytes
    assert real < 0.5 * estimate_footprint(registered(folder))
    assert estimate_footprint(row) == pytest.approx(real, rel=0.01)


def test_the_adapter_estimate_is_what_attaching_it_adds(llamas: dict[str, Path], tmp_path: Path) -> None:
    adapter = peft_adapter(tmp_path, llamas["small"])
    for dtype in ("float32", "bfloat16"):  # PEFT keeps LoRA weights in float32 either way
        resident = ResidentModels(budget_bytes=10**9, device="cpu")
        base_bytes = resident.get(registered(llamas["small"], dtype)).footprint_bytes
        attached = resident.get(registered(llamas["small"], dtype), ("adp_one", adapter))
        assert attached.footprint_bytes - base_bytes == pytest.approx(estimate_adapter_footprint(adapter), rel=0.01)
