"""Queries on registered base models."""

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import not_found
from app.inputs.model_sources import ModelShape, ResolvedSource
from app.registry.database import keyset_page
from app.registry.tables import Model, new_id


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
        status="pending",
    )


def get_model(session: Session, model_id: str) -> Model:
    model = session.get(Model, model_id)
    if model is None:
        raise not_found("model", model_id)
    return model


def list_models(session: Session, *, cursor: str | None, limit: int) -> tuple[list[Model], str | None]:
    return keyset_page(session, select(Model), Model.id, cursor, limit)
