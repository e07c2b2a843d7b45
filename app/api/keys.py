"""`/v1/keys`: create, list and revoke API keys (admin scope). The key itself is in the
answer to its creation only; the service keeps its hash."""

from typing import Annotated

from fastapi import APIRouter, Query

from app import auth
from app.api.deps import SessionDep, SessionsDep, SettingsDep
from app.errors import invalid_field
from app.registry.api_keys import list_keys, revoke_key
from app.registry.database import transaction
from app.schemas.common import ERROR_RESPONSES
from app.schemas.keys import ApiKeyCreate, ApiKeyCreated, ApiKeyOut, ApiKeyPage

router = APIRouter(prefix="/v1/keys", tags=["keys"], responses=ERROR_RESPONSES)


@router.post("", status_code=201)
def create_api_key(body: ApiKeyCreate, sessions: SessionsDep) -> ApiKeyCreated:
    """A new key; `secret` is the key, shown this once."""
    if body.rate_limit_burst is not None and body.rate_limit_per_minute is None:
        raise invalid_field(
            "rate_limit_burst",
            "needs rate_limit_per_minute (a burst of the service's default rate is RATE_LIMIT_BURST)",
        )
    with transaction(sessions) as session:
        key, secret = auth.create_key(
            session, body.name, body.scopes, body.rate_limit_per_minute, body.rate_limit_burst
        )
    return ApiKeyCreated(**ApiKeyOut.of(key).model_dump(), secret=secret)


@router.get("")
def list_api_keys(
    session: SessionDep,
    settings: SettingsDep,
    include_revoked: bool = False,
    cursor: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> ApiKeyPage:
    """Newest first, without their secrets."""
    keys, next_cursor = list_keys(
        session, include_revoked=include_revoked, cursor=cursor, limit=min(limit, settings.page_size_max)
    )
    return ApiKeyPage(items=[ApiKeyOut.of(key) for key in keys], next_cursor=next_cursor)


@router.delete("/{key_id}")
def revoke_api_key(key_id: str, sessions: SessionsDep) -> ApiKeyOut:
    """The key stops working at once, on every gateway; revoking it again changes nothing."""
    with transaction(sessions) as session:
        return ApiKeyOut.of(revoke_key(session, key_id))
