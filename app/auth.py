"""API keys: their format, how a presented key is checked, and what each scope allows.

A key reads `cpk_<prefix>_<secret>`. `prefix` (12 random hex digits) is public: it finds
the key's row and names the key in lists. `secret` is 32 random bytes, URL-safe base64.
The registry keeps only the SHA-256 of the whole key: with 256 random bits there is
nothing to guess, so a fast hash protects a stolen database as well as a slow one would,
and checking a request costs microseconds.

Scopes nest: `admin` (API keys) includes `submit` (anything that creates, changes,
deletes or runs), which includes `read` (GET).
"""

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, get_args

from sqlalchemy.orm import Session, sessionmaker

from app.errors import ServiceError
from app.rate_limit import RateLimit, limit_for
from app.registry.api_keys import add_key, find_key, record_use
from app.registry.database import transaction
from app.registry.tables import ApiKey, utcnow
from app.settings import Settings

Scope = Literal["read", "submit", "admin"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
GRANTS: dict[str, frozenset[Scope]] = {
    "read": frozenset({"read"}),
    "submit": frozenset({"read", "submit"}),
    "admin": frozenset({"read", "submit", "admin"}),
}

KEY_TYPE = "cpk"
KEY_PATTERN = re.compile(rf"{KEY_TYPE}_(?P<prefix>[0-9a-f]{{12}})_[A-Za-z0-9_-]{{43}}")
BOOTSTRAP_KEY_ID = "bootstrap"
# `last_used_at` is written at most this often per key: a write per request would make
# every read a database write.
LAST_USED_RESOLUTION = timedelta(minutes=1)


@dataclass(frozen=True)
class NewKey:
    """A freshly made key: `token` is shown once and then forgotten."""

    token: str
    prefix: str
    secret_sha256: str


@dataclass(frozen=True)
class Caller:
    """Who is calling: a key's id (None when authentication is off), every scope it holds
    (implied ones included) and its rate limit."""

    key_id: str | None
    scopes: frozenset[Scope]
    rate_limit: RateLimit | None

    def may(self, scope: Scope) -> bool:
        return scope in self.scopes


ANONYMOUS = Caller(key_id=None, scopes=frozenset(SCOPES), rate_limit=None)


def new_key() -> NewKey:
    prefix = secrets.token_hex(6)
    token = f"{KEY_TYPE}_{prefix}_{secrets.token_urlsafe(32)}"
    return NewKey(token=token, prefix=prefix, secret_sha256=key_sha256(token))


def create_key(
    session: Session,
    name: str,
    scopes: list[Scope],
    rate_limit_per_minute: int | None = None,
    rate_limit_burst: int | None = None,
) -> tuple[ApiKey, str]:
    """A new key's row (scopes stored with all they include) and the key itself, which
    nothing keeps: show it once."""
    made = new_key()
    row = add_key(
        session,
        name=name,
        prefix=made.prefix,
        secret_sha256=made.secret_sha256,
        scopes=granted_scopes(list(scopes)),
        rate_limit_per_minute=rate_limit_per_minute,
        rate_limit_burst=rate_limit_burst,
    )
    return row, made.token


def key_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def display_prefix(prefix: str) -> str:
    """How a key is recognised without its secret: it starts with `cpk_3f9a1c2b7d4e`."""
    return f"{KEY_TYPE}_{prefix}"


def granted_scopes(scopes: list[str]) -> list[Scope]:
    """Every scope that `scopes` include, in the order of SCOPES."""
    held = {scope for name in scopes for scope in GRANTS[name]}
    return [scope for scope in SCOPES if scope in held]


def unauthorized(message: str, reason: str) -> ServiceError:
    challenge = "Bearer" if reason == "missing" else 'Bearer error="invalid_token"'
    return ServiceError(401, "unauthorized", message, headers={"WWW-Authenticate": challenge}, reason=reason)


def forbidden(caller: Caller, scope: Scope) -> ServiceError:
    held = granted_scopes(list(caller.scopes))
    return ServiceError(
        403,
        "forbidden",
        f"this API key lacks the `{scope}` scope (it has: {', '.join(held)})",
        required_scope=scope,
        scopes=held,
    )


def identify(sessions: sessionmaker[Session], settings: Settings, token: str) -> Caller:
    """The caller a presented key stands for; 401 when it is not a live key."""
    bootstrap = settings.bootstrap_admin_key
    if bootstrap is not None and hmac.compare_digest(key_sha256(token), key_sha256(bootstrap.get_secret_value())):
        return Caller(BOOTSTRAP_KEY_ID, frozenset(SCOPES), limit_for(None, None, settings))
    match = KEY_PATTERN.fullmatch(token)
    if match is None:
        raise unauthorized("the API key is not a key of this service (expected cpk_<prefix>_<secret>)", "invalid")
    with sessions() as session:
        key = find_key(session, match["prefix"])
    if key is None or not hmac.compare_digest(key.secret_sha256, key_sha256(token)):
        raise unauthorized("the API key is not valid", "invalid")
    if key.revoked_at is not None:
        raise unauthorized(
            f"the API key {display_prefix(key.prefix)} was revoked at {key.revoked_at.isoformat()}", "revoked"
        )
    _note_use(sessions, key)
    return Caller(
        key.id,
        frozenset(granted_scopes(key.scopes)),
        limit_for(key.rate_limit_per_minute, key.rate_limit_burst, settings),
    )


def _note_use(sessions: sessionmaker[Session], key: ApiKey) -> None:
    now = utcnow()
    if key.last_used_at is None or now - key.last_used_at >= LAST_USED_RESOLUTION:
        with transaction(sessions) as session:
            record_use(session, key.id, now)
