"""How a text or a multiple-choice question becomes the model's input (docs/concepts.md#prompt-formats).

A request's `prompt_format` is one of:

- `raw` (the default): the text itself, or the multiple-choice prompt `format_multiple_choice`
  writes, tokenized with the tokenizer's own special tokens;
- `chat`: that same text as the user turn of the tokenizer's chat template, followed by the
  template's generation prompt, so that the last token is the one before the assistant's
  first: the position a `last` token reads, and where the answer letter is predicted;
- a template string with named fields, filled with Python's `str.format` and then
  tokenized as `raw` is: `{text}` for statements and inline texts; `{question}` and
  `{choices}` (the lettered choices, one per line) for multiple choice. `{{` and `}}`
  write braces. A template names no other field, no positional field, and uses no
  conversion, format spec, attribute or index.

Torch-free: the gateway validates formats with it, and workers render prompts with it.
"""

import string
from collections.abc import Sequence
from typing import Any, Literal

from app.inputs.datasets import format_multiple_choice, lettered_choices, require_labelled

RAW = "raw"
CHAT = "chat"
MAX_TEMPLATE_CHARS = 4_000

# the fields a template may name, by what the data is
DataKind = Literal["text", "multiple_choice"]
FIELDS: dict[DataKind, frozenset[str]] = {
    "text": frozenset({"text"}),
    "multiple_choice": frozenset({"question", "choices"}),
}
# the fields a template must name: without them, rows would all read the same
REQUIRED: dict[DataKind, frozenset[str]] = {
    "text": frozenset({"text"}),
    "multiple_choice": frozenset({"question", "choices"}),
}


class InvalidPromptFormat(ValueError):
    """A prompt format that cannot be used; the message says why, in the user's terms."""


def data_kind(dataset_kind: str | None) -> DataKind:
    """The kind of data a dataset kind (or inline texts, None) is, for a template's fields.
    Chat conversations are no text to render: an `UnlabelledDataset` (requests refuse them
    before they get here)."""
    if dataset_kind is not None:
        require_labelled(dataset_kind, f"a {dataset_kind} dataset")
    return "multiple_choice" if dataset_kind == "multiple_choice" else "text"


def template_fields(template: str) -> set[str]:
    """The named fields of a template; an `InvalidPromptFormat` for anything else in braces."""
    fields: set[str] = set()
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:  # an unmatched brace
        raise InvalidPromptFormat(f"is not a valid template ({exc}); write a literal brace as {{{{ or }}}}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise InvalidPromptFormat("has a positional field {}; name it, as {text} or {question}")
        if not name.isidentifier():
            raise InvalidPromptFormat(f"field {{{name}}} reads an attribute or index; name a field only")
        if spec or conversion:
            raise InvalidPromptFormat(f"field {{{name}}} has a conversion or format spec; write the field bare")
        fields.add(name)
    return fields


def check_prompt_format(prompt_format: str, kind: DataKind | None) -> str:
    """`prompt_format` itself when it can format data of `kind` (None: not known yet, so
    any one kind's fields), else an `InvalidPromptFormat`. Whether the model has a chat
    template is the caller's to check."""
    if prompt_format in (RAW, CHAT):
        return prompt_format
    if len(prompt_format) > MAX_TEMPLATE_CHARS:
        raise InvalidPromptFormat(f"is a template of {len(prompt_format)} characters; at most {MAX_TEMPLATE_CHARS}")
    fields = template_fields(prompt_format)
    if not fields:
        raise InvalidPromptFormat(
            "is neither `raw` nor `chat`, and as a template it names no field: use {text} for statements, "
            "{question} and {choices} for multiple choice"
        )
    allowed = FIELDS[kind] if kind is not None else FIELDS["text"] | FIELDS["multiple_choice"]
    what = {"text": "statements and texts", "multiple_choice": "multiple choice", None: "any data"}[kind]
    names = ", ".join(f"{{{name}}}" for name in sorted(allowed))
    unknown = sorted(fields - allowed)
    if unknown:
        raise InvalidPromptFormat(f"names the unknown field {{{unknown[0]}}}; a template for {what} may name {names}")
    fits = [candidate for candidate in ([kind] if kind is not None else list(FIELDS)) if _fits(fields, candidate)]
    if not fits:
        if kind is None:
            raise InvalidPromptFormat(
                "names fields of two kinds of data; a template names {text} (statements and texts), "
                "or {question} and {choices} (multiple choice)"
            )
        missing = sorted(REQUIRED[kind] - fields)
        raise InvalidPromptFormat(f"does not name {{{missing[0]}}}; a template for {what} names {names}")
    return prompt_format


def _fits(fields: set[str], kind: DataKind) -> bool:
    return REQUIRED[kind] <= fields <= FIELDS[kind]


def prompt_format_note(prompt_format: str) -> str:
    """How a report page says what the model read."""
    if prompt_format == RAW:
        return "prompt format: raw (the texts as they are)"
    if prompt_format == CHAT:
        return "prompt format: chat (the user turn of the model's chat template)"
    return f"prompt format: the template {prompt_format!r}"


def rendered_rows(rows: Sequence[dict[str, Any]], dataset_kind: str, prompt_format: str) -> list[str]:
    """What each stored dataset row becomes before tokenization (`render`); an
    `UnlabelledDataset` for chat conversations, which are never rendered as texts."""
    kind = data_kind(dataset_kind)
    return render(prompt_format, kind, rows if kind == "multiple_choice" else [row["text"] for row in rows])


def render(prompt_format: str, kind: DataKind, rows: Sequence[Any]) -> list[str]:
    """The text each row becomes before tokenization: for `raw` and `chat` the text (or the
    multiple-choice prompt) itself — `chat` puts it in the user turn at tokenization — and
    for a template, the template filled in. Rows are strings for `text`, and
    `{question, choices}` mappings for `multiple_choice`."""
    if kind == "multiple_choice":
        if prompt_format in (RAW, CHAT):
            return [format_multiple_choice(row["question"], row["choices"]) for row in rows]
        return [
            prompt_format.format(question=row["question"], choices=lettered_choices(row["choices"])) for row in rows
        ]
    if prompt_format in (RAW, CHAT):
        return [str(row) for row in rows]
    return [prompt_format.format(text=row) for row in rows]
