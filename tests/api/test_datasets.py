"""Uploading datasets: statements, multiple-choice sets and chat conversations, as JSONL or
CSV, normalised, hashed and registered once per content; and reading them back for the workers."""

import csv
import hashlib
import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from app.inputs.datasets import MAX_CHAT_MESSAGES, UnlabelledDataset, format_multiple_choice, parse_upload
from app.inputs.prompt_formats import rendered_rows
from app.main import create_app
from app.registry.database import create_registry_engine
from app.registry.datasets import (
    RegistrationRace,
    get_dataset,
    new_dataset,
    read_rows,
    register_dataset,
    row_offsets,
    rows_at,
    rows_between,
)
from app.registry.tables import Dataset
from app.settings import Settings
from tests.conftest import SHARED_DATA, RedisServer, make_settings, require, wait_until

DATA = SHARED_DATA
REAL_SETS = [
    "geometry_of_truth/cities.jsonl",
    "geometry_of_truth/cities.csv",
    "azaria_mitchell/facts_true_false.jsonl",
    "mmlu/mmlu_test_sample.jsonl",
]
STATEMENTS = b'{"text": "Paris is in France.", "label": 1}\n{"text": "Paris is in Peru.", "label": 0}\n'
QUESTION = b'{"question": "What is 2 + 2?", "choices": ["3", "4"], "answer": 1, "subject": "arithmetic"}\n'
CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
}
CHAT = (json.dumps(CONVERSATION) + "\n").encode()


def chat_row(*messages: Any) -> bytes:
    """One JSONL row of these messages: (role, content) pairs, or anything else as it is."""
    written = [{"role": item[0], "content": item[1]} if isinstance(item, tuple) else item for item in messages]
    return (json.dumps({"messages": written}) + "\n").encode()


def real_file(relative: str) -> Path:
    path = DATA / relative
    require(path.is_file(), f"the real data set {path} is not here (set CONFPROBE_TEST_DATA to its folder)")
    return path


def upload(api: Any, filename: str, content: bytes, **form: str) -> Any:
    return api.post("/v1/datasets", files={"file": (filename, content)}, data=form)


def counted_from_file(path: Path) -> tuple[int, dict[str, int]]:
    """Rows and label balance of a real data file, counted with csv/json alone."""
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            golds = [row["label"] for row in csv.DictReader(handle)]
    else:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
        golds = [str(record["label"] if "label" in record else record["answer"]) for record in records]
    return len(golds), dict(Counter(golds))


def stored_dataset_files(settings: Settings) -> list[str]:
    folder = settings.resolved_artifact_dir / "datasets"
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def registered(api: Any, dataset_id: str) -> Dataset:
    with api.app.state.sessions() as session:
        return get_dataset(session, dataset_id)


@pytest.mark.parametrize("relative", REAL_SETS)
def test_a_real_data_set_uploads_as_it_is_with_its_rows_and_label_balance(api: Any, relative: str) -> None:
    path = real_file(relative)
    response = upload(api, path.name, path.read_bytes())
    assert response.status_code == 201
    dataset = response.json()
    assert (dataset["rows"], dataset["label_balance"]) == counted_from_file(path)
    assert dataset["kind"] == ("multiple_choice" if relative.startswith("mmlu/") else "statements")
    assert dataset["source_format"] == path.suffix.removeprefix(".")
    assert dataset["upload_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_upload_answers_201_with_its_location_and_shows_the_same_dataset(api: Any) -> None:
    response = upload(api, "capitals.jsonl", STATEMENTS)
    assert response.status_code == 201
    dataset = response.json()
    assert response.headers["location"] == f"/v1/datasets/{dataset['id']}"
    assert api.get(f"/v1/datasets/{dataset['id']}").json() == dataset


def test_the_csv_and_jsonl_of_the_same_set_are_one_dataset(api: Any) -> None:
    as_csv = real_file("geometry_of_truth/cities.csv")
    as_jsonl = real_file("geometry_of_truth/cities.jsonl")
    first = upload(api, as_csv.name, as_csv.read_bytes())
    second = upload(api, as_jsonl.name, as_jsonl.read_bytes())
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json()["id"] == first.json()["id"]


def test_uploading_the_same_file_again_returns_the_existing_dataset_with_200(api: Any, settings: Settings) -> None:
    first = upload(api, "capitals.jsonl", STATEMENTS)
    second = upload(api, "capitals-again.jsonl", STATEMENTS, name="another name")
    assert second.status_code == 200
    assert second.json() == first.json()
    assert [item["id"] for item in api.get("/v1/datasets").json()["items"]] == [first.json()["id"]]
    assert stored_dataset_files(settings) == [f"{first.json()['sha256']}.jsonl"]


def test_the_name_defaults_to_the_file_name(api: Any) -> None:
    assert upload(api, "capitals.jsonl", STATEMENTS).json()["name"] == "capitals.jsonl"


def test_a_given_name_is_kept(api: Any) -> None:
    assert upload(api, "capitals.jsonl", STATEMENTS, name="Capitals").json()["name"] == "Capitals"


MALFORMED = {
    "bad JSON on a line": ("rows.jsonl", b'{"text": "a", "label": 1}\n{"text": "b", "label": 0,}\n', 2, "row"),
    "a line that is not an object": ("rows.jsonl", b'{"text": "a", "label": 1}\n["b", 0]\n', 2, "row"),
    "a missing label": ("rows.jsonl", b'{"text": "a", "label": 1}\n{"text": "b"}\n', 2, "label"),
    "label 2": (
        "rows.jsonl",
        b'{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n{"text": "c", "label": 2}\n',
        3,
        "label",
    ),
    "label 2 in CSV": ("rows.csv", b"statement,label\na,1\nb,2\n", 3, "label"),
    "an empty text": ("rows.jsonl", b'{"text": "a", "label": 1}\n{"text": "  ", "label": 0}\n', 2, "text"),
    "an empty statement in CSV": ("rows.csv", b'statement,label\n"",1\n', 2, "statement"),
    "a text that is not a string": ("rows.jsonl", b'{"text": 7, "label": 1}\n', 1, "text"),
    "an empty question": ("rows.jsonl", b'{"question": "", "choices": ["a", "b"], "answer": 0}\n', 1, "question"),
    "an answer out of range": (
        "rows.jsonl",
        QUESTION + b'{"question": "q", "choices": ["a", "b"], "answer": 2}\n',
        2,
        "answer",
    ),
    "an answer out of range in CSV": ("rows.csv", b'question,choices,answer\nq,"[""a"", ""b""]",2\n', 2, "answer"),
    "choices that are not a list": (
        "rows.jsonl",
        b'{"question": "q", "choices": "a or b", "answer": 0}\n',
        1,
        "choices",
    ),
    "an empty choice": ("rows.jsonl", b'{"question": "q", "choices": ["a", ""], "answer": 0}\n', 1, "choices"),
    "a single choice": ("rows.jsonl", b'{"question": "q", "choices": ["a"], "answer": 0}\n', 1, "choices"),
    "a row of the other kind in the middle": ("rows.jsonl", STATEMENTS + QUESTION + STATEMENTS, 3, "text"),
    "a row of neither kind": ("rows.jsonl", b'{"prompt": "q", "target": 1}\n', 1, "row"),
    "a CSV row with too few cells": ("rows.csv", b"statement,label,city\na,1,Paris\nb,0\n", 3, "row"),
    "a CSV header without labels": ("rows.csv", b"statement,city\na,Paris\n", 1, "label"),
    "chat messages that are not a list": ("rows.jsonl", b'{"messages": "hello"}\n', 1, "messages"),
    "a chat row without messages": ("rows.jsonl", b'{"messages": []}\n', 1, "messages"),
    "too many chat messages": (
        "rows.jsonl",
        chat_row(*[("user", "q"), ("assistant", "a")] * (MAX_CHAT_MESSAGES // 2), ("assistant", "a")),
        1,
        "messages",
    ),
    "a chat message that is not an object": (
        "rows.jsonl",
        CHAT + chat_row(("user", "q"), "a", ("assistant", "a")),
        2,
        "messages[1]",
    ),
    "an unknown chat role": ("rows.jsonl", chat_row(("human", "q"), ("assistant", "a")), 1, "messages[0].role"),
    "a chat message without a role": (
        "rows.jsonl",
        chat_row({"content": "q"}, ("assistant", "a")),
        1,
        "messages[0].role",
    ),
    "an empty chat content": ("rows.jsonl", chat_row(("user", "q"), ("assistant", " \n")), 1, "messages[1].content"),
    "a chat content that is not a string": (
        "rows.jsonl",
        chat_row(("user", ["q"]), ("assistant", "a")),
        1,
        "messages[0].content",
    ),
    "a chat content with a lone surrogate": (
        "rows.jsonl",
        b'{"messages": [{"role": "user", "content": "q\\ud800"}, {"role": "assistant", "content": "a"}]}\n',
        1,
        "messages[0].content",
    ),
    "a system message after the first": (
        "rows.jsonl",
        chat_row(("user", "q"), ("system", "s"), ("assistant", "a")),
        1,
        "messages[1].role",
    ),
    "an assistant message before any user message": (
        "rows.jsonl",
        chat_row(("system", "s"), ("assistant", "a"), ("user", "q"), ("assistant", "a")),
        1,
        "messages[1].role",
    ),
    "a conversation not ending with the assistant": (
        "rows.jsonl",
        chat_row(("user", "q"), ("assistant", "a"), ("user", "q2")),
        1,
        "messages[2].role",
    ),
    "a statements row in a chat dataset": ("rows.jsonl", CHAT + STATEMENTS, 2, "messages"),
    "a chat row in a statements dataset": ("rows.jsonl", STATEMENTS + CHAT, 3, "text"),
    "chat messages that are not JSON in CSV": ("rows.csv", b"messages\nhello\n", 2, "messages"),
}


@pytest.mark.parametrize(("filename", "content", "line", "field"), MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_row_is_a_422_naming_its_line_and_field_and_nothing_is_kept(
    api: Any, settings: Settings, filename: str, content: bytes, line: int, field: str
) -> None:
    response = upload(api, filename, content)
    assert response.status_code == 422
    error = response.json()["error"]
    assert (error["details"]["line"], error["details"]["field"]) == (line, field)
    assert error["message"].startswith(f"line {line}: {field}")
    assert api.get("/v1/datasets").json()["items"] == []
    assert stored_dataset_files(settings) == []


def test_a_chat_upload_is_stored_as_compact_messages_with_only_role_and_content(api: Any, settings: Settings) -> None:
    content = (
        b'{"id": 7, "messages": [{"content": " Hi? ", "role": "user", "name": "ann"},'
        b' {"role": "assistant", "content": "Hello.\\n", "weight": 1}]}\n' + CHAT
    )
    response = upload(api, "chats.jsonl", content)
    assert response.status_code == 201
    dataset = response.json()
    assert (dataset["kind"], dataset["rows"], dataset["label_balance"]) == ("chat", 2, {})
    stored = (settings.resolved_artifact_dir / "datasets" / f"{dataset['sha256']}.jsonl").read_bytes()
    assert (
        stored.split(b"\n")[0]
        == b'{"messages":[{"role":"user","content":"Hi?"},{"role":"assistant","content":"Hello."}]}'
    )
    assert read_rows(api.app.state.artifacts, registered(api, dataset["id"]))[1] == CONVERSATION
    assert dataset["sha256"] == hashlib.sha256(stored).hexdigest()


def test_the_same_conversations_with_other_keys_and_whitespace_are_one_dataset(api: Any) -> None:
    first = upload(api, "chats.jsonl", CHAT).json()
    padded = {
        "source": "x",
        "messages": [message | {"content": f"  {message['content']} "} for message in CONVERSATION["messages"]],
    }
    second = upload(api, "padded.jsonl", b"\n" + json.dumps(padded, indent=None).encode() + b"\n\n")
    assert second.status_code == 200
    assert (second.json()["id"], second.json()["sha256"]) == (first["id"], first["sha256"])


def test_csv_chat_reads_messages_as_a_json_list(api: Any) -> None:
    from_jsonl = upload(api, "chats.jsonl", CHAT).json()
    cell = json.dumps(CONVERSATION["messages"]).replace('"', '""')
    from_csv = upload(api, "chats.csv", f'messages,topic\n"{cell}",geography\n'.encode())
    assert from_csv.status_code == 200
    assert from_csv.json()["id"] == from_jsonl["id"]


def test_blank_jsonl_lines_are_skipped_but_still_counted_in_line_numbers(api: Any) -> None:
    content = b'\n{"text": "a", "label": 1}\n\n   \n{"text": "b", "label": "yes"}\n'
    error = upload(api, "rows.jsonl", content).json()["error"]
    assert error["details"]["line"] == 5
    assert upload(api, "rows.jsonl", content.replace(b'"yes"', b"0")).json()["rows"] == 2


@pytest.mark.parametrize("content", [b"", b"\n\n", b"statement,label\n"], ids=["empty", "blank lines", "header only"])
def test_a_file_without_rows_is_a_422(api: Any, settings: Settings, content: bytes) -> None:
    response = upload(api, "rows.csv", content)
    assert response.status_code == 422
    assert response.json()["error"]["details"]["field"] == "file"
    assert stored_dataset_files(settings) == []


def test_a_file_that_is_not_utf8_is_a_422_naming_the_line(api: Any) -> None:
    response = upload(api, "rows.csv", "statement,label\nThe café is open.,1\n".encode("latin-1"))
    assert response.status_code == 422
    error = response.json()["error"]
    assert (error["details"]["field"], error["details"]["line"]) == ("file", 2)
    assert "UTF-8" in error["message"]


def test_a_utf8_bom_is_tolerated(api: Any) -> None:
    plain = upload(api, "rows.csv", b"statement,label\nParis is in France.,1\n").json()
    with_bom = upload(api, "rows.csv", b"\xef\xbb\xbfstatement,label\nParis is in France.,1\n")
    assert with_bom.status_code == 200
    assert with_bom.json()["id"] == plain["id"]


def test_csv_statements_may_name_the_column_text_and_write_labels_as_words(api: Any) -> None:
    from_jsonl = upload(api, "rows.jsonl", STATEMENTS).json()
    content = b"text,label,country\nParis is in France.,true,France\n Paris is in Peru. ,FALSE,Peru\n"
    from_csv = upload(api, "rows.csv", content)
    assert from_csv.status_code == 200
    assert from_csv.json()["id"] == from_jsonl["id"]


def test_csv_multiple_choice_reads_choices_as_a_json_list(api: Any) -> None:
    from_jsonl = upload(api, "rows.jsonl", QUESTION).json()
    from_csv = upload(
        api, "rows.csv", b'question,choices,answer,subject\nWhat is 2 + 2?,"[""3"", ""4""]",1,arithmetic\n'
    )
    assert from_csv.status_code == 200
    assert from_csv.json()["id"] == from_jsonl["id"]
    assert from_jsonl["kind"] == "multiple_choice" and from_jsonl["label_balance"] == {"1": 1}


@pytest.mark.parametrize(
    ("filename", "content", "source_format"),
    [("rows", STATEMENTS, "jsonl"), ("rows.txt", b"statement,label\na,1\n", "csv")],
)
def test_without_a_known_extension_the_format_comes_from_the_content(
    api: Any, filename: str, content: bytes, source_format: str
) -> None:
    response = upload(api, filename, content)
    assert response.status_code == 201
    assert response.json()["source_format"] == source_format


def test_a_file_over_max_dataset_bytes_is_a_413_and_nothing_is_kept(
    database_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = make_settings(database_url, redis_server.url, tmp_path / "var", max_dataset_bytes=1024)
    with TestClient(create_app(settings)) as client:
        response = upload(client, "rows.jsonl", STATEMENTS * 20)
        assert response.status_code == 413
        assert response.json()["error"]["details"]["limit_bytes"] == 1024
        assert client.get("/v1/datasets").json()["items"] == []
    assert stored_dataset_files(settings) == []


def test_the_stored_file_is_compact_jsonl_with_only_the_kinds_keys_in_order(api: Any, settings: Settings) -> None:
    dataset = upload(
        api, "rows.jsonl", b'{"subject": "s", "answer": 0, "choices": [" yes ", "no"], "question": " Is it? "}\n'
    ).json()
    stored = (settings.resolved_artifact_dir / "datasets" / f"{dataset['sha256']}.jsonl").read_bytes()
    assert stored == b'{"question":"Is it?","choices":["yes","no"],"answer":0}\n'
    assert dataset["size_bytes"] == len(stored)
    assert dataset["sha256"] == hashlib.sha256(stored).hexdigest()


def test_read_rows_gives_the_normalised_rows(api: Any) -> None:
    dataset = upload(api, "rows.jsonl", STATEMENTS).json()
    rows = read_rows(api.app.state.artifacts, registered(api, dataset["id"]))
    assert rows == [{"text": "Paris is in France.", "label": 1}, {"text": "Paris is in Peru.", "label": 0}]


def test_texts_of_statements_are_their_texts(api: Any) -> None:
    path = real_file("geometry_of_truth/cities.csv")
    dataset = upload(api, path.name, path.read_bytes()).json()
    with path.open(newline="", encoding="utf-8") as handle:
        statements = [row["statement"].strip() for row in csv.DictReader(handle)]
    assert texts_of(api, dataset["id"]) == statements


def test_texts_of_multiple_choice_are_lettered_prompts(api: Any) -> None:
    dataset = upload(api, "rows.jsonl", QUESTION).json()
    assert texts_of(api, dataset["id"]) == ["What is 2 + 2?\nA. 3\nB. 4\nAnswer:"]


def test_chat_conversations_are_never_rendered_as_texts(api: Any) -> None:
    dataset = upload(api, "chats.jsonl", CHAT).json()
    with pytest.raises(UnlabelledDataset, match="holds chat conversations"):
        texts_of(api, dataset["id"])


def texts_of(api: Any, dataset_id: str) -> list[str]:
    dataset = registered(api, dataset_id)
    return rendered_rows(read_rows(api.app.state.artifacts, dataset), dataset.kind, "raw")


def test_format_multiple_choice_letters_each_choice_on_its_line_and_ends_with_answer() -> None:
    prompt = format_multiple_choice("Which planet is largest?", ["Mars", "Jupiter", "Venus"])
    assert prompt == "Which planet is largest?\nA. Mars\nB. Jupiter\nC. Venus\nAnswer:"


def test_datasets_are_listed_newest_first_in_pages(api: Any) -> None:
    ids = [upload(api, f"set{index}.jsonl", STATEMENTS * index).json()["id"] for index in (1, 2, 3)]
    first = api.get("/v1/datasets", params={"limit": 2}).json()
    second = api.get("/v1/datasets", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [d["id"] for d in first["items"] + second["items"]] == ids[::-1]
    assert second["next_cursor"] is None


def test_an_unknown_dataset_is_a_404(api: Any) -> None:
    response = api.get("/v1/datasets/dst_nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_an_upload_without_a_file_is_a_422_naming_it(api: Any) -> None:
    response = api.post("/v1/datasets", data={"name": "x"})
    assert response.status_code == 422
    assert [item["field"] for item in response.json()["error"]["details"]["fields"]] == ["file"]


def test_an_upload_losing_a_race_for_the_same_rows_returns_the_winner_and_keeps_its_file(api: Any) -> None:
    sessions, store = api.app.state.sessions, api.app.state.artifacts
    normalised = parse_upload(STATEMENTS, "rows.jsonl")
    winner = new_dataset("winner", normalised)
    results: list[tuple[Dataset, bool]] = []
    with sessions() as winning_session:
        winning_session.add(winner)
        winning_session.flush()  # the winner's row holds the sha256, not yet committed
        loser = threading.Thread(target=lambda: results.append(register_dataset(sessions, store, normalised, "loser")))
        loser.start()
        wait_until(lambda: store.exists(normalised.artifact_key), 10, "the loser to write the file")
        winning_session.commit()
    loser.join(30)
    [(dataset, created)] = results
    assert (dataset.id, created) == (winner.id, False)
    assert store.exists(normalised.artifact_key)


def refuse_dataset_inserts(database_url: str) -> None:
    """A trigger that makes the database refuse every new dataset row."""
    engine = create_registry_engine(database_url)
    with engine.begin() as connection:
        if database_url.startswith("sqlite"):
            connection.execute(
                text("CREATE TRIGGER refuse BEFORE INSERT ON datasets BEGIN SELECT RAISE(ABORT, 'refused'); END")
            )
        else:
            connection.execute(
                text(
                    "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$ LANGUAGE plpgsql"
                )
            )
            connection.execute(
                text("CREATE TRIGGER refuse BEFORE INSERT ON datasets FOR EACH ROW EXECUTE FUNCTION refuse()")
            )
    engine.dispose()


def test_a_refused_insert_leaves_no_file_behind(api: Any, settings: Settings) -> None:
    refuse_dataset_inserts(settings.resolved_database_url)
    normalised = parse_upload(STATEMENTS, "rows.jsonl")
    with pytest.raises((RegistrationRace, SQLAlchemyError)):
        register_dataset(api.app.state.sessions, api.app.state.artifacts, normalised, "refused")
    assert stored_dataset_files(settings) == []


def test_a_large_upload_is_stored_as_the_normalised_rows_computed_independently(api: Any, settings: Settings) -> None:
    count = 100_000
    raw = b"".join(
        b'{"text": " Statement number %d. ", "label": %d, "extra": 1}\n' % (i, i % 3 == 0) for i in range(count)
    )
    expected = b"".join(b'{"text":"Statement number %d.","label":%d}\n' % (i, i % 3 == 0) for i in range(count))
    dataset = upload(api, "many.jsonl", raw).json()
    assert dataset["rows"] == count
    assert dataset["sha256"] == hashlib.sha256(expected).hexdigest()
    assert dataset["upload_sha256"] == hashlib.sha256(raw).hexdigest()
    assert dataset["size_bytes"] == len(expected)
    assert dataset["label_balance"] == {"0": count - len(range(0, count, 3)), "1": len(range(0, count, 3))}
    stored = settings.resolved_artifact_dir / "datasets" / f"{dataset['sha256']}.jsonl"
    assert stored.read_bytes() == expected


def test_a_malformed_row_deep_in_a_large_upload_is_a_422_and_nothing_is_kept(api: Any, settings: Settings) -> None:
    good = b"".join(b'{"text": "Statement %d.", "label": 1}\n' % i for i in range(50_000))
    response = upload(api, "many.jsonl", good + b'{"text": "Broken.", "label": 7}\n')
    assert response.status_code == 422
    assert response.json()["error"]["details"] == {"line": 50_001, "field": "label"}
    assert stored_dataset_files(settings) == []


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_csv_rows_end_at_any_line_break_and_a_quoted_cell_may_span_lines(api: Any, newline: bytes) -> None:
    rows = [b"text,label", b'"Paris is', b'in France.",true', b"Paris is in Peru.,false", b"Rome is in Italy.,1"]
    dataset = upload(api, "rows.csv", newline.join(rows) + newline).json()
    stored = read_rows(api.app.state.artifacts, registered(api, dataset["id"]))
    assert [row["label"] for row in stored] == [1, 0, 1]
    assert stored[0]["text"] == "Paris is" + newline.decode() + "in France."
    assert stored[2]["text"] == "Rome is in Italy."


def test_rows_at_gives_the_rows_at_those_positions_in_the_order_asked(api: Any) -> None:
    raw = b"".join(b'{"text": "Statement %d.", "label": %d}\n\n' % (i, i % 2) for i in range(50))
    dataset = registered(api, upload(api, "rows.jsonl", raw).json()["id"])
    store = api.app.state.artifacts
    every = read_rows(store, dataset)
    asked = [49, 0, 7, 7, 21]
    assert rows_at(store, dataset, asked) == [every[index] for index in asked]
    assert rows_at(store, dataset, []) == []
    with pytest.raises(IndexError, match="no row 50"):
        rows_at(store, dataset, [3, 50])
    with pytest.raises(IndexError, match="no row -1"):
        rows_at(store, dataset, [-1])


def test_rows_between_reads_a_window_of_rows_from_where_it_starts(api: Any) -> None:
    raw = b"".join(b'{"text": "Statement %d.", "label": %d}\n' % (i, i % 2) for i in range(50))
    dataset = registered(api, upload(api, "rows.jsonl", raw).json()["id"])
    store = api.app.state.artifacts
    every = read_rows(store, dataset)
    assert rows_between(store, dataset, 10, 20) == every[10:20]
    assert rows_between(store, dataset, 45, 60) == every[45:]
    assert rows_between(store, dataset, 50, 60) == []
    offsets = row_offsets(store.local_path(dataset.artifact))
    content = store.local_path(dataset.artifact).read_bytes()
    assert len(offsets) == 51 and offsets[-1] == len(content)
    assert [json.loads(content[offsets[i] : offsets[i + 1]]) for i in (0, 33, 49)] == [every[0], every[33], every[49]]
