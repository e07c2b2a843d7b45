"""How a failed `confprobe` API command ends: an exit code per kind of failure, so scripts
can tell them apart, and the message or error envelope it prints on stderr."""

import os
from typing import Any

from confprobe_client.errors import (
    ApiError,
    Conflict,
    Forbidden,
    InvalidRequest,
    JobFailed,
    NotFound,
    RateLimited,
    Unauthorized,
    Unavailable,
    Unreachable,
)
from confprobe_client.transport import API_KEY_VARIABLE

EXIT_FAILURE = 1
EXIT_NOT_FOUND = 3
EXIT_INVALID_REQUEST = 4
EXIT_JOB_FAILED = 5
EXIT_UNAVAILABLE = 6
EXIT_NOT_AUTHORIZED = 7
EXIT_RATE_LIMITED = 8

EXIT_CODES_HELP = """\b
Exit codes of the API commands:
  0  done
  1  any other failure
  2  usage error (bad option or argument)
  3  not found (404)
  4  invalid request (422, 413 too large, 409 conflict)
  5  job failed or was cancelled
  6  service unavailable (503) or unreachable
  7  not authorized: no or no valid API key (401; set CONFPROBE_API_KEY), or a key
     without the scope needed (403)
  8  rate limited (429): retry after the seconds the message gives"""


def exit_code_of(error: Exception) -> int:
    """The exit code of a command that failed with `error`, by its kind."""
    if isinstance(error, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(error, Unauthorized | Forbidden):
        return EXIT_NOT_AUTHORIZED
    if isinstance(error, RateLimited):
        return EXIT_RATE_LIMITED
    if isinstance(error, InvalidRequest | Conflict):
        return EXIT_INVALID_REQUEST
    if isinstance(error, JobFailed):
        return EXIT_JOB_FAILED
    if isinstance(error, Unavailable | Unreachable):
        return EXIT_UNAVAILABLE
    return EXIT_FAILURE


def error_envelope(error: Exception) -> dict[str, Any]:
    """The API's error shape for `--json`, whatever the kind: an answer's own, a job's error
    (with its id), or a connection that never got an answer."""
    if isinstance(error, ApiError | JobFailed):
        details = error.details | ({"job_id": error.job.id} if isinstance(error, JobFailed) else {})
        return {"error": {"code": error.code, "message": error.message, "details": details}}
    code = "unreachable" if isinstance(error, Unreachable) else "client_error"
    return {"error": {"code": code, "message": str(error), "details": {}}}


def hint_for(error: Exception) -> str:
    """What to do about a refused key, which the service's message cannot know."""
    if isinstance(error, Unauthorized):
        state = "is set but not accepted" if os.environ.get(API_KEY_VARIABLE) else "is not set"
        return f"\n{API_KEY_VARIABLE} {state}: export {API_KEY_VARIABLE}=<key> (an admin makes one with `confprobe keys create`)"
    return ""
