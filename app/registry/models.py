"""Queries on registered base models, and the checks every request naming a model makes: the
model is usable, the adapter is its own, the layers are within it."""

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import ServiceError, invalid_field, not_found
from app.inputs.model_sources import ModelShape, ResolvedSource
from app.inputs.prompt_formats import CHAT, DataKind, InvalidPromptFormat, check_prompt_format
from app.registry.database import keyset_page
from app.registry.tables import Adapter, Model, new_id


def find_model(
    session: Session, source: ResolvedSource, revision: str | None, dtype: str, quantization: str | None
) -> Model | None:
    return session.scalar(
        select(Model).where(
            Model.source == source.identity,
            Model.revision_key == (revision or ""),
            Model.dtype == dtype,
            Model.quantization_key == (quantization or ""),
        )
    )


def new_model(
    name: str,
    source: ResolvedSource,
    revision: str | None,
    dtype: str,
    quantization: str | None,
    shape: ModelShape,
    weights_fingerprint: str,
) -> Model:
    return Model(
        id=new_id("mdl"),
        name=name,
        source=source.identity,
        source_kind=source.kind,
        resolved_path=str(source.path),
        fingerprint=weights_fingerprint,
        revision=revision,
        revision_key=revision or "",
        dtype=dtype,
        quantization=quantization,
        quantization_key=quantization or "",
        architecture=shape.architecture,
        model_type=shape.model_type,
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        has_chat_template=shape.has_chat_template,
        status="pending",
    )


def get_model(session: Session, model_id: str) -> Model:
    model = session.get(Model, model_id)
    if model is None:
        raise not_found("model", model_id)
    return model


def list_models(session: Session, *, cursor: str | None, limit: int) -> tuple[list[Model], str | None]:
    return keyset_page(session, select(Model), Model.id, cursor, limit)


def checked_model_and_adapter(session: Session, model_id: str, adapter_id: str | None) -> tuple[Model, Adapter | None]:
    """The model (not one that failed its check) and, if named, its adapter (of that model)."""
    model = get_model(session, model_id)
    if model.status == "failed":
        raise ServiceError(
            409, "model_failed", f"model {model.id} failed its check: {model.status_reason}", field="model"
        )
    if adapter_id is None:
        return model, None
    adapter = session.get(Adapter, adapter_id)
    if adapter is None:
        raise not_found("adapter", adapter_id)
    if adapter.base_model_id != model.id:
        raise invalid_field("adapter", f"adapter {adapter.id} belongs to model {adapter.base_model_id}, not {model.id}")
    return model, adapter


def resolve_layers(layers: list[int], num_layers: int) -> list[int]:
    """Negative indices count from the end (-1 is the last block); valid: -(L+1) … L."""
    resolved = []
    for layer in layers:
        if not -(num_layers + 1) <= layer <= num_layers:
            raise invalid_field(
                "layers",
                f"layer {layer} is out of range: the model has layers 0…{num_layers} (or {-(num_layers + 1)}…-1)",
                layer=layer,
                num_layers=num_layers,
            )
        resolved.append(layer if layer >= 0 else num_layers + 1 + layer)
    if len(set(resolved)) != len(resolved):
        raise invalid_field("layers", f"layers repeat once resolved: {resolved}")
    return resolved


def checked_prompt_format(model: Model, prompt_format: str, kind: DataKind | None) -> str:
    """A prompt format this model can apply to data of `kind` (None: not known yet): a 422
    naming `prompt_format` for a template that does not fit, or for `chat` on a model known to
    have no chat template (one registered before models said so is left to its worker)."""
    try:
        check_prompt_format(prompt_format, kind)
    except InvalidPromptFormat as exc:
        raise invalid_field("prompt_format", f"{prompt_format[:80]!r} {exc}") from None
    if prompt_format == CHAT and model.has_chat_template is False:
        raise invalid_field(
            "prompt_format",
            f"`chat` needs a chat template, and model {model.id} ({model.name}) has none; use `raw` or a template",
            model=model.id,
        )
    return prompt_format
