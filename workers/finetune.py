"""The `finetune` job, `local` backend: LoRA on this worker's device (`workers/finetuning.py`),
checkpointed into the store so that a retried attempt resumes, then the adapter registered
as an import registers one, with the fine-tune's provenance.

Memory: the run loads its own copy of the base (LoRA layers are injected into the model
they train, so the resident, shared copy is never used), after making room for the base
and the LoRA weights, gradients and AdamW moments; once the examples are known, the
activations of the longest batch are added to the estimate, and a run that does not fit
the worker's budget fails with `over_memory_budget` before its first step.
"""

import json
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import update

from app.job_kinds import FinetuneParameters
from app.registry.datasets import read_rows
from app.registry.tables import Dataset, Finetune, Model, utcnow
from workers.adapters.convert import model_base_modules
from workers.adapters.importer import AdapterRecord, register_adapter
from workers.context import subject_row
from workers.errors import JobCancelled, JobFailed
from workers.model_footprint import estimate_footprint
from workers.model_loading import TORCH_DTYPES, load_model

if TYPE_CHECKING:
    from workers.context import JobContext
    from workers.finetuning import LoraTraining

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.safetensors"
PROGRESS_FILE = "progress.json"
HISTORY_FILE = "history.json"
# bytes per trainable LoRA parameter while training: float32 weight, gradient, two AdamW moments
LORA_TRAINING_BYTES = 16
# activations kept for the backward pass, per token, layer and unit of width: a rough bound for
# decoder blocks (attention inputs and outputs, the MLP's wider intermediates, norms, residuals)
ACTIVATION_WIDTHS = 24


def _checkpoint_prefix(finetune: Finetune, step: int) -> str:
    return f"{finetune.artifact}/{CHECKPOINTS}/step-{step:09d}"


def latest_checkpoint(store: Any, finetune: Finetune) -> int | None:
    """The last step a complete checkpoint of this fine-tune holds (both of its files)."""
    files: dict[int, set[str]] = {}
    for stored in store.iter_objects(f"{finetune.artifact}/{CHECKPOINTS}"):
        match = re.search(r"/step-(\d{9})/([^/]+)$", stored.key)
        if match and not stored.partial:
            files.setdefault(int(match.group(1)), set()).add(match.group(2))
    complete = [step for step, names in files.items() if {STATE_FILE, PROGRESS_FILE} <= names]
    return max(complete, default=None)


def _save_checkpoint(
    context: "JobContext[FinetuneParameters]",
    finetune: Finetune,
    training: "LoraTraining",
    progress: dict[str, Any],
    scratch: Path,
) -> None:
    from safetensors.torch import save_file

    store = context.runtime.artifacts
    step = progress["step"]
    folder = scratch / f"checkpoint-{step}"
    folder.mkdir()
    save_file(training.state_tensors(), str(folder / STATE_FILE))
    (folder / PROGRESS_FILE).write_text(json.dumps(progress))
    earlier = latest_checkpoint(store, finetune)
    store.publish_folder(_checkpoint_prefix(finetune, step), folder)
    if earlier is not None and earlier != step:
        store.delete_prefix(_checkpoint_prefix(finetune, earlier))


def _load_checkpoint(store: Any, finetune: Finetune, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
    from safetensors.torch import load_file

    folder = store.local_folder(_checkpoint_prefix(finetune, step))
    return load_file(str(folder / STATE_FILE)), json.loads((folder / PROGRESS_FILE).read_text())


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def _lora_parameters(model: Model, targets: list[str] | None, r: int) -> int:
    """Trainable parameters LoRA adds: r × (in + out) for each targeted linear of the blocks
    (every one of them when `targets` is None), from the base's module shapes."""
    linears = model_base_modules(model).linears
    in_blocks = {name: shape for name, shape in linears.items() if any(part.isdigit() for part in name.split("."))}
    chosen = [shape for name, shape in in_blocks.items() if targets is None or name.rsplit(".", 1)[-1] in targets]
    return sum(r * (rows + columns) for rows, columns in chosen)


def run(context: "JobContext[FinetuneParameters]") -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    from workers.finetuning import LoraTraining, Schedule, held_out, total_steps, training_examples
    from workers.hidden_states import block_linear_names

    worker = context.runtime
    store, sessions, models = worker.artifacts, worker.sessions, worker.models
    with sessions() as session:
        finetune = subject_row(session, Finetune, context.params.finetune_id, "fine-tune")
        model = subject_row(session, Model, finetune.base_model_id, "model")
        dataset = subject_row(session, Dataset, finetune.dataset_id, "dataset")
    lora, settings = finetune.settings["lora"], finetune.settings["training"]
    context.progress("loading", 0, None)
    base_bytes = estimate_footprint(model, models.budget_bytes)
    lora_bytes = _lora_parameters(model, lora["target_modules"], lora["r"]) * LORA_TRAINING_BYTES
    what = f"fine-tuning model {model.name!r} ({model.id}) with LoRA rank {lora['r']} needs about"
    models.reserve(base_bytes + lora_bytes, what)
    loaded = load_model(model, models.device)
    device = models.device
    try:
        rows = read_rows(store, dataset)
        built = training_examples(loaded.tokenizer, dataset.kind, rows, finetune.prompt_format, settings["max_length"])
        if not built.examples:
            raise JobFailed(
                "no_examples",
                f"every example is longer than max_length {settings['max_length']} tokens",
                left_out=built.left_out,
            )
        longest = max(len(example.token_ids) for example in built.examples)
        itemsize = getattr(torch, TORCH_DTYPES[model.dtype]).itemsize
        activations = (
            settings["batch_size"] * longest * model.num_layers * model.hidden_size * itemsize * ACTIVATION_WIDTHS
        )
        models.reserve(loaded.footprint_bytes + lora_bytes + activations, what)

        train_ids, validation_ids = held_out(len(built.examples), settings["validation_fraction"], settings["seed"])
        if not train_ids:
            raise JobFailed("no_examples", "no example is left to train on once the validation fraction is held out")
        targets = lora["target_modules"] or block_linear_names(loaded.model)
        available = block_linear_names(loaded.model)
        unknown = [name for name in targets if name not in available]
        if unknown:
            raise JobFailed(
                "invalid_target_modules",
                f"lora.target_modules: the model has no linear layer {unknown[0]!r} in its blocks; it has "
                f"{', '.join(available)}",
                field="lora.target_modules",
            )
        torch.manual_seed(settings["seed"])
        peft_model = get_peft_model(
            loaded.model,
            LoraConfig(
                r=lora["r"], lora_alpha=lora["lora_alpha"], lora_dropout=lora["dropout"], target_modules=targets
            ),
        )
        schedule = Schedule(
            steps=total_steps(settings, len(train_ids)),
            batch_size=settings["batch_size"],
            accumulation=settings["gradient_accumulation_steps"],
            learning_rate=settings["learning_rate"],
            lr_schedule=settings["lr_schedule"],
            warmup_steps=settings["warmup_steps"],
            seed=settings["seed"],
        )
        pad_id = next((t for t in (loaded.tokenizer.pad_token_id, loaded.tokenizer.eos_token_id) if t is not None), 0)
        training = LoraTraining(
            model=peft_model,
            train=[built.examples[i] for i in train_ids],
            validation=[built.examples[i] for i in validation_ids],
            schedule=schedule,
            device=device,
            pad_id=pad_id,
            weight_decay=settings["weight_decay"],
            max_grad_norm=settings.get("max_grad_norm", 1.0),
        )
        resolved = {"lora": lora | {"target_modules": targets}, "training": settings | {"steps": schedule.steps}}
        with sessions() as session, session.begin():
            session.execute(update(Finetune).where(Finetune.id == finetune.id).values(settings=resolved))
        return _train(context, finetune, model, dataset, training, resolved, built.left_out, len(rows))
    except JobCancelled:
        store.delete_prefix(f"{finetune.artifact}/{CHECKPOINTS}")
        raise
    finally:
        del loaded
        import gc

        gc.collect()


def _train(
    context: "JobContext[FinetuneParameters]",
    finetune: Finetune,
    model: Model,
    dataset: Dataset,
    training: "LoraTraining",
    resolved: dict[str, Any],
    left_out: int,
    rows: int,
) -> dict[str, Any]:
    store, sessions = context.runtime.artifacts, context.runtime.sessions
    settings = resolved["training"]
    schedule = training.schedule
    points: list[dict[str, Any]] = []
    resumed_from = latest_checkpoint(store, finetune)
    if resumed_from is not None:
        tensors, saved = _load_checkpoint(store, finetune, resumed_from)
        training.restore(tensors)
        points = saved["points"]
    first = resumed_from or 0
    started = time.monotonic()
    tokens = 0
    with context.scratch() as scratch:
        for step in range(first, schedule.steps):
            result = training.step(step)
            tokens += result.tokens
            point: dict[str, Any] = {
                "step": result.step,
                "loss": result.loss,
                "learning_rate": result.learning_rate,
                "tokens": result.tokens,
            }
            if result.step % settings["validation_every"] == 0 or result.step == schedule.steps:
                point["validation_loss"] = training.validation_loss()
            points.append(point)
            details = {key: value for key, value in point.items() if key != "step"}
            context.progress("training", result.step, schedule.steps, details)
            if result.step % settings["checkpoint_every"] == 0 and result.step < schedule.steps:
                _save_checkpoint(context, finetune, training, {"step": result.step, "points": points}, scratch)
        seconds = time.monotonic() - started
        context.progress("registering", schedule.steps, schedule.steps, {"final_loss": points[-1]["loss"]})
        validation = [point["validation_loss"] for point in points if point.get("validation_loss") is not None]
        summary = {
            "examples": {
                "rows": rows,
                "train": len(training.train),
                "validation": len(training.validation),
                "left_out": left_out,
            },
            "steps": schedule.steps,
            "resumed_from_step": resumed_from,
            "final_loss": points[-1]["loss"],
            "final_validation_loss": validation[-1] if validation else None,
            "best_validation_loss": min(validation) if validation else None,
            "completion_tokens_per_s": round(tokens / seconds, 1) if seconds > 0 and tokens else None,
        }
        store.write_bytes(f"{finetune.artifact}/{HISTORY_FILE}", json.dumps({"points": points}).encode())
        files = scratch / "adapter"
        training.model.save_pretrained(str(files))
        provenance = {
            "finetune": {
                "id": finetune.id,
                "job_id": context.job_id,
                "backend": finetune.backend,
                "base_model_id": model.id,
                "base_model_fingerprint": model.fingerprint,
                "dataset_id": dataset.id,
                "dataset_sha256": dataset.sha256,
                "prompt_format": finetune.prompt_format,
                "settings": resolved,
                "final_loss": summary["final_loss"],
                "final_validation_loss": summary["final_validation_loss"],
                "best_validation_loss": summary["best_validation_loss"],
                "history": f"/v1/finetunes/{finetune.id}/history",
            }
        }
        record = AdapterRecord(name=finetune.name, source_kind="finetune", source=finetune.id, provenance=provenance)
        adapter, created, _ = register_adapter(context, model, files, scratch, record)
        shutil.rmtree(files, ignore_errors=True)
    with sessions() as session, session.begin():
        session.execute(
            update(Finetune)
            .where(Finetune.id == finetune.id)
            .values(adapter_id=adapter.id, summary=summary, finished_at=utcnow())
        )
    store.delete_prefix(f"{finetune.artifact}/{CHECKPOINTS}")
    return {"finetune_id": finetune.id, "adapter_id": adapter.id, "created": created, **summary}
