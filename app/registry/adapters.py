"""Queries on imported adapters, and what makes two adapters the same (`adapter_identity`)."""

import hashlib
import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import not_found
from app.registry.database import keyset_page
from app.registry.tables import Adapter

# What a converted adapter's config always says about settings it does not vary.
PUBLISHED_DEFAULTS: dict[str, Any] = {"bias": "none", "fan_in_fan_out": False}
# The config values that change what an adapter computes, with the value an adapter
# converted before a setting was kept had. With the weights' sha256 they are its identity.
IDENTITY_DEFAULTS: dict[str, Any] = {"use_rslora": False, **PUBLISHED_DEFAULTS}
IDENTITY_KEYS = ("r", "lora_alpha", "target_modules", *IDENTITY_DEFAULTS)


def adapter_identity(weights_sha256: str, config: dict[str, Any]) -> str:
    """The sha256 of the weights' sha256 and the canonical JSON of the converted config's
    values that change the adapter's output (`IDENTITY_KEYS`): the same weights with another
    lora_alpha are another adapter, with its own row, files and cached hidden states.
    Migration 0008 keeps a frozen copy of this for rows converted before it; they agree."""
    relevant = {key: config.get(key, IDENTITY_DEFAULTS.get(key)) for key in IDENTITY_KEYS}
    relevant["lora_alpha"] = float(config["lora_alpha"])
    relevant["target_modules"] = sorted(config["target_modules"])
    canonical = json.dumps(
        {"weights_sha256": weights_sha256, "config": relevant}, sort_keys=True, separators=(",", ":"), allow_nan=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


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
