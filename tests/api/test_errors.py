"""Every error answer is the envelope `{"error": {"code", "message", "details"}}`."""

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select

from app.main import create_app
from app.registry.tables import Extraction, ProbeRun
from app.settings import Settings
from tests.conftest import free_port, make_settings


def assert_envelope(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    return body["error"]


def test_an_unknown_route_is_a_404_in_the_envelope(api: Any) -> None:
    assert_envelope(api.get("/v1/nothing-here"), 404, "not_found")


def test_a_wrong_method_is_a_405_in_the_envelope(api: Any) -> None:
    assert_envelope(api.delete("/v1/jobs"), 405, "method_not_allowed")


def test_malformed_json_is_a_422_naming_the_body(api: Any) -> None:
    response = api.post("/v1/models", content=b"{not json", headers={"content-type": "application/json"})
    error = assert_envelope(response, 422, "validation_error")
    assert error["details"]["fields"][0]["field"] == "body"


def test_a_body_over_the_limit_is_a_413_by_its_declared_length(api: Any, settings: Settings) -> None:
    body = b'{"name": "' + b"x" * settings.max_request_bytes + b'"}'
    response = api.post("/v1/models", content=body, headers={"content-type": "application/json"})
    error = assert_envelope(response, 413, "payload_too_large")
    assert error["details"]["limit_bytes"] == settings.max_request_bytes


def test_a_chunked_body_over_the_limit_is_a_413_while_it_streams(api: Any, settings: Settings) -> None:
    def chunks() -> Any:
        yield b'{"name": "'
        for _ in range(settings.max_request_bytes // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'

    response = api.post("/v1/models", content=chunks(), headers={"content-type": "application/json"})
    assert_envelope(response, 413, "payload_too_large")


def test_an_unreachable_redis_is_a_503_and_leaves_nothing_registered(
    database_url: str, tmp_path: Path, tiny_llama: Path
) -> None:
    settings = make_settings(database_url, f"redis://127.0.0.1:{free_port()}/0", tmp_path / "var")
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/models", json={"name": "tiny", "source": str(tiny_llama)})
        error = assert_envelope(response, 503, "unavailable")
        assert "redis" in error["message"].lower()
        assert client.get("/v1/models").json()["items"] == []
        assert client.get("/v1/jobs").json()["items"] == []


def nul_fields(response: Any) -> list[tuple[str, str]]:
    error = assert_envelope(response, 422, "validation_error")
    return [(item["field"], item["in"]) for item in error["details"]["fields"]]


def test_a_nul_character_in_a_path_or_query_is_a_422_naming_where_on_either_registry(api: Any) -> None:
    """PostgreSQL cannot store one; without the check the same request is a 500 there and a
    404 on SQLite."""
    assert nul_fields(api.get("/v1/models/mdl_%00")) == [("path", "path")]
    assert nul_fields(api.post("/v1/jobs/job_%00/cancel")) == [("path", "path")]
    assert nul_fields(api.get("/v1/adapters", params={"base_model": "mdl_\x00", "cursor": "c"})) == [
        ("base_model", "query")
    ]
    assert api.get("/v1/models/mdl_0").status_code == 404  # the same request without it


def test_a_nul_character_anywhere_in_a_body_or_form_is_a_422_naming_the_field(api: Any, tiny_llama: Path) -> None:
    assert nul_fields(api.post("/v1/models", json={"name": "tiny\x00", "source": str(tiny_llama)})) == [
        ("name", "body")
    ]
    assert nul_fields(api.post("/v1/keys", json={"name": "k\x00", "scopes": ["read"]})) == [("name", "body")]
    extraction = {"model": "mdl_0", "texts": ["fine", "not\x00fine"], "layers": [0]}
    assert nul_fields(api.post("/v1/extractions", json=extraction)) == [("texts", "body")]
    experiment = {
        "experiment": {"name": "e\x00"},
        "model": {"name": str(tiny_llama)},
        "extraction": {"layers": [0]},
        "probe": {"dataset": "dst_0"},
    }
    assert nul_fields(api.post("/v1/experiments", json=experiment)) == [("experiment.name", "body")]
    statements = b'{"text": "a", "label": 1}\n' * 3 + b'{"text": "b", "label": 0}\n' * 3
    upload = api.post("/v1/datasets", files={"file": ("s.jsonl", statements)}, data={"name": "s\x00"})
    assert nul_fields(upload) == [("name", "body")]
    adapter = api.post(
        "/v1/adapters/upload", files={"file": ("a.tar", b"archive")}, data={"base_model": "mdl_\x00", "name": "a"}
    )
    assert nul_fields(adapter) == [("base_model", "body")]

    # a file's name is kept too (a dataset's default name, an import's source)
    def raw_form(filename: bytes, content: bytes, **fields: str) -> dict[str, Any]:
        """A multipart body written by hand: clients escape a NUL in a file name, a hostile one need not."""
        parts = [
            f'--b\r\ncontent-disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
            for name, value in fields.items()
        ]
        parts.append(
            b'--b\r\ncontent-disposition: form-data; name="file"; filename="'
            + filename
            + b'"\r\n\r\n'
            + content
            + b"\r\n--b--\r\n"
        )
        return {"content": b"".join(parts), "headers": {"content-type": "multipart/form-data; boundary=b"}}

    named = api.post("/v1/datasets", **raw_form(b"s\x00.jsonl", statements))
    assert (named.status_code, named.json()["error"]["details"].get("field")) == (422, "file")
    model = api.post("/v1/models", json={"name": "tiny", "source": str(tiny_llama)}).json()
    archive = api.post("/v1/adapters/upload", **raw_form(b"a\x00.tar", b"archive", base_model=model["id"], name="a"))
    assert (archive.status_code, archive.json()["error"]["details"].get("field")) == (422, "file")
    assert api.get("/v1/jobs", params={"kind": "adapter_import"}).json()["items"] == []
    assert api.get("/v1/datasets").json()["items"] == []
    # however deeply a body nests, its check is a loop, not a recursion that could run out of stack
    for depth in (400, 5000):  # the second deeper than JSON parsing itself goes
        deep = '{"k": [' * depth + '"end\\u0000"' + "]}" * depth
        body = f'{{"source": "/nowhere", "base_model": "{model["id"]}", "name": "n", "metadata": {deep}}}'
        nested = api.post("/v1/adapters/import", content=body, headers={"content-type": "application/json"})
        assert nested.status_code == 422, (depth, nested.text[:300])
    assert api.post("/v1/models", json={"name": "tiny-2", "source": str(tiny_llama)}).status_code in (200, 201)


def test_a_job_the_queue_refuses_leaves_neither_its_row_nor_what_it_works_on(
    database_url: str, redis_server: Any, tmp_path: Path, tiny_llama: Path
) -> None:
    up = make_settings(database_url, redis_server.url, tmp_path / "var")
    with TestClient(create_app(up)) as client:
        model = client.post("/v1/models", json={"name": "tiny", "source": str(tiny_llama)}).json()
        rows = "".join(f'{{"text": "statement {i}", "label": {i % 2}}}\n' for i in range(20))
        dataset = client.post("/v1/datasets", files={"file": ("rows.jsonl", rows.encode(), "application/jsonl")}).json()
    down = up.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(create_app(down)) as client:
        requests = {
            "/v1/extractions": {"model": model["id"], "layers": [1], "texts": ["a text"]},
            "/v1/probes": {"model": model["id"], "dataset": dataset["id"], "layers": [1]},
            "/v1/jobs/ping": None,
        }
        for route, body in requests.items():
            response = client.post(route, json=body) if body is not None else client.post(route)
            assert (response.status_code, response.json()["error"]["details"]) == (503, {"backend": "redis"}), route
        with client.app.state.sessions() as session:  # type: ignore[attr-defined]
            assert session.scalars(select(ProbeRun)).all() == [] and session.scalars(select(Extraction)).all() == []
        assert [job["kind"] for job in client.get("/v1/jobs").json()["items"]] == ["model_check"]
