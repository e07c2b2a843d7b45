"""API keys: creating one, and what is shown of it."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from app.auth import display_prefix
from app.registry.tables import ApiKey
from app.schemas.common import Request
from app.settings import MAX_RATE_LIMIT

ApiScope = Literal["read", "submit", "admin"]


class ApiKeyCreate(Request):
    name: str = Field(min_length=1, max_length=200, description="What the key is for, e.g. who holds it.")
    scopes: list[ApiScope] = Field(
        min_length=1,
        description="`read` (GET), `submit` (create, change, delete, run; includes read), `admin` (API keys; includes both).",
    )
    # bounded well inside the registry's 32-bit columns: a million a minute is more than any gateway answers
    rate_limit_per_minute: int | None = Field(
        None,
        ge=0,
        le=MAX_RATE_LIMIT,
        description="This key's own limit (0: none); default: the service's RATE_LIMIT_PER_MINUTE.",
    )
    rate_limit_burst: int | None = Field(
        None,
        ge=1,
        le=MAX_RATE_LIMIT,
        description="Requests at once after a quiet spell (needs rate_limit_per_minute); default: rate_limit_per_minute.",
    )


class ApiKeyOut(BaseModel):
    """A key as lists show it: never the key itself, nor its hash."""

    id: str
    name: str
    prefix: str = Field(description="How the key starts (`cpk_<prefix>`), to recognise it; not secret.")
    scopes: list[ApiScope] = Field(description="Every scope the key holds, implied ones included.")
    rate_limit_per_minute: int | None
    rate_limit_burst: int | None
    created_at: datetime
    last_used_at: datetime | None = Field(description="To the minute.")
    revoked_at: datetime | None

    @classmethod
    def of(cls, key: ApiKey) -> "ApiKeyOut":
        return cls.model_validate(key, from_attributes=True).model_copy(update={"prefix": display_prefix(key.prefix)})


class ApiKeyCreated(ApiKeyOut):
    secret: str = Field(description="The API key. It is shown this once: the service keeps only its hash.")


class ApiKeyPage(BaseModel):
    items: list[ApiKeyOut]
    next_cursor: str | None
