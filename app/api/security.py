"""Who may call /v1: an API key (when AUTH_ENABLED is on), within its rate limit, holding
the scope the route needs.

`app/main.py` includes every /v1 router with these dependencies; they are FastAPI security
schemes, so `/openapi.json` declares them and the docs page offers its Authorize button.
`/metrics` has them too, unless METRICS_REQUIRE_KEY is off; the health checks and the docs
are open.

FastAPI reads a request's body — an upload of gigabytes included — before it runs the
route's dependencies, so `AuthenticateFirst` checks the key of every /v1 request before the
body is read — and the scope the route will need (`required_scope`), so a read-only key
cannot make the gateway take in an upload either — and leaves the caller in the request
state; the dependencies then check the scope again. Without the middleware they would
authenticate by themselves.
"""

from typing import Annotated, Any

import sqlalchemy.exc
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers, State
from starlette.types import ASGIApp, Receive, Scope, Send

from app import auth, rate_limit
from app.auth import Caller
from app.errors import ServiceError, backend_unavailable, error_response
from app.schemas.common import ErrorOut

bearer_scheme = HTTPBearer(
    auto_error=False,
    bearerFormat="cpk_<prefix>_<secret>",
    description="An API key (`confprobe keys create`, or `POST /v1/keys`), needed when the service runs with AUTH_ENABLED.",
)
api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="The same API key, for clients that cannot send a bearer token."
)

PROTECTED_PREFIX = "/v1/"
ADMIN_PREFIX = "/v1/keys"
READ_METHODS = frozenset({"GET", "HEAD"})

AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": description}
    for status, description in {
        401: "No API key, or not a live one (`WWW-Authenticate: Bearer`).",
        403: "The API key lacks the scope this route needs; `details.required_scope` names it.",
        429: "The API key is over its rate limit; retry after `Retry-After` seconds.",
    }.items()
}


def authenticate(state: State, token: str | None) -> Caller:
    """The caller behind `token`, counted against its rate limit; everyone, unlimited, when
    authentication is off. 401 without a live key, 429 over the limit."""
    settings = state.settings
    if not settings.auth_enabled:
        return auth.ANONYMOUS
    if not token:
        raise auth.unauthorized(
            "an API key is needed: send `Authorization: Bearer <key>` (or `X-API-Key: <key>`)", "missing"
        )
    found = auth.identify(state.sessions, settings, token)
    if found.key_id is not None:
        rate_limit.enforce(state.redis, settings, found.key_id, found.rate_limit)
    return found


def required_scope(method: str, path: str) -> auth.Scope:
    """The scope a /v1 request needs: `admin` for API keys, else `read` to read and
    `submit` for anything else (the routes' dependencies ask for the same)."""
    if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
        return "admin"
    return "read" if method in READ_METHODS else "submit"


def presented_key(headers: Headers) -> str | None:
    """The key of `Authorization: Bearer <key>`, else of `X-API-Key` (as the schemes read them)."""
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return headers.get("x-api-key") or None


class AuthenticateFirst:
    """Pure ASGI middleware: authenticates a /v1 request before anything reads its body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state: State = scope["app"].state
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX) or not state.settings.auth_enabled:
            await self.app(scope, receive, send)
            return
        try:
            found = await run_in_threadpool(authenticate, state, presented_key(Headers(scope=scope)))
            _holding(found, required_scope(scope["method"], scope["path"]))
        except ServiceError as error:
            await error_response(error.status, error.code, error.message, error.details, headers=error.headers)(
                scope, receive, send
            )
            return
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.TimeoutError) as exc:
            await backend_unavailable(exc)(scope, receive, send)
            return
        scope.setdefault("state", {})["caller"] = found
        await self.app(scope, receive, send)


def caller(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    header_key: Annotated[str | None, Depends(api_key_header)],
) -> Caller:
    found: Caller | None = getattr(request.state, "caller", None)
    if found is None:
        found = authenticate(request.app.state, bearer.credentials if bearer else header_key)
    return found


CallerDep = Annotated[Caller, Depends(caller)]


def scope_by_method(request: Request, who: CallerDep) -> Caller:
    """`read` for GET and HEAD; `submit` for everything that creates, changes, deletes or runs."""
    return _holding(who, required_scope(request.method, request.url.path))


def admin_scope(who: CallerDep) -> Caller:
    return _holding(who, "admin")


def _holding(who: Caller, scope: auth.Scope) -> Caller:
    if not who.may(scope):
        raise auth.forbidden(who, scope)
    return who
