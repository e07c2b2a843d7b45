"""Fine-tune requests, checked against the registry before a job is queued: the base model
can be trained (a causal language model, not quantized), the dataset can teach it, the
prompt format fits both, and the LoRA targets are layers the base has."""

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import invalid_field, not_found
from app.inputs.prompt_formats import CHAT, data_kind
from app.registry.database import keyset_page
from app.registry.models import checked_model_and_adapter, checked_prompt_format
from app.registry.tables import Dataset, Finetune, Model, new_id
from app.schemas.finetunes import FinetuneCreate, FinetuneOut

CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
CHAT_KIND = "chat"
# Tinker adapts these groups of linear layers whole (train_attn, train_mlp), nothing else
TINKER_GROUPS = ({"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"})


def _trainable(model: Model) -> None:
    # a GGUF file names its architecture (`llama`), and always holds a causal language model
    if model.source_kind != "gguf" and not model.architecture.endswith(CAUSAL_LM_SUFFIXES):
        raise invalid_field(
            "base_model",
            f"model {model.id} is a {model.architecture}, not a causal language model: fine-tuning needs one "
            "that predicts the next token",
            model=model.id,
        )
    if model.quantization:
        raise invalid_field(
            "base_model",
            f"model {model.id} is registered {model.quantization}-quantized; register it in float32 or bfloat16 "
            "to fine-tune it (its adapters then apply to every precision of the same weights)",
            model=model.id,
        )


def _prompt_format(model: Model, dataset: Dataset, requested: str | None) -> str:
    if dataset.kind == CHAT_KIND:
        if requested not in (None, CHAT):
            raise invalid_field(
                "prompt_format",
                f"dataset {dataset.id} holds chat conversations, which only the model's chat template can write: "
                "use `chat` (the default for chat data)",
            )
        return checked_prompt_format(model, CHAT, None)
    return checked_prompt_format(model, requested or "raw", data_kind(dataset.kind))


def _target_modules(model: Model, requested: list[str] | None) -> list[str] | None:
    """The requested targets, checked against the linear layers the model's check found; None
    (every linear layer of the blocks) is resolved by the worker."""
    if requested is None:
        return None
    if len(set(requested)) != len(requested):
        raise invalid_field("lora.target_modules", "a module is listed twice")
    known = model.linear_modules
    if known is not None:
        unknown = [name for name in requested if name not in known]
        if unknown:
            raise invalid_field(
                "lora.target_modules",
                f"model {model.id} has no linear layer {unknown[0]!r} in its blocks; it has {', '.join(sorted(known))}",
                module=unknown[0],
                available=sorted(known),
            )
    return list(requested)


def _tinker_lora(request: FinetuneCreate) -> None:
    """What Tinker's LoRA can be asked for: whole groups of layers, no dropout."""
    if request.lora.dropout:
        raise invalid_field("lora.dropout", "Tinker trains LoRA without dropout: set it to 0 for the tinker backend")
    targets = request.lora.target_modules
    if targets is not None:
        chosen = set(targets)
        if not chosen or chosen != set().union(*(group for group in TINKER_GROUPS if group & chosen)):
            raise invalid_field(
                "lora.target_modules",
                "Tinker adapts every attention projection (q_proj, k_proj, v_proj, o_proj), every MLP projection "
                "(gate_proj, up_proj, down_proj), or both: list whole groups, or leave it out for both",
            )


def new_finetune(session: Session, request: FinetuneCreate, job_id: str) -> Finetune:
    model, _ = checked_model_and_adapter(session, request.base_model, None)
    _trainable(model)
    dataset = session.get(Dataset, request.dataset)
    if dataset is None:
        raise not_found("dataset", request.dataset)
    prompt_format = _prompt_format(model, dataset, request.prompt_format)
    training = request.training
    held_out = int(dataset.rows * training.validation_fraction)
    if dataset.rows - held_out < 1 or (training.validation_fraction > 0 and held_out < 1):
        raise invalid_field(
            "dataset",
            f"dataset {dataset.id} has {dataset.rows} rows: too few to hold out a validation fraction of "
            f"{training.validation_fraction} and keep examples to train on",
        )
    if training.steps is not None and training.warmup_steps >= training.steps:
        raise invalid_field("training.warmup_steps", f"must be fewer than the {training.steps} steps")
    lora = request.lora.model_dump() | {"target_modules": _target_modules(model, request.lora.target_modules)}
    if request.backend == "tinker":
        _tinker_lora(request)
    finetune_id = new_id("ft")
    return Finetune(
        id=finetune_id,
        job_id=job_id,
        name=request.name,
        backend=request.backend,
        base_model_id=model.id,
        dataset_id=dataset.id,
        dataset_sha256=dataset.sha256,
        prompt_format=prompt_format,
        settings={"lora": lora, "training": training.model_dump()},
        artifact=f"finetunes/{finetune_id}",
    )


def list_finetunes(
    session: Session, *, base_model: str | None, cursor: str | None, limit: int
) -> tuple[list[Finetune], str | None]:
    query = select(Finetune)
    if base_model:
        query = query.where(Finetune.base_model_id == base_model)
    return keyset_page(session, query, Finetune.id, cursor, limit)


def finetune_view(finetune: Finetune, status: str) -> FinetuneOut:
    fields: dict[str, Any] = {name: getattr(finetune, name) for name in FinetuneOut.model_fields if name != "status"}
    return FinetuneOut(**fields, status=status)


def finetune_request(config: dict[str, Any], model_id: str, default_name: str) -> FinetuneCreate:
    """The fine-tune an experiment config's `finetune` section asks for, as a request."""
    section = dict(config)
    return FinetuneCreate(
        base_model=model_id,
        dataset=section["dataset"],
        name=section.get("name") or default_name,
        backend=section.get("backend") or "local",
        lora=section.get("lora") or {},
        training=section.get("training") or {},
        prompt_format=section.get("prompt_format"),
    )


def matching_finetune(
    session: Session, request: FinetuneCreate, dataset_sha256: str, prompt_format: str
) -> Finetune | None:
    """A finished fine-tune that this request would repeat: the same base, dataset content,
    prompt format and backend, and every setting the request gives equal to the one that run used (a
    setting it leaves to the run — the default targets, the steps of some epochs — matches
    what the run resolved it to)."""
    wanted = {"lora": request.lora.model_dump(), "training": request.training.model_dump()}
    resolved_later = {"target_modules", "steps"}
    for row in session.scalars(
        select(Finetune).where(
            Finetune.base_model_id == request.base_model,
            Finetune.dataset_sha256 == dataset_sha256,
            Finetune.prompt_format == prompt_format,
            Finetune.backend == request.backend,
            Finetune.adapter_id.is_not(None),
        )
    ):
        used = row.settings
        if all(
            used[part].get(key) == value or (value is None and key in resolved_later)
            for part, values in wanted.items()
            for key, value in values.items()
        ):
            return row
    return None
