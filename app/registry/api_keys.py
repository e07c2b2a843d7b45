"""Queries on API keys. Rows hold a key's hash, never the key (`app.auth` makes keys)."""

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.errors import not_found
from app.registry.database import keyset_page
from app.registry.tables import ApiKey, new_id, utcnow


def add_key(
    session: Session,
    *,
    name: str,
    prefix: str,
    secret_sha256: str,
    scopes: Sequence[str],
    rate_limit_per_minute: int | None,
    rate_limit_burst: int | None,
) -> ApiKey:
    key = ApiKey(
        id=new_id("key"),
        name=name,
        prefix=prefix,
        secret_sha256=secret_sha256,
        scopes=scopes,
        rate_limit_per_minute=rate_limit_per_minute,
        rate_limit_burst=rate_limit_burst,
    )
    session.add(key)
    session.flush()
    return key


def find_key(session: Session, prefix: str) -> ApiKey | None:
    return session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))


def get_key(session: Session, key_id: str) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None:
        raise not_found("API key", key_id)
    return key


def list_keys(
    session: Session, *, include_revoked: bool, cursor: str | None, limit: int
) -> tuple[list[ApiKey], str | None]:
    query = select(ApiKey)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return keyset_page(session, query, ApiKey.id, cursor, limit)


def revoke_key(session: Session, key_id: str) -> ApiKey:
    """Revoked from now on; revoking again keeps the first time."""
    key = get_key(session, key_id)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    return key


def record_use(session: Session, key_id: str, when: datetime) -> None:
    session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=when))
