"""What can go wrong, by kind, so callers can `except` on the kind they handle."""

from collections.abc import Mapping
from typing import Any

from confprobe_client.types import Job


class ConfprobeError(Exception):
    """Anything the client raises on purpose."""


class ApiError(ConfprobeError):
    """A non-2xx answer, with the code, message and details of the service's error envelope."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}


class NotFound(ApiError):
    """404: no such resource (or route)."""


class InvalidRequest(ApiError):
    """The request itself is wrong: 422 (a bad field, named in `details`), 400 or 413 (too large)."""


class Conflict(ApiError):
    """409: the resource's state forbids it (in use, already finished, not computed yet)."""


class Unauthorized(ApiError):
    """401: no API key, or not a live one (unknown, revoked); pass `api_key=` or set
    CONFPROBE_API_KEY."""


class Forbidden(ApiError):
    """403: the API key lacks the scope the call needs (`required_scope`), or the service
    refuses the resource (a path outside its allowed roots)."""

    @property
    def required_scope(self) -> str | None:
        return self.details.get("required_scope")


class RateLimited(ApiError):
    """429: the API key is over its rate limit; `retry_after` says in how many seconds a
    call will be let through again."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status, code, message, details)
        self.retry_after = retry_after


class Unavailable(ApiError):
    """503: a back-end (database, Redis, a worker) is missing; retrying later may work."""


class Unreachable(ConfprobeError):
    """No HTTP answer at all: nothing listens at the URL, or the connection broke."""


class JobFailed(ConfprobeError):
    """A job ended `failed` or `cancelled`; `code` and `message` are the job's own error."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.code = job.error.code if job.error else job.status
        self.message = job.error.message if job.error else f"job {job.status}"
        self.details = job.error.details if job.error else {}
        super().__init__(f"job {job.id} ({job.kind}) {job.status}: {self.code}: {self.message}")


class WaitTimedOut(ConfprobeError, TimeoutError):
    """`wait` gave up before the job ended; the job goes on."""

    def __init__(self, job: Job) -> None:
        self.job = job
        super().__init__(f"job {job.id} is still {job.status}; it goes on without this wait")


ERRORS_BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: InvalidRequest,
    422: InvalidRequest,
    503: Unavailable,
}


def api_error(status: int, body: Any, headers: Mapping[str, str] | None = None) -> ApiError:
    """The exception for an error answer: the API's error envelope when the body is one, else the
    status alone (a proxy's HTML page, an empty body); a 429 keeps its `Retry-After`."""
    envelope = body.get("error") if isinstance(body, dict) else None
    if isinstance(envelope, dict) and "code" in envelope:
        code, message, details = str(envelope["code"]), str(envelope.get("message", "")), envelope.get("details") or {}
    else:
        code, message, details = f"http_{status}", f"HTTP {status} without an error envelope", {}
    if status == 429:
        return RateLimited(status, code, message, details, retry_after=_seconds((headers or {}).get("retry-after")))
    return ERRORS_BY_STATUS.get(status, ApiError)(status, code, message, details)


def _seconds(retry_after: str | None) -> float | None:
    """`Retry-After` in seconds; None when absent or an HTTP date (this service sends seconds)."""
    try:
        return float(retry_after) if retry_after is not None else None
    except ValueError:
        return None
