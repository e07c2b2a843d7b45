"""The `finetune` job: LoRA trained from a registered base and dataset, checkpointed so that a
retried attempt resumes, then the adapter registered as an import registers one, with the
fine-tune's provenance and its loss history.

Two backends build the same examples, hold out the same validation examples and follow the
same schedule (steps, data order, learning rate per step: `workers/finetuning.py`):

- `local`: PEFT on this worker's device; checkpoints are the LoRA weights and AdamW's state
  in the store.
- `tinker`: the steps run on Tinker (`workers/adapters/tinker_training.py`) over token ids
  the registered model's own tokenizer made (only the tokenizer is loaded here); checkpoints
  are Tinker training states (`save_state`), whose paths the store keeps
  (`checkpoints/tinker.json`) so that a retried attempt resumes from the last one with its
  optimizer state; at the end the adapter is exported, downloaded, its export deleted, and
  registered. The base must be one of Tinker's trainable models, matched by name as an
  import matches a checkpoint's base (`unsupported_base_model` before anything is created).

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import update

from app.job_kinds import FinetuneParameters
from app.registry.datasets import read_rows
from app.registry.tables import Dataset, Finetune, Model, utcnow
from workers.adapters.convert import model_base_modules
from workers.adapters.importer import AdapterRecord, names_match, register_adapter
from workers.context import subject_row
from workers.errors import JobCancelled, JobFailed
from workers.model_footprint import estimate_footprint
from workers.model_loading import TORCH_DTYPES, load_model, load_tokenizer

if TYPE_CHECKING:
    from workers.adapters.tinker import TinkerClient
    from workers.adapters.tinker_training import TinkerRun
    from workers.context import JobContext
    from workers.finetuning import Example, Examples, LoraTraining, Schedule

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.safetensors"
PROGRESS_FILE = "progress.json"
HISTORY_FILE = "history.json"
TINKER_CHECKPOINT_FILE = "tinker.json"
TINKER_ATTENTION = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
TINKER_MLP = frozenset({"gate_proj", "up_proj", "down_proj"})
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
    with context.runtime.sessions() as session:
        finetune = subject_row(session, Finetune, context.params.finetune_id, "fine-tune")
        model = subject_row(session, Model, finetune.base_model_id, "model")
        dataset = subject_row(session, Dataset, finetune.dataset_id, "dataset")
    if finetune.backend == "tinker":
        return _run_tinker(context, finetune, model, dataset)
    return _run_local(context, finetune, model, dataset)


def _examples(tokenizer: Any, dataset: Dataset, rows: list[dict[str, Any]], finetune: Finetune) -> "Examples":
    from workers.finetuning import training_examples

    max_length = finetune.settings["training"]["max_length"]
    built = training_examples(tokenizer, dataset.kind, rows, finetune.prompt_format, max_length)
    if not built.examples:
        raise JobFailed(
            "no_examples", f"every example is longer than max_length {max_length} tokens", left_out=built.left_out
        )
    return built


def _split(count: int, settings: dict[str, Any]) -> tuple[list[int], list[int]]:
    from workers.finetuning import held_out

    train_ids, validation_ids = held_out(count, settings["validation_fraction"], settings["seed"])
    if not train_ids:
        raise JobFailed("no_examples", "no example is left to train on once the validation fraction is held out")
    return train_ids, validation_ids


def _schedule(settings: dict[str, Any], train_examples: int) -> "Schedule":
    from workers.finetuning import Schedule, total_steps

    return Schedule(
        steps=total_steps(settings, train_examples),
        batch_size=settings["batch_size"],
        accumulation=settings["gradient_accumulation_steps"],
        learning_rate=settings["learning_rate"],
        lr_schedule=settings["lr_schedule"],
        warmup_steps=settings["warmup_steps"],
        seed=settings["seed"],
    )


def _record_resolved(context: "JobContext[FinetuneParameters]", finetune: Finetune, resolved: dict[str, Any]) -> None:
    with context.runtime.sessions() as session, session.begin():
        session.execute(update(Finetune).where(Finetune.id == finetune.id).values(settings=resolved))


def _run_local(
    context: "JobContext[FinetuneParameters]", finetune: Finetune, model: Model, dataset: Dataset
) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    from workers.finetuning import LoraTraining
    from workers.hidden_states import block_linear_names

    worker = context.runtime
    store, models = worker.artifacts, worker.models
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
        built = _examples(loaded.tokenizer, dataset, rows, finetune)
        longest = max(len(example.token_ids) for example in built.examples)
        itemsize = getattr(torch, TORCH_DTYPES[model.dtype]).itemsize
        activations = (
            settings["batch_size"] * longest * model.num_layers * model.hidden_size * itemsize * ACTIVATION_WIDTHS
        )
        models.reserve(loaded.footprint_bytes + lora_bytes + activations, what)

        train_ids, validation_ids = _split(len(built.examples), settings)
        available = block_linear_names(loaded.model)
        targets = lora["target_modules"] or available
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
        schedule = _schedule(settings, len(train_ids))
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
        _record_resolved(context, finetune, resolved)
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
    store = context.runtime.artifacts
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
        examples = {
            "rows": rows,
            "train": len(training.train),
            "validation": len(training.validation),
            "left_out": left_out,
        }
        summary = _summary(points, examples, schedule.steps, resumed_from, tokens, seconds)

        def write_files(folder: Path) -> None:
            training.model.save_pretrained(str(folder))

        return _finish(context, finetune, model, dataset, resolved, points, summary, scratch, write_files)


def _summary(
    points: list[dict[str, Any]],
    examples: dict[str, int],
    steps: int,
    resumed_from: int | None,
    tokens: int,
    seconds: float,
) -> dict[str, Any]:
    validation = [point["validation_loss"] for point in points if point.get("validation_loss") is not None]
    return {
        "examples": examples,
        "steps": steps,
        "resumed_from_step": resumed_from,
        "final_loss": points[-1]["loss"],
        "final_validation_loss": validation[-1] if validation else None,
        "best_validation_loss": min(validation) if validation else None,
        "completion_tokens_per_s": round(tokens / seconds, 1) if seconds > 0 and tokens else None,
    }


def _finish(
    context: "JobContext[FinetuneParameters]",
    finetune: Finetune,
    model: Model,
    dataset: Dataset,
    resolved: dict[str, Any],
    points: list[dict[str, Any]],
    summary: dict[str, Any],
    scratch: Path,
    write_files: Callable[[Path], None],
    tinker: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What both backends end with: the loss history written, the adapter's files (written by
    `write_files` into a folder of `scratch`) registered with the fine-tune's provenance, the
    fine-tune row finished, and the checkpoints removed."""
    store, sessions = context.runtime.artifacts, context.runtime.sessions
    steps = resolved["training"]["steps"]
    context.progress("registering", steps, steps, {"final_loss": summary["final_loss"]})
    store.write_bytes(f"{finetune.artifact}/{HISTORY_FILE}", json.dumps({"points": points}).encode())
    files = scratch / "adapter"
    write_files(files)
    provenance: dict[str, Any] = {
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
    if tinker is not None:
        provenance["tinker"] = tinker
    record = AdapterRecord(
        name=finetune.name,
        source_kind="finetune",
        source=finetune.id,
        provenance={"finetune": provenance},
        tinker_run_id=tinker["run_id"] if tinker else None,
    )
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


# --- the tinker backend ------------------------------------------------------------------


def _tinker_base_model(client: "TinkerClient", model: Model) -> str:
    """The name Tinker trains this base under: a trainable model of the service's whose name
    is the registered model's (as an import matches a checkpoint's base)."""
    supported = client.supported_models()
    for candidate in supported:
        if candidate.model_name and candidate.trainable is not False and names_match(candidate.model_name, model):
            return candidate.model_name
    names = ", ".join(sorted(m.model_name for m in supported if m.model_name and m.trainable is not False))
    raise JobFailed(
        "unsupported_base_model",
        f"Tinker does not train model {model.name!r} ({model.source}): none of its trainable models ({names}) "
        "has that name",
        model=model.id,
    )


def _tinker_targets(target_modules: list[str] | None) -> tuple[bool, bool]:
    """(attention, MLP): Tinker adapts all the attention projections, all the MLP's, or both."""
    if target_modules is None:
        return True, True
    chosen = set(target_modules)
    attention, mlp = chosen >= TINKER_ATTENTION, chosen >= TINKER_MLP
    if chosen != (TINKER_ATTENTION if attention else set()) | (TINKER_MLP if mlp else set()):
        raise JobFailed(
            "invalid_target_modules",
            "lora.target_modules: Tinker adapts every attention projection (q_proj, k_proj, v_proj, o_proj), every "
            "MLP projection (gate_proj, up_proj, down_proj), or both; not a part of either",
            field="lora.target_modules",
        )
    return attention, mlp


def _tinker_checkpoint_key(finetune: Finetune) -> str:
    return f"{finetune.artifact}/{CHECKPOINTS}/{TINKER_CHECKPOINT_FILE}"


def _read_tinker_checkpoint(store: Any, finetune: Finetune) -> dict[str, Any] | None:
    try:
        return dict(json.loads(store.read_bytes(_tinker_checkpoint_key(finetune))))
    except FileNotFoundError:
        return None


def _run_tinker(
    context: "JobContext[FinetuneParameters]", finetune: Finetune, model: Model, dataset: Dataset
) -> dict[str, Any]:
    from workers.adapters.tinker import TinkerClient
    from workers.adapters.tinker_training import tinker_session

    worker = context.runtime
    store, settings = worker.artifacts, worker.settings
    lora, training_settings = finetune.settings["lora"], finetune.settings["training"]
    context.progress("loading", 0, None)
    if not settings.tinker_api_key:
        raise JobFailed("tinker_unconfigured", "the worker has no TINKER_API_KEY setting")
    client = TinkerClient(settings.tinker_api_key, settings.tinker_base_url)
    base_model = _tinker_base_model(client, model)
    attention, mlp = _tinker_targets(lora["target_modules"])
    tokenizer = load_tokenizer(model)
    rows = read_rows(store, dataset)
    built = _examples(tokenizer, dataset, rows, finetune)
    train_ids, validation_ids = _split(len(built.examples), training_settings)
    schedule = _schedule(training_settings, len(train_ids))
    targets = sorted((TINKER_ATTENTION if attention else set()) | (TINKER_MLP if mlp else set()))
    resolved = {
        "lora": lora | {"target_modules": targets},
        "training": training_settings | {"steps": schedule.steps},
    }
    _record_resolved(context, finetune, resolved)
    tinker_training = TinkerTraining(
        base_model=base_model,
        train=[built.examples[i] for i in train_ids],
        validation=[built.examples[i] for i in validation_ids],
        schedule=schedule,
        rank=lora["r"],
        attention=attention,
        mlp=mlp,
    )
    examples = {
        "rows": len(rows),
        "train": len(train_ids),
        "validation": len(validation_ids),
        "left_out": built.left_out,
    }
    try:
        with tinker_session(client) as session, context.scratch() as scratch:
            return tinker_training.run(context, finetune, model, dataset, session, resolved, examples, scratch)
    except JobCancelled:
        store.delete_prefix(f"{finetune.artifact}/{CHECKPOINTS}")
        raise


@dataclass
class TinkerTraining:
    """The steps of a Tinker fine-tune: the local backend's examples, split and schedule."""

    base_model: str
    train: list["Example"]
    validation: list["Example"]
    schedule: "Schedule"
    rank: int
    attention: bool
    mlp: bool

    def run(
        self,
        context: "JobContext[FinetuneParameters]",
        finetune: Finetune,
        model: Model,
        dataset: Dataset,
        session: Any,
        resolved: dict[str, Any],
        examples: dict[str, int],
        scratch: Path,
    ) -> dict[str, Any]:
        from workers.adapters.tinker_training import AdamSettings
        from workers.finetuning import learning_rate_at, step_examples

        store = context.runtime.artifacts
        settings = resolved["training"]
        schedule = self.schedule
        saved = _read_tinker_checkpoint(store, finetune)
        if saved is not None:
            run = session.from_state(saved["path"], with_optimizer=True)
            points, checkpoint_paths, resumed_from = saved["points"], saved["checkpoint_paths"], saved["step"]
        else:
            run = session.create_lora(
                self.base_model, self.rank, settings["seed"], self.attention, self.mlp, train_unembed=False
            )
            points, checkpoint_paths, resumed_from = [], [], None
        started = time.monotonic()
        tokens = 0
        for step in range(resumed_from or 0, schedule.steps):
            batch = [self.train[i] for indices in step_examples(step, len(self.train), schedule) for i in indices]
            step_tokens = sum(len(example.targets) for example in batch)
            rate = learning_rate_at(step, schedule)
            adam = AdamSettings(rate, settings["weight_decay"], settings.get("max_grad_norm", 1.0))
            loss = run.step(batch, adam) / step_tokens
            tokens += step_tokens
            done = step + 1
            point: dict[str, Any] = {"step": done, "loss": loss, "learning_rate": rate, "tokens": step_tokens}
            if done % settings["validation_every"] == 0 or done == schedule.steps:
                point["validation_loss"] = self._validation_loss(run)
            points.append(point)
            details = {key: value for key, value in point.items() if key != "step"}
            context.progress("training", done, schedule.steps, details)
            if done % settings["checkpoint_every"] == 0 and done < schedule.steps:
                checkpoint_paths.append(run.save_state(f"{finetune.id}-step-{done:09d}"))
                state = {"step": done, "path": checkpoint_paths[-1], "checkpoint_paths": checkpoint_paths}
                store.write_bytes(_tinker_checkpoint_key(finetune), json.dumps(state | {"points": points}).encode())
        summary = _summary(points, examples, schedule.steps, resumed_from, tokens, time.monotonic() - started)

        def write_files(folder: Path) -> None:
            run.export(folder, context.runtime.settings.max_adapter_bytes)

        tinker = {"run_id": run.model_id, "base_model": self.base_model, "checkpoint_paths": checkpoint_paths}
        return _finish(context, finetune, model, dataset, resolved, points, summary, scratch, write_files, tinker)

    def _validation_loss(self, run: "TinkerRun") -> float | None:
        if not self.validation:
            return None
        return run.loss(self.validation) / sum(len(example.targets) for example in self.validation)
