"""The error envelope: every error answer is `{"error": {"code", "message", "details"}}`."""

import errno
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ServiceError(Exception):
    """An error meant for the client: its status, a stable code, a message naming the problem,
    and the headers the status calls for (`WWW-Authenticate` on 401, `Retry-After` on 429)."""

    def __init__(
        self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None, **details: Any
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.details = details


def not_found(resource: str, resource_id: str) -> ServiceError:
    return ServiceError(404, "not_found", f"no {resource} with id {resource_id!r}", resource=resource, id=resource_id)


def invalid_field(field: str, message: str, **details: Any) -> ServiceError:
    return ServiceError(422, "invalid_field", f"{field}: {message}", field=field, **details)


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def error_response(
    status: int, code: str, message: str, details: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


NUL_MESSAGE = "holds a NUL character (\\u0000), which the registry cannot store"


def nul_free_filename(filename: str | None) -> str | None:
    """An uploaded file's name, which is kept (a dataset's default name, an import's source):
    refused like any other field when it holds a NUL character."""
    if filename and "\x00" in filename:
        raise invalid_field("file", f"the file name {NUL_MESSAGE}")
    return filename


def nul_refused(fields: list[tuple[str, str]]) -> JSONResponse:
    """A 422 like a validation error's, for (field, where) pairs holding a NUL character."""
    items = [{"field": field, "in": where, "message": NUL_MESSAGE, "type": "string_nul"} for field, where in fields]
    summary = "; ".join(f"{item['field']}: {NUL_MESSAGE}" for item in items)
    return error_response(422, "validation_error", f"invalid request: {summary}", {"fields": items})


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    410: "gone",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    502: "bad_gateway",
    503: "unavailable",
}


def _field_name(location: tuple[Any, ...]) -> str:
    """`('body', 'source')` → `source`; the place (body/query/path) stays in `details`."""
    parts = [str(part) for part in location[1:]] if len(location) > 1 else [str(part) for part in location]
    return ".".join(parts)


async def _service_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc.status, exc.code, exc.message, exc.details, headers=exc.headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    fields = [
        {
            "field": "body" if err["type"] == "json_invalid" else _field_name(tuple(err["loc"])),
            "in": str(err["loc"][0]),
            "message": err["msg"]
            + (f" ({err['ctx']['error']})" if err["type"] == "json_invalid" and "ctx" in err else ""),
            "type": err["type"],
        }
        for err in exc.errors()
    ]
    summary = "; ".join(f"{item['field'] or item['in']}: {item['message']}" for item in fields)
    return error_response(422, "validation_error", f"invalid request: {summary}", {"fields": fields})


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    # FastAPI answers 400 for any failure to parse a body; two of them are not malformed bodies
    if isinstance(exc.__cause__, RecursionError):
        return error_response(422, "invalid_field", "body: nests too deeply to parse", {"field": "body"})
    if disk_full(exc.__cause__):
        return _disk_full_response()
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))


def backend_unavailable(exc: Exception) -> JSONResponse:
    """Redis or the database went away: 503 with `Retry-After` (middleware answers it too)."""
    backend = "redis" if type(exc).__module__.startswith("redis") else "database"
    return error_response(
        503, "unavailable", f"the {backend} is unreachable: {exc}", {"backend": backend}, headers={"Retry-After": "5"}
    )


async def _backend_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    return backend_unavailable(exc)


async def _store_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    return error_response(503, "unavailable", str(exc), {"backend": "artifact store"}, headers={"Retry-After": "5"})


async def _artifact_missing(_request: Request, exc: Exception) -> JSONResponse:
    """A registry row names an artifact the store no longer holds (deleted by hand, or a
    store restored from an older backup): the row's data is gone, so 410, not a 500."""
    key = getattr(exc, "key", None)
    logging.getLogger(__name__).error("artifact missing from the store: %s", exc)
    return error_response(
        410,
        "artifact_missing",
        f"{exc}: the record remains but its data is gone; delete it and create it again",
        {"key": key},
    )


def disk_full(exc: BaseException | None) -> bool:
    """Whether `exc` is a write refused for lack of space (or of quota) on a disk."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _disk_full_response() -> JSONResponse:
    return error_response(
        503,
        "store_full",
        "the service's disk is full; try again once space is freed",
        {"backend": "disk"},
        headers={"Retry-After": "60"},
    )


async def _os_error(request: Request, exc: Exception) -> JSONResponse:
    """A full disk is the store's fault, not the client's: 503. Any other OSError that reaches
    here is unexpected."""
    if disk_full(exc):
        logging.getLogger(__name__).error("a write failed for lack of space: %s", exc)
        return _disk_full_response()
    return await _unexpected(request, exc)


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    return error_response(500, "internal", f"internal error: {type(exc).__name__}")


def install_error_handlers(app: FastAPI) -> None:
    """Client errors keep their status; Redis, the database or the artifact store going away
    is a 503 with `Retry-After`; anything else is a 500 in the same envelope."""
    import redis.exceptions
    import sqlalchemy.exc

    from app.storage import ArtifactMissing, StoreUnavailable

    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(redis.exceptions.ConnectionError, _backend_unavailable)
    app.add_exception_handler(redis.exceptions.TimeoutError, _backend_unavailable)
    app.add_exception_handler(sqlalchemy.exc.OperationalError, _backend_unavailable)
    app.add_exception_handler(sqlalchemy.exc.TimeoutError, _backend_unavailable)  # connection pool exhausted
    app.add_exception_handler(StoreUnavailable, _store_unavailable)
    app.add_exception_handler(ArtifactMissing, _artifact_missing)
    app.add_exception_handler(OSError, _os_error)
    app.add_exception_handler(Exception, _unexpected)
