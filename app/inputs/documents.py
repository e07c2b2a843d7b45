"""JSON and YAML documents that requests carry (an experiment config, an adapter's training
metadata), parsed with their nesting bounded.

Python's JSON and YAML parsers recurse once per level, so a body of a few hundred kilobytes
of `[[[[…` exhausts the interpreter's stack (RecursionError); a document a little less deep
parses, and then fails wherever it is next walked recursively (stored as a JSON column,
serialised into an answer). So a depth limit applies to every document a user sends, far
above what a real config needs and far below the interpreter's limit, and a parse that
recurses too deeply anyway is the same 422.
"""

import json
from typing import Any, Literal

import yaml

from app.errors import invalid_field

# Real experiment configs nest three levels, training metadata rarely more than five.
MAX_DOCUMENT_DEPTH = 32
# Values visited when measuring a document: YAML aliases can make a small body stand for a
# huge (or, with a self-reference, endless) tree, so the walk itself is bounded.
MAX_DOCUMENT_VALUES = 1_000_000

DocumentFormat = Literal["json", "yaml"]


class DocumentTooLarge(ValueError):
    """A document that stands for more than `MAX_DOCUMENT_VALUES` values (through aliases)."""


def nesting_depth(value: Any, stop_after: int = MAX_DOCUMENT_DEPTH) -> int:
    """How deeply lists and objects nest in `value` (a scalar is 0, `[]` is 1), counted with a
    loop rather than recursion, and no further than one past `stop_after`. Raises
    `DocumentTooLarge` past `MAX_DOCUMENT_VALUES` values."""
    deepest = 0
    visited = 0
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        visited += 1
        if visited > MAX_DOCUMENT_VALUES:
            raise DocumentTooLarge(f"stands for more than {MAX_DOCUMENT_VALUES} values")
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        deepest = max(deepest, depth + 1)
        if deepest > stop_after:
            break
        pending.extend((child, depth + 1) for child in children)
    return deepest


def within_depth_limit(value: Any) -> Any:
    """`check_depth` as a pydantic validator: a ValueError, which the request's 422 names."""
    depth = nesting_depth(value)  # DocumentTooLarge is a ValueError too
    if depth > MAX_DOCUMENT_DEPTH:
        raise ValueError(f"nests deeper than {MAX_DOCUMENT_DEPTH} levels")
    return value


def check_depth(value: Any, field: str) -> Any:
    """`value` unchanged, or a 422 naming `field` when it nests deeper than the limit or
    stands for too many values."""
    try:
        depth = nesting_depth(value)
    except DocumentTooLarge as exc:
        raise invalid_field(field, str(exc), max_values=MAX_DOCUMENT_VALUES) from exc
    if depth > MAX_DOCUMENT_DEPTH:
        raise invalid_field(field, f"nests deeper than {MAX_DOCUMENT_DEPTH} levels", max_depth=MAX_DOCUMENT_DEPTH)
    return value


def parse_document(raw: bytes | str, document_format: DocumentFormat, field: str) -> Any:
    """The document in `raw`, or a 422 naming `field`: not valid JSON or YAML, or nested deeper
    than `MAX_DOCUMENT_DEPTH` (whether the parser itself gave up or not). YAML is read with
    the safe loader (no Python objects); its aliases count for every value they stand for."""
    name = document_format.upper()
    try:
        document = yaml.safe_load(raw) if document_format == "yaml" else json.loads(raw)
    except RecursionError as exc:
        raise invalid_field(
            field, f"nests deeper than {MAX_DOCUMENT_DEPTH} levels", max_depth=MAX_DOCUMENT_DEPTH
        ) from exc
    except (yaml.YAMLError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise invalid_field(field, f"not valid {name}: {exc}") from exc
    return check_depth(document, field)
