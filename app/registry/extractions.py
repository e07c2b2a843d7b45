"""Extraction requests, checked against the registry before a job is queued: the model and
dataset exist (a dataset of labelled rows: no chat conversations), layers are in range,
texts are not empty."""

from sqlalchemy.orm import Session

from app.errors import ServiceError, invalid_field
from app.inputs.prompt_formats import data_kind
from app.inputs.texts import refuse_empty_texts
from app.registry.datasets import labelled_dataset
from app.registry.models import checked_model_and_adapter, checked_prompt_format, resolve_layers
from app.registry.tables import Extraction, Model, new_id
from app.schemas.extractions import ExtractionCreate
from app.settings import Settings


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
    refuse_empty_texts(texts)


def new_extraction(
    session: Session, request: ExtractionCreate, settings: Settings, job_id: str
) -> tuple[Extraction, Model]:
    model, adapter = checked_model_and_adapter(session, request.model, request.adapter)
    if (request.texts is None) == (request.dataset is None):
        raise invalid_field("texts", "give either texts or dataset, not both nor neither")
    text_count = 0
    dataset_kind = None
    if request.texts is not None:
        check_texts(request.texts, settings)
        text_count = len(request.texts)
    else:
        dataset = labelled_dataset(session, str(request.dataset))
        text_count, dataset_kind = dataset.rows, dataset.kind
    prompt_format = checked_prompt_format(model, request.prompt_format, data_kind(dataset_kind))
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
        prompt_format=prompt_format,
        model_fingerprint=model.fingerprint,
        adapter_fingerprint=adapter.identity if adapter else None,
    )
    return extraction, model
