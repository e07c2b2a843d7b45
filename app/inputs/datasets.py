"""Dataset files: an upload (JSONL or CSV) parsed into rows and normalised to the JSONL that
is stored and hashed, and what the model reads for each row.

Three kinds of rows. *Statements* `{text, label}`: label 1 when the statement is true. In CSV
the text column may be called `statement` (the Geometry-of-Truth and Azaria–Mitchell files)
and the label may be written `true`/`false`. *Multiple choice* `{question, choices, answer}`:
`answer` is the 0-based index of the gold choice; in CSV `choices` is a JSON list. *Chat*
`{messages: [{role, content}, ...]}`: a conversation to fine-tune on, whose last message is
the assistant's (what is learned); in CSV `messages` is a JSON list. The first row decides
the kind, every other row must be of it; other keys and columns are ignored.

Chat conversations carry no label, so nothing probes them: `require_labelled` is the one
check, made by every request that extracts, probes or compares a dataset's rows, and by
`prompt_formats.data_kind` before any row is rendered as a text.

Normalising strips the surrounding whitespace of every text and writes one compact JSON
object per row with only its kind's keys, in a fixed order. The sha256 of that content is
the dataset's identity: the same rows as CSV or JSONL, with or without a BOM or blank
lines, are one dataset.
"""

import csv
import hashlib
import io
import itertools
import json
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePath
from typing import Any, BinaryIO, Literal

from app.inputs.texts import is_empty_text

DatasetKind = Literal["statements", "multiple_choice", "chat"]
SourceFormat = Literal["jsonl", "csv"]
ChatRole = Literal["system", "user", "assistant"]

STATEMENT_KEYS = ("text", "statement", "label")
MULTIPLE_CHOICE_KEYS = ("question", "choices", "answer")
CHAT_KEYS = ("messages",)
CHAT_ROLES: tuple[ChatRole, ...] = ("system", "user", "assistant")
MAX_CHAT_MESSAGES = 256
CHOICE_LETTERS = string.ascii_uppercase
CSV_LABEL_WORDS = {"0": 0, "1": 1, "false": 0, "true": 1}


class InvalidDataset(ValueError):
    """A file that is not a dataset, said as the upload endpoint says it: `code` is
    `invalid_row` for a malformed row (`details`: its `line` and `field`) or `invalid_field`
    for the file as a whole (`details`: `field` is `file`). Raised in the gateway and in
    workers alike, each of which tells its caller in its own way."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


def _file_error(problem: str, **details: Any) -> InvalidDataset:
    return InvalidDataset("invalid_field", f"file: {problem}", field="file", **details)


class UnlabelledDataset(ValueError):
    """Rows without labels (chat conversations) where labelled rows are needed: an
    extraction, a probe run, a comparison or an experiment. The message names the data."""


def require_labelled(kind: str, what: str) -> None:
    """An `UnlabelledDataset` when data of `kind`, named `what` in the message (`dataset
    dst_…`, a file's name), has no labels to probe."""
    if kind == "chat":
        raise UnlabelledDataset(
            f"{what} holds chat conversations, which have no labels to probe; chat datasets are for fine-tuning"
        )


@dataclass(frozen=True)
class Statement:
    text: str
    label: int

    @property
    def gold(self) -> int:
        return self.label

    def normalised(self) -> dict[str, Any]:
        return {"text": self.text, "label": self.label}


@dataclass(frozen=True)
class MultipleChoice:
    question: str
    choices: tuple[str, ...]
    answer: int

    @property
    def gold(self) -> int:
        return self.answer

    def normalised(self) -> dict[str, Any]:
        return {"question": self.question, "choices": list(self.choices), "answer": self.answer}


@dataclass(frozen=True)
class ChatMessage:
    role: ChatRole
    content: str


@dataclass(frozen=True)
class ChatConversation:
    """A conversation to fine-tune on. It has no gold label: its dataset's `label_balance`
    is empty."""

    messages: tuple[ChatMessage, ...]

    def normalised(self) -> dict[str, Any]:
        return {"messages": [{"role": message.role, "content": message.content} for message in self.messages]}


Row = Statement | MultipleChoice | ChatConversation


@dataclass(frozen=True)
class NormalisedDataset:
    """An upload's rows as they are stored, and what the registry records of them. The
    stored JSONL is either `content` (small files, parsed in memory) or the file `stored`
    (an upload streamed to disk: the gateway never holds a large dataset whole)."""

    kind: DatasetKind
    source_format: SourceFormat
    sha256: str
    upload_sha256: str
    rows: int
    label_balance: dict[str, int]
    size_bytes: int
    content: bytes | None = None
    stored: BinaryIO | None = None

    @property
    def artifact_key(self) -> str:
        return f"datasets/{self.sha256}.jsonl"


def parse_upload(raw: bytes, filename: str | None) -> NormalisedDataset:
    """Parse and normalise an uploaded file held in memory. A malformed row is an
    `InvalidDataset` whose message and `details` give its line (1-based, as in the file) and field."""
    out = io.BytesIO()
    summary = normalise_upload(io.BytesIO(raw), filename, out)
    return replace(summary, content=out.getvalue())


def normalise_upload(source: BinaryIO, filename: str | None, out: BinaryIO) -> NormalisedDataset:
    """Parse `source` line by line and write its normalised rows to `out` as they are read:
    memory stays bounded by the longest row, whatever the number of rows. What is returned
    describes the rows (neither `content` nor `stored` is set)."""
    upload_hash = hashlib.sha256()
    lines = _decoded_lines(source, upload_hash)
    source_format, lines = _format_of(filename, lines)
    records = _jsonl_records(lines) if source_format == "jsonl" else _csv_records(lines)
    content_hash = hashlib.sha256()
    kind: DatasetKind | None = None
    rows = size = 0
    golds: Counter[int] = Counter()
    for line, record in records:
        if kind is None:
            kind = _kind_of(record)
            if kind is None:
                raise _row_error(
                    line,
                    "row",
                    "has neither statement keys (text, label), multiple-choice keys (question, choices, answer) "
                    "nor chat messages (messages)",
                )
        row = ROW_READERS[kind](record, line)
        encoded = _json_line(row.normalised())
        out.write(encoded)
        content_hash.update(encoded)
        rows += 1
        size += len(encoded)
        if not isinstance(row, ChatConversation):
            golds[row.gold] += 1
    if kind is None:
        raise _file_error("has no rows")
    return NormalisedDataset(
        kind=kind,
        source_format=source_format,
        sha256=content_hash.hexdigest(),
        upload_sha256=upload_hash.hexdigest(),
        rows=rows,
        label_balance=_label_balance(kind, golds),
        size_bytes=size,
    )


def default_name(filename: str | None) -> str:
    """An upload's name when the client gives none: its file name, cut to the column's width."""
    return (filename or "dataset")[:200]


def format_multiple_choice(question: str, choices: Sequence[str]) -> str:
    """The question, then the choices lettered `A.`, `B.`, … one per line, then `Answer:`,
    so that the model's next token is the letter of the choice it picks (docs/concepts.md#labels)."""
    if len(choices) > len(CHOICE_LETTERS):
        raise ValueError(f"{len(choices)} choices, but only {len(CHOICE_LETTERS)} letters")
    return "\n".join([question, lettered_choices(choices), "Answer:"])


TRUE_FALSE_ANSWERS = ("False", "True")  # by label: 0 is false, 1 is true


def true_false_question(statement: str) -> str:
    """A statement asked as a question whose answer is `True` or `False`
    (`TRUE_FALSE_ANSWERS`): the statement, then `Is this statement true or false?` and
    `Answer:` on lines of their own. What fine-tuning on statements completes."""
    return "\n".join([statement, "Is this statement true or false?", "Answer:"])


def lettered_choices(choices: Sequence[str]) -> str:
    """`A. first`, `B. second`, … one per line."""
    return "\n".join(f"{letter}. {choice}" for letter, choice in zip(CHOICE_LETTERS, choices, strict=False))


# --- reading the upload ----------------------------------------------------------------

Record = tuple[int, dict[str, Any]]  # the line a row starts on, and its values by key


def _row_error(line: int, field: str, problem: str, name: str | None = None) -> InvalidDataset:
    return InvalidDataset("invalid_row", f"line {line}: {name or field} {problem}", line=line, field=field)


def _decoded_lines(source: BinaryIO, upload_hash: "hashlib._Hash") -> Iterator[tuple[int, str]]:
    """The file's lines, numbered from 1 and decoded one at a time (a leading BOM dropped),
    each with its line break; every byte read goes into `upload_hash`. Lines end at "\n"
    only: a raw U+2028 inside a JSON string is not a line break."""
    for number, raw in enumerate(source, start=1):
        upload_hash.update(raw)
        try:
            yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise _file_error(f"not UTF-8 text (byte {raw[exc.start]:#04x} on line {number})", line=number) from None


def _format_of(
    filename: str | None, lines: Iterator[tuple[int, str]]
) -> tuple[SourceFormat, Iterator[tuple[int, str]]]:
    """The format by the file's extension, else by its first non-blank character (a JSONL
    row is an object; a CSV header never starts with a brace), and the lines, none lost."""
    suffix = PurePath(filename or "").suffix.lower()
    if suffix in (".jsonl", ".csv"):
        return ("jsonl" if suffix == ".jsonl" else "csv"), lines
    seen: list[tuple[int, str]] = []
    for numbered in lines:
        seen.append(numbered)
        if numbered[1].strip():
            break
    first = seen[-1][1].lstrip() if seen else ""
    return ("jsonl" if first.startswith("{") else "csv"), itertools.chain(seen, lines)


def _json_problem(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc)


def _jsonl_records(lines: Iterable[tuple[int, str]]) -> Iterator[Record]:
    for number, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise _row_error(number, "row", f"is not valid JSON ({_json_problem(exc)})") from None
        if not isinstance(record, dict):
            raise _row_error(number, "row", f"must be a JSON object, not {type(record).__name__}")
        yield number, record


# a lone carriage return ends a CSV line too (as the csv module reads files opened with newline="")
_LONE_CR = re.compile(r"(?<=\r)(?!\n)")


def _csv_records(lines: Iterable[tuple[int, str]]) -> Iterator[Record]:
    physical = (piece for _, line in lines for piece in _LONE_CR.split(line) if piece)
    reader = csv.reader(physical)
    columns: list[str] | None = None
    while True:
        start_line = reader.line_num + 1  # a quoted cell may span lines: name the first
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise _row_error(start_line, "row", f"is not valid CSV ({exc})") from None
        if not any(cell.strip() for cell in cells):
            continue
        if columns is None:
            columns = _checked_header(cells, start_line)
            continue
        if len(cells) != len(columns):
            raise _row_error(start_line, "row", f"has {len(cells)} cells where the header has {len(columns)}")
        yield start_line, _typed_cells(dict(zip(columns, cells, strict=False)))


def _checked_header(cells: list[str], line: int) -> list[str]:
    """The column names, when they hold one kind's columns; named by the header's line."""
    columns = [cell.strip() for cell in cells]
    kind = _kind_of(columns)
    if kind is None:
        raise _row_error(
            line,
            "header",
            "names neither statement columns (text or statement, label), multiple-choice columns "
            "(question, choices, answer) nor a chat column (messages)",
        )
    required = {"statements": (_text_key(columns), "label"), "multiple_choice": MULTIPLE_CHOICE_KEYS, "chat": CHAT_KEYS}
    missing = [column for column in required[kind] if column not in columns]
    if missing:
        raise _row_error(line, missing[0], "column is missing from the header")
    return columns


def _typed_cells(cells: dict[str, str]) -> dict[str, Any]:
    """CSV cells are text: read label words, answer numbers and the JSON lists of choices
    and of messages, so that CSV and JSONL rows go through one validation."""
    typed: dict[str, Any] = dict(cells)
    if "label" in cells:
        typed["label"] = CSV_LABEL_WORDS.get(cells["label"].strip().lower(), cells["label"])
    if "answer" in cells:
        try:
            typed["answer"] = int(cells["answer"])
        except ValueError:
            pass  # left as text: validation names it
    for key in ("choices", "messages"):
        if key in cells:
            try:
                typed[key] = json.loads(cells[key])
            except (ValueError, RecursionError):
                pass  # left as text: validation names it
    return typed


# --- validating rows -------------------------------------------------------------------


def _kind_of(keys: Iterable[str]) -> DatasetKind | None:
    present = set(keys)
    if not present.isdisjoint(CHAT_KEYS):  # a row with messages is a conversation, whatever else it holds
        return "chat"
    if not present.isdisjoint(MULTIPLE_CHOICE_KEYS):
        return "multiple_choice"
    if not present.isdisjoint(STATEMENT_KEYS):
        return "statements"
    return None


def _text_key(keys: Iterable[str]) -> str:
    """The key of a statement's text: `text`, or `statement` as the Geometry-of-Truth CSVs name it."""
    present = set(keys)
    return "statement" if "statement" in present and "text" not in present else "text"


def _shown(value: Any) -> str:
    shown = json.dumps(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _required_value(record: dict[str, Any], key: str, line: int, kind: DatasetKind) -> Any:
    if key in record:
        return record[key]
    row_kind = _kind_of(record)
    if row_kind is not None and row_kind != kind:
        spoken = {"statements": "statements", "multiple_choice": "multiple-choice", "chat": "chat"}
        raise _row_error(
            line,
            key,
            f"is missing: a {spoken[row_kind]} row in a {spoken[kind]} dataset (the first row decides the kind)",
        )
    raise _row_error(line, key, "is missing")


def _stripped_text(value: Any, line: int, field: str, name: str | None = None) -> str:
    """A non-empty string, its surrounding whitespace stripped."""
    if not isinstance(value, str):
        raise _row_error(line, field, f"must be a string, not {_shown(value)}", name)
    if is_empty_text(value):
        raise _row_error(line, field, "is empty", name)
    stripped = value.strip()
    try:
        stripped.encode("utf-8")
    except UnicodeEncodeError:
        raise _row_error(line, field, "holds a lone surrogate escape, which is not Unicode text", name) from None
    return stripped


def _statement(record: dict[str, Any], line: int) -> Statement:
    text_key = _text_key(record)
    text = _stripped_text(_required_value(record, text_key, line, "statements"), line, text_key)
    label = _required_value(record, "label", line, "statements")
    if isinstance(label, bool):
        label = int(label)
    if type(label) is not int or label not in (0, 1):
        raise _row_error(line, "label", f"must be 0 or 1 (or true/false), not {_shown(label)}")
    return Statement(text=text, label=label)


def _multiple_choice(record: dict[str, Any], line: int) -> MultipleChoice:
    question = _stripped_text(_required_value(record, "question", line, "multiple_choice"), line, "question")
    choices = _required_value(record, "choices", line, "multiple_choice")
    if not isinstance(choices, list):
        raise _row_error(line, "choices", f"must be a list of strings (in CSV, a JSON list), not {_shown(choices)}")
    if not 2 <= len(choices) <= len(CHOICE_LETTERS):
        raise _row_error(line, "choices", f"must hold 2 to {len(CHOICE_LETTERS)} choices, not {len(choices)}")
    cleaned = tuple(
        _stripped_text(choice, line, "choices", f"choices[{index}]") for index, choice in enumerate(choices)
    )
    answer = _required_value(record, "answer", line, "multiple_choice")
    if type(answer) is not int:
        raise _row_error(line, "answer", f"must be the index of the gold choice, not {_shown(answer)}")
    if not 0 <= answer < len(cleaned):
        raise _row_error(
            line, "answer", f"{answer} is out of range for {len(cleaned)} choices (0 to {len(cleaned) - 1})"
        )
    return MultipleChoice(question=question, choices=cleaned, answer=answer)


def _chat_conversation(record: dict[str, Any], line: int) -> ChatConversation:
    """Roles are valid, a system message comes only first, a user message comes before the
    first assistant message, and the last message is the assistant's: the one learned."""
    messages = _required_value(record, "messages", line, "chat")
    if not isinstance(messages, list):
        raise _row_error(
            line,
            "messages",
            f"must be a list of {{role, content}} objects (in CSV, a JSON list), not {_shown(messages)}",
        )
    if not 1 <= len(messages) <= MAX_CHAT_MESSAGES:
        raise _row_error(line, "messages", f"must hold 1 to {MAX_CHAT_MESSAGES} messages, not {len(messages)}")
    cleaned: list[ChatMessage] = []
    for index, message in enumerate(messages):
        field = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _row_error(line, field, f"must be a {{role, content}} object, not {_shown(message)}")
        if "role" not in message:
            raise _row_error(line, f"{field}.role", "is missing")
        role = message["role"]
        if role not in CHAT_ROLES:
            raise _row_error(line, f"{field}.role", f"must be system, user or assistant, not {_shown(role)}")
        if role == "system" and index > 0:
            raise _row_error(line, f"{field}.role", "is system, but only the first message may be a system message")
        if role == "assistant" and not any(earlier.role == "user" for earlier in cleaned):
            raise _row_error(line, f"{field}.role", "is assistant, but no user message comes before it")
        if "content" not in message:
            raise _row_error(line, f"{field}.content", "is missing")
        cleaned.append(ChatMessage(role=role, content=_stripped_text(message["content"], line, f"{field}.content")))
    last = len(cleaned) - 1
    if cleaned[last].role != "assistant":
        raise _row_error(
            line,
            f"messages[{last}].role",
            f"is {cleaned[last].role}, but the last message must be the assistant's (it is what is learned)",
        )
    return ChatConversation(messages=tuple(cleaned))


ROW_READERS: dict[DatasetKind, Callable[[dict[str, Any], int], Row]] = {
    "statements": _statement,
    "multiple_choice": _multiple_choice,
    "chat": _chat_conversation,
}


def _json_line(values: dict[str, Any]) -> bytes:
    return (json.dumps(values, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def _label_balance(kind: DatasetKind, golds: Counter[int]) -> dict[str, int]:
    """Statements: rows per label. Multiple choice: rows per gold answer index. Chat: empty,
    as conversations have no label."""
    counts = Counter(golds)
    if kind == "statements":
        counts.update({0: 0, 1: 0})  # both labels are named, even when one never occurs
    return {str(gold): counts[gold] for gold in sorted(counts)}
