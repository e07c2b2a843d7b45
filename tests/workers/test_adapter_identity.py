"""An adapter is its weights and the config values that change its output: the same weights
with another lora_alpha (or use_rslora) are another adapter, with its own files, each
applying its own scale; the same weights and config are the same adapter."""

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from app.registry.tables import Adapter
from tests import tiny_models
from tests.workers.adapter_jobs import (  # noqa: F401 (fixtures)
    CONFIG,
    WEIGHTS,
    adapter_folder,
    import_job,
    model_id,
    settings,
    worker,
)
from workers import runtime
from workers.adapters import importer

IDS = torch.tensor([[1, 17, 5, 42, 9, 77, 3]])


def imported(worker: runtime.WorkerRuntime, model_id: str, folder: Path, attempt: int = 1) -> dict[str, Any]:
    return importer.run(import_job(worker, model_id, "local_folder", folder, attempt))


def stored(worker: runtime.WorkerRuntime, adapter_id: str) -> Path:
    with worker.sessions() as session:
        adapter = session.get(Adapter, adapter_id)
        assert adapter is not None
        return worker.artifacts.local_folder(adapter.artifact)


def with_peft(base: Path, adapter: Path) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()


def test_the_same_weights_with_another_lora_alpha_are_a_second_adapter_applying_its_own_scale(
    worker: runtime.WorkerRuntime, model_id: str, tiny_llama: Path, tmp_path: Path
) -> None:
    eight = adapter_folder(tmp_path / "alpha-8", tiny_llama, lora_alpha=8)
    thirty_two = adapter_folder(tmp_path / "alpha-32", tiny_llama, lora_alpha=32)
    assert (eight / WEIGHTS).read_bytes() == (thirty_two / WEIGHTS).read_bytes()
    first, second = imported(worker, model_id, eight), imported(worker, model_id, thirty_two)
    assert first["created"] and second["created"] and first["adapter_id"] != second["adapter_id"]
    assert first["sha256"] == second["sha256"] and first["identity"] != second["identity"]
    tensors = load_file(eight / WEIGHTS)
    for result, alpha in ((first, 8), (second, 32)):
        folder = stored(worker, result["adapter_id"])
        assert json.loads((folder / CONFIG).read_text())["lora_alpha"] == alpha
        with torch.inference_mode():
            got = with_peft(tiny_llama, folder)(IDS).logits
            expected = tiny_models.merge_by_hand(tiny_llama, tensors, lora_alpha=alpha)(IDS).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_the_same_weights_and_config_again_are_the_existing_adapter(
    worker: runtime.WorkerRuntime, model_id: str, tiny_llama: Path, tmp_path: Path
) -> None:
    folder = adapter_folder(tmp_path / "adapter", tiny_llama, lora_alpha=8, lora_dropout=0.1)
    first = imported(worker, model_id, folder)
    (folder / CONFIG).write_text(
        json.dumps({"lora_alpha": 8.0, "r": 4, "lora_dropout": 0.0})
    )  # nothing that changes the output
    second = imported(worker, model_id, folder)
    assert second["adapter_id"] == first["adapter_id"] and second["created"] is False


def test_use_rslora_is_kept_and_makes_another_adapter(
    worker: runtime.WorkerRuntime, model_id: str, tiny_llama: Path, tmp_path: Path
) -> None:
    plain = imported(worker, model_id, adapter_folder(tmp_path / "plain", tiny_llama))
    rank_stabilised = imported(worker, model_id, adapter_folder(tmp_path / "rslora", tiny_llama, use_rslora=True))
    assert plain["identity"] != rank_stabilised["identity"]
    assert json.loads((stored(worker, rank_stabilised["adapter_id"]) / CONFIG).read_text())["use_rslora"] is True
    assert json.loads((stored(worker, plain["adapter_id"]) / CONFIG).read_text())["use_rslora"] is False


def test_a_retried_attempt_removes_the_scratch_folders_earlier_attempts_left(
    worker: runtime.WorkerRuntime, model_id: str, tiny_llama: Path, tmp_path: Path
) -> None:
    context = import_job(worker, model_id, "local_folder", adapter_folder(tmp_path / "adapter", tiny_llama), attempt=3)
    left = [worker.artifacts.scratch_root / f"{context.job_id}-{attempt}" for attempt in (1, 2)]
    for folder in left:
        (folder / "files").mkdir(parents=True)
        (folder / "files" / "half-written.safetensors").write_bytes(b"\0" * 1024)
    other_job = worker.artifacts.scratch_root / "job_other-1"
    other_job.mkdir(parents=True)
    assert importer.run(context)["created"]
    assert not any(folder.exists() for folder in left)
    assert other_job.exists(), "another job's scratch was touched"
