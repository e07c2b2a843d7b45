"""Structured logs: one JSON object per line (or plain text, for a terminal), every line
carrying the id of the job it was written for — `null` outside a job — so a job's story can
be pulled out of many processes' logs with one filter."""

import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from app.settings import Settings

current_job_id: ContextVar[str | None] = ContextVar("current_job_id", default=None)


@contextmanager
def job_scope(job_id: str) -> Iterator[None]:
    """Lines logged inside the block (in this thread or task) carry `job_id`."""
    token = current_job_id.set(job_id)
    try:
        yield
    finally:
        current_job_id.reset(token)


class JobIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "job_id"):
            record.job_id = current_job_id.get()
        record.__dict__.pop("color_message", None)  # uvicorn's copy of the message with terminal colours
        return True


# Query parameters that carry credentials: API keys sent as `?api_key=` (refused, but still
# logged by the access log), tokens, and the signature parts of presigned URLs.
CREDENTIAL_PARAMETERS = re.compile(
    r"(?P<name>[?&](?:api[_-]?key|key|token|access[_-]?token|secret|password|signature|x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&#\s\"']*",
    re.IGNORECASE,
)
# The service's own keys (`cpk_<prefix>_<secret>`) wherever they appear: the public prefix
# stays, so a line still says which key it was.
API_KEY_SECRET = re.compile(r"\b(?P<kept>cpk_[0-9a-fA-F]{0,12}_?)[A-Za-z0-9_-]+")
REDACTED = "***"


def redacted(text: str) -> str:
    """`text` with credentials in URLs and the secrets of API keys replaced by `***`."""
    text = CREDENTIAL_PARAMETERS.sub(rf"\g<name>{REDACTED}", text)
    return API_KEY_SECRET.sub(rf"\g<kept>{REDACTED}", text)


class RedactCredentials(logging.Filter):
    """Every line leaves the process without credentials in it: uvicorn's access log writes
    the full query string, and a message may quote a URL or a key a client sent."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redacted(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


def formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        return JsonFormatter(
            "{levelname}{name}{process}{message}{job_id}",
            style="{",
            rename_fields={"levelname": "level", "name": "logger", "process": "pid"},
            timestamp="time",  # ISO 8601 in UTC, to the microsecond
        )
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s [job %(job_id)s] %(message)s")


def configure(settings: Settings) -> None:
    """Send every logger's lines (ours, uvicorn's, RQ's, and Python's warnings) through one
    handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(settings.log_format))
    handler.addFilter(JobIdFilter())
    handler.addFilter(RedactCredentials())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "rq.worker", "rq.job"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("alembic").setLevel(logging.WARNING)  # migrations say a dozen lines at every start
    logging.captureWarnings(True)  # `warnings.warn` would otherwise print raw text on stderr


def route_library_logs() -> None:
    """Send the lines of transformers, which writes through a plain-text handler of its own
    and keeps them from the root logger, through the one handler too.

    Only where transformers is already imported (a worker): importing it here would load
    torch into the gateway."""
    if "transformers" not in sys.modules:
        return
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
