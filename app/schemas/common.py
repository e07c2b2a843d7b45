"""What every request and response body shares: refusing unknown keys and NUL characters, the error envelope, and the value types several resources use."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.errors import NUL_MESSAGE
from app.inputs.prompt_formats import MAX_TEMPLATE_CHARS

Dtype = Literal["float32", "bfloat16", "float16"]


DISPLAY_NAME_MAX = 200  # characters in a resource's display name


Quantization = Literal["8bit", "4bit"]

PROMPT_FORMAT_DESCRIPTION = (
    "How each text or question becomes the model's input: `raw` (as it is), `chat` (the user turn of the "
    "model's chat template, with the generation prompt), or a template naming `{text}` (statements, texts) "
    "or `{question}` and `{choices}` (multiple choice). See docs/concepts.md#prompt-formats."
)


def prompt_format_field(default: str | None = "raw", description: str = PROMPT_FORMAT_DESCRIPTION) -> Any:
    """The `prompt_format` of a request; its fit to the model and data is checked with them."""
    return Field(default, min_length=1, max_length=MAX_TEMPLATE_CHARS, description=description)


def _holds_nul(value: Any) -> bool:
    """Whether any string in `value`, however deeply nested, holds a NUL (a loop, not
    recursion: a deeply nested body must not exhaust the stack). Numbers, and nested request
    bodies, which check themselves, hold none."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, list | tuple):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
    return False


def without_nul(value: Any) -> Any:
    """PostgreSQL cannot store a NUL character and SQLite can: refused in every string a
    request carries, so the answer does not depend on the registry's backend."""
    if _holds_nul(value):
        raise ValueError(NUL_MESSAGE)
    return value


class Request(BaseModel):
    """Request bodies refuse unknown keys, so a typo is a 422 naming it, not a silent default,
    and NUL characters (`without_nul`)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*")
    @classmethod
    def _without_nul(cls, value: Any) -> Any:
        return without_nul(value)


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. `not_found`, `validation_error`.")
    message: str = Field(description="What is wrong, naming the field or resource.")
    details: dict[str, Any] = Field(description="Context: `fields` for validation errors, `field`, `limit_bytes`…")


class ErrorOut(BaseModel):
    """The envelope of every error answer."""

    error: ErrorBody


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": description}
    for status, description in {
        404: "No such resource.",
        413: "Request body too large.",
        422: "Invalid request: `details` names each bad field.",
        503: "A back-end (database, Redis) is unreachable; retry after `Retry-After` seconds.",
    }.items()
}
