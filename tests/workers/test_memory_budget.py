"""A worker's resident models stay within its memory budget: room is made before a model
loads or an adapter attaches, from an estimate of its footprint read off its files, and what
cannot fit fails its job without disturbing the models already resident."""

import shutil
from pathlib import Path
from typing import Any

import pytest

from app.inputs.model_sources import fingerprint, read_model_shape, resolve_source
from app.registry.models import new_model
from app.registry.tables import Model
from app.settings import Settings
from tests import tiny_models
from tests.api.test_jobs import run_queued_jobs
from tests.api.test_models import register
from workers import resident_models
from workers.adapters.convert import base_modules, convert, read_config
from workers.errors import JobFailed
from workers.model_footprint import estimate_adapter_footprint, estimate_footprint
from workers.model_loading import load_model
from workers.resident_models import ResidentModels

# What the real footprint may add to an estimate read from safetensors headers: the buffers
# a model computes rather than stores (a tiny Llama's rotary frequencies, 32 bytes).
BUFFER_SLACK = 1024


@pytest.fixture(scope="module")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three tiny Llamas, each larger than the two before it together."""
    root = tmp_path_factory.mktemp("llamas")
    return {
        name: tiny_models.save_tiny_llama(root / name, hidden_size=width)
        for name, width in (("small", 16), ("medium", 32), ("large", 48))
    }


def registered(folder: Path, dtype: str = "float32", quantization: str | None = None) -> Model:
    source = resolve_source(str(folder), None)
    return new_model(folder.name, source, None, dtype, quantization, read_model_shape(source.path), fingerprint(source))


def peft_adapter(tmp_path: Path, base: Path, r: int = 4) -> Path:
    """A LoRA adapter for `base`, as the service stores one: a Tinker export converted to PEFT."""
    export, destination = tmp_path / f"tinker-{base.name}-{r}", tmp_path / f"peft-{base.name}-{r}"
    tiny_models.save_tinker_adapter(export, base, r=r)
    destination.mkdir()
    convert(
        export / "adapter_model.safetensors",
        read_config(export / "adapter_config.json"),
        base_modules(str(base)),
        destination,
        str(base),
    )
    return destination


def without_tensor(source: Path, destination: Path, name: str) -> Path:
    """A copy of the model in `source` whose checkpoint lacks one tensor, which transformers
    then initializes on load: the model loads larger than its checkpoint says."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, destination)
    tensors = load_file(destination / "model.safetensors")
    del tensors[name]
    save_file(tensors, destination / "model.safetensors", metadata={"format": "pt"})
    return destination


def record_loads(monkeypatch: pytest.MonkeyPatch, resident: ResidentModels) -> list[tuple[str, list[str]]]:
    """(model loaded, models resident at that moment) for every real load."""
    seen: list[tuple[str, list[str]]] = []

    def recording_load(row: Model, device: str) -> Any:
        seen.append((row.id, [entry["model_id"] for entry in resident.describe()]))
        return load_model(row, device)

    monkeypatch.setattr(resident_models, "load_model", recording_load)
    return seen


def resident_ids(resident: ResidentModels) -> list[str]:
    return [entry["model_id"] for entry in resident.describe()]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_the_estimate_from_safetensors_headers_is_the_loaded_footprint(llamas: dict[str, Path], dtype: str) -> None:
    row = registered(llamas["medium"], dtype)
    assert estimate_footprint(row) == pytest.approx(load_model(row, "cpu").footprint_bytes, rel=0.01)


def test_a_sharded_checkpoint_is_estimated_from_the_shards_its_index_names(
    llamas: dict[str, Path], tmp_path: Path
) -> None:
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
def test_without_safetensors_weights_the_estimate_comes_from_the_config(
    llamas: dict[str, Path], tmp_path: Path, dtype: str
) -> None:
    import torch
    from safetensors.torch import load_file

    folder = Path(shutil.copytree(llamas["medium"], tmp_path / "pickled"))
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    row = registered(folder, dtype)
    assert estimate_footprint(row) == pytest.approx(load_model(row, "cpu").footprint_bytes, rel=0.01)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_a_quantized_estimate_counts_the_quantized_layers_at_their_width(
    tmp_path: Path, quantization: str, tied: bool
) -> None:
    pytest.importorskip("bitsandbytes")
    folder = tiny_models.save_tiny_llama(
        tmp_path / "wide", hidden_size=64, tied=tied
    )  # bitsandbytes' CPU kernels want multiples of 32
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


def test_the_least_recently_used_model_is_evicted_before_the_next_one_loads(
    llamas: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    small, medium, large = (registered(llamas[name]) for name in ("small", "medium", "large"))
    resident = ResidentModels(
        budget_bytes=estimate_footprint(small) + estimate_footprint(large) + BUFFER_SLACK, device="cpu"
    )
    loads = record_loads(monkeypatch, resident)
    for row in (small, medium, small, large):  # small again, so medium is the least recent
        resident.get(row)
        assert resident.used_bytes <= resident.budget_bytes
    assert loads == [(small.id, []), (medium.id, [small.id]), (large.id, [small.id])]
    assert resident_ids(resident) == [small.id, large.id]
    assert resident.loads == 3


def test_a_model_larger_than_the_whole_budget_fails_and_leaves_the_resident_ones(
    llamas: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    small, medium, large = (registered(llamas[name]) for name in ("small", "medium", "large"))
    resident = ResidentModels(
        budget_bytes=estimate_footprint(small) + estimate_footprint(medium) + BUFFER_SLACK, device="cpu"
    )
    loads = record_loads(monkeypatch, resident)
    resident.get(small)
    resident.get(medium)
    with pytest.raises(JobFailed) as failure:
        resident.get(large)
    assert failure.value.code == "over_memory_budget"
    assert failure.value.details == {
        "needed_bytes": estimate_footprint(large),
        "budget_bytes": resident.budget_bytes,
        "setting": "WORKER_MEMORY_BUDGET_MB",
    }
    assert "WORKER_MEMORY_BUDGET_MB" in failure.value.message and large.id in failure.value.message
    assert [model_id for model_id, _ in loads] == [small.id, medium.id]
    assert resident_ids(resident) == [small.id, medium.id] and resident.loads == 2


def test_an_adapter_that_does_not_fit_beside_the_others_evicts_another_model_before_attaching(
    llamas: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small, medium = registered(llamas["small"]), registered(llamas["medium"])
    adapter = peft_adapter(tmp_path, llamas["small"])
    adapter_bytes = estimate_adapter_footprint(adapter)
    assert adapter_bytes > BUFFER_SLACK
    resident = ResidentModels(
        budget_bytes=estimate_footprint(small) + estimate_footprint(medium) + BUFFER_SLACK, device="cpu"
    )
    resident.get(small)
    resident.get(medium)
    resident_at_attach: list[list[str]] = []
    real_attach = resident_models.attach_adapter

    def recording_attach(loaded: Any, adapter_id: str, folder: Path) -> None:
        resident_at_attach.append(resident_ids(resident))
        real_attach(loaded, adapter_id, folder)

    monkeypatch.setattr(resident_models, "attach_adapter", recording_attach)
    base_bytes = resident.describe()[0]["bytes"]
    loaded = resident.get(small, ("adp_one", adapter))
    assert resident_at_attach == [[small.id]], "the other model must be evicted before the adapter attaches"
    assert resident.describe() == [{"model_id": small.id, "bytes": loaded.footprint_bytes, "adapters": ["adp_one"]}]
    assert loaded.footprint_bytes - base_bytes == pytest.approx(adapter_bytes, rel=0.01)
    assert resident.adapter_loads == 1 and resident.used_bytes <= resident.budget_bytes


def test_an_adapter_that_cannot_fit_beside_its_base_fails_and_evicts_nothing(
    llamas: dict[str, Path], tmp_path: Path
) -> None:
    small, large = registered(llamas["small"]), registered(llamas["large"])
    adapter = peft_adapter(tmp_path, llamas["large"], r=16)
    resident = ResidentModels(
        budget_bytes=estimate_footprint(small) + estimate_footprint(large) + BUFFER_SLACK, device="cpu"
    )
    assert estimate_footprint(large) + estimate_adapter_footprint(adapter) > resident.budget_bytes
    resident.get(small)
    resident.get(large)
    with pytest.raises(JobFailed) as failure:
        resident.get(large, ("adp_big", adapter))
    assert failure.value.code == "over_memory_budget" and "adp_big" in failure.value.message
    assert [(entry["model_id"], entry["adapters"]) for entry in resident.describe()] == [(small.id, []), (large.id, [])]
    assert resident.adapter_loads == 0


def test_a_model_that_loads_larger_than_its_estimate_evicts_more_after_loading(
    llamas: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    medium = registered(llamas["medium"])
    partial = registered(without_tensor(llamas["small"], tmp_path / "partial", "lm_head.weight"))
    full_size = estimate_footprint(registered(llamas["small"]))
    assert estimate_footprint(partial) < full_size
    resident = ResidentModels(
        budget_bytes=estimate_footprint(medium) + estimate_footprint(partial) + BUFFER_SLACK, device="cpu"
    )
    loads = record_loads(monkeypatch, resident)
    resident.get(medium)
    loaded = resident.get(partial)
    assert loads == [(medium.id, []), (partial.id, [medium.id])]
    assert loaded.footprint_bytes >= full_size
    assert resident_ids(resident) == [partial.id] and resident.used_bytes <= resident.budget_bytes


def test_a_model_that_loads_larger_than_the_whole_budget_is_dropped_and_fails(
    llamas: dict[str, Path], tmp_path: Path
) -> None:
    partial = registered(without_tensor(llamas["small"], tmp_path / "partial", "lm_head.weight"))
    resident = ResidentModels(budget_bytes=estimate_footprint(partial) + BUFFER_SLACK, device="cpu")
    with pytest.raises(JobFailed) as failure:
        resident.get(partial)
    assert failure.value.code == "over_memory_budget" and "once loaded" in failure.value.message
    assert resident.describe() == [] and resident.loads == 1


def test_a_model_check_beyond_the_budget_fails_the_model_with_the_setting_to_raise(
    api: Any, settings: Settings, tmp_path: Path
) -> None:
    folder = tiny_models.save_tiny_llama(tmp_path / "wide", hidden_size=256)  # about 4.8 MiB in float32
    model = register(api, folder).json()
    run_queued_jobs(settings.model_copy(update={"worker_memory_budget_mb": 1}))
    job = api.get(f"/v1/jobs/{model['check_job_id']}").json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "over_memory_budget"
    assert job["error"]["details"]["budget_bytes"] == 2**20 and job["error"]["details"]["needed_bytes"] > 4 * 2**20
    failed = api.get(f"/v1/models/{model['id']}").json()
    assert failed["status"] == "failed" and "WORKER_MEMORY_BUDGET_MB" in failed["status_reason"]
