"""What a request may hold, answered in the error envelope before a route runs: a body no
larger than its limit (413, before a byte too many is read: by the declared `Content-Length`,
or while a chunked body streams in), and no NUL character in its path or query (422)."""

from urllib.parse import parse_qsl

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ServiceError, error_response, nul_refused


def _too_large(limit: int) -> ServiceError:
    return ServiceError(413, "payload_too_large", f"request body is larger than {limit} bytes", limit_bytes=limit)


class BodySizeLimit:
    """Pure ASGI middleware; `limits` maps a path prefix to its own limit (uploads)."""

    def __init__(self, app: ASGIApp, default_limit: int, limits: dict[str, int] | None = None) -> None:
        self.app = app
        self.default_limit = default_limit
        self.limits = limits or {}

    def limit_for(self, path: str) -> int:
        return next((limit for prefix, limit in self.limits.items() if path.startswith(prefix)), self.default_limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            error = _too_large(limit)
            await error_response(error.status, error.code, error.message, error.details)(scope, receive, send)
            return
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # an HTTPException passes through FastAPI's body parsing unchanged
                    raise HTTPException(413, _too_large(limit).message)
            return message

        await self.app(scope, receive_within_limit, send)


class RefuseNulCharacters:
    """Pure ASGI middleware: PostgreSQL cannot store a NUL character, and SQLite can, so an id
    or filter holding one (`%00`) would be a 500 on one registry and a 404 on the other; it
    is a 422 on both. Bodies are checked by their schemas (`app.schemas.common.Request`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            query = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
            bad = [("path", "path")] if "\x00" in scope["path"] else []
            bad += [(name, "query") for name, value in query if "\x00" in name + value]
            if bad:
                await nul_refused(bad)(scope, receive, send)
                return
        await self.app(scope, receive, send)
