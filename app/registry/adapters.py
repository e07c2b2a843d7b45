"""Queries on imported adapters."""

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import not_found
from app.registry.database import keyset_page
from app.registry.tables import Adapter


def get_adapter(session: Session, adapter_id: str) -> Adapter:
    adapter = session.get(Adapter, adapter_id)
    if adapter is None:
        raise not_found("adapter", adapter_id)
    return adapter


def find_adapter(session: Session, base_model_id: str, identity: str) -> Adapter | None:
    """The adapter of this base with these weights and these output-changing config values
    (`Adapter.identity`); the same weights with another lora_alpha are another adapter."""
    return session.scalar(select(Adapter).where(Adapter.base_model_id == base_model_id, Adapter.identity == identity))


def list_adapters(
    session: Session, *, base_model_id: str | None, cursor: str | None, limit: int
) -> tuple[list[Adapter], str | None]:
    query = select(Adapter)
    if base_model_id:
        query = query.where(Adapter.base_model_id == base_model_id)
    return keyset_page(session, query, Adapter.id, cursor, limit)


def artifact_in_use(session: Session, artifact: str) -> bool:
    return session.scalar(select(Adapter.id).where(Adapter.artifact == artifact).limit(1)) is not None
