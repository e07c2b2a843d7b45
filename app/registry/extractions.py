"""Extraction requests, checked against the registry before a job is queued: the model and
dataset exist, layers are in range, texts are not empty."""

from sqlalchemy.orm import Session

from app.errors import ServiceError, invalid_field, not_found
from app.registry.models import get_model
from app.registry.tables import Adapter, Dataset, Extraction, Model, new_id
from app.schemas.extractions import ExtractionCreate
from app.settings import Settings


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


def check_texts(texts: list[str], settings: Settings) -> None:
    if not texts:
        raise invalid_field("texts", "give at least one text")
    if len(texts) > settings.max_inline_texts:
        raise ServiceError(
            413,
            "payload_too_large",
            f"texts: {len(texts)} texts inline, at most {settings.max_inline_texts}; upload a dataset instead",
            field="texts",
        )
    for index, text in enumerate(texts):
        if not text.strip():
            raise invalid_field(f"texts[{index}]", "is empty", index=index)


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


def new_extraction(
    session: Session, request: ExtractionCreate, settings: Settings, job_id: str
) -> tuple[Extraction, Model]:
    model, adapter = checked_model_and_adapter(session, request.model, request.adapter)
    if (request.texts is None) == (request.dataset is None):
        raise invalid_field("texts", "give either texts or dataset, not both nor neither")
    text_count = 0
    if request.texts is not None:
        check_texts(request.texts, settings)
        text_count = len(request.texts)
    else:
        dataset = session.get(Dataset, request.dataset)
        if dataset is None:
            raise not_found("dataset", str(request.dataset))
        text_count = dataset.rows
    extraction = Extraction(
        id=new_id("ext"),
        job_id=job_id,
        model_id=model.id,
        adapter_id=adapter.id if adapter else None,
        dataset_id=request.dataset,
        text_count=text_count,
        layers=resolve_layers(request.layers, model.num_layers),
        token_position=request.token_position,
        max_length=request.max_length,
        model_fingerprint=model.fingerprint,
        adapter_fingerprint=adapter.identity if adapter else None,
    )
    return extraction, model
