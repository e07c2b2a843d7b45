"""Bodies built to break the gateway — nested past any parser's stack, aliases that stand
for millions of values, names past their limits, a disk that fills mid-upload — are answered
4xx when the client is at fault and 503 when the disk is, never 500, and leave nothing."""

import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from app.inputs.documents import MAX_DOCUMENT_DEPTH
from app.main import create_app
from app.settings import Settings
from tests.api.test_errors import assert_envelope
from tests.conftest import make_settings

DEEP = 200_000  # levels: far past the interpreter's recursion limit


def nested_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def nested_object(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def experiment(model_name: str, **model: Any) -> dict[str, Any]:
    return {
        "experiment": {"name": "x"},
        "model": {"name": model_name, **model},
        "extraction": {"layers": [1]},
        "probe": {"dataset": "dst_x"},
    }


@pytest.mark.parametrize("content_type", ["application/json", "application/yaml"])
def test_an_experiment_config_nested_past_the_parsers_stack_is_a_422_naming_the_body(
    api: Any, content_type: str
) -> None:
    response = api.post("/v1/experiments", content=nested_json(DEEP), headers={"content-type": content_type})
    error = assert_envelope(response, 422, "invalid_field")
    assert error["details"]["field"] == "body"


def test_a_yaml_config_of_nested_mappings_is_a_422(api: Any) -> None:
    body = b"a: " + b"{b: " * 5000 + b"1" + b"}" * 5000
    response = api.post("/v1/experiments", content=body, headers={"content-type": "application/yaml"})
    assert_envelope(response, 422, "invalid_field")


def test_a_config_just_past_the_depth_limit_is_refused_though_it_parses(api: Any) -> None:
    config = experiment("org/model") | {"extras": nested_object(MAX_DOCUMENT_DEPTH + 1)}
    response = api.post(
        "/v1/experiments", content=json.dumps(config).encode(), headers={"content-type": "application/json"}
    )
    error = assert_envelope(response, 422, "invalid_field")
    assert error["details"] == {"field": "body", "max_depth": MAX_DOCUMENT_DEPTH}


def test_yaml_aliases_standing_for_a_billion_values_are_a_422(api: Any) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    response = api.post(
        "/v1/experiments", content="\n".join(lines).encode(), headers={"content-type": "application/yaml"}
    )
    error = assert_envelope(response, 422, "invalid_field")
    assert "values" in error["message"]


def test_a_yaml_config_that_contains_itself_is_a_422(api: Any) -> None:
    response = api.post(
        "/v1/experiments", content=b"experiment: &loop [*loop]", headers={"content-type": "application/yaml"}
    )
    assert_envelope(response, 422, "invalid_field")


def test_any_json_body_nested_past_the_parsers_stack_is_a_422_not_a_500(api: Any) -> None:
    for route in ("/v1/extractions", "/v1/models", "/v1/probes", "/v1/adapters/import"):
        response = api.post(route, content=nested_json(DEEP), headers={"content-type": "application/json"})
        error = assert_envelope(response, 422, "invalid_field")
        assert error["details"]["field"] == "body", route


def test_adapter_metadata_nested_past_the_limit_is_a_422_naming_it(api: Any) -> None:
    body = {"source": "/nowhere", "base_model": "mdl_x", "name": "a", "metadata": nested_object(MAX_DOCUMENT_DEPTH + 1)}
    response = api.post("/v1/adapters/import", json=body)
    error = assert_envelope(response, 422, "validation_error")
    assert [item["field"] for item in error["details"]["fields"]] == ["metadata"]


@pytest.mark.parametrize("metadata", [nested_json(DEEP).decode(), json.dumps(nested_object(MAX_DOCUMENT_DEPTH + 1))])
def test_uploaded_adapter_metadata_nested_too_deeply_is_a_422_naming_it(api: Any, metadata: str) -> None:
    response = api.post(
        "/v1/adapters/upload",
        data={"base_model": "mdl_x", "name": "a", "metadata": metadata},
        files={"file": ("a.zip", io.BytesIO(b"PK\x05\x06" + bytes(18)), "application/zip")},
    )
    error = assert_envelope(response, 422, "invalid_field")
    assert error["details"]["field"] == "metadata"


def test_an_experiment_model_path_longer_than_a_display_name_registers_under_the_folders_name(
    api: Any, tiny_llama: Path, tmp_path: Path
) -> None:
    folder = tmp_path.joinpath(*["d" * 60] * 4, "tiny-llama")
    shutil.copytree(tiny_llama, folder)
    assert len(str(folder)) > 200
    rows = "".join(json.dumps({"text": f"statement {i}", "label": i % 2}) + "\n" for i in range(20))
    dataset = api.post("/v1/datasets", files={"file": ("rows.jsonl", rows.encode(), "application/jsonl")}).json()
    config = experiment(str(folder)) | {"probe": {"dataset": dataset["id"]}}
    response = api.post("/v1/experiments", json=config)
    assert response.status_code == 202, response.json()
    model = api.get(f"/v1/models/{response.json()['experiment']['links']['model'].rsplit('/', 1)[1]}").json()
    assert (model["name"], model["source"]) == ("tiny-llama", str(folder))


def test_an_experiment_models_errors_name_the_configs_key(api: Any) -> None:
    response = api.post("/v1/experiments", json=experiment("x" * 300))
    error = assert_envelope(response, 422, "invalid_field")
    assert error["details"]["field"] == "model.name" and error["message"].startswith("model.name: ")


# --- a disk that fills ---------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB filesystem (tmpfs), where writes fail with ENOSPC as on a full disk."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True
        ).returncode
    ):
        pytest.skip("mounting a small tmpfs needs root and a system that allows it")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def api_on_small_disk(database_url: str, redis_server: Any, small_disk: Path) -> Iterator[tuple[TestClient, Settings]]:
    settings = make_settings(database_url, redis_server.url, small_disk / "var")
    with TestClient(create_app(settings)) as client:
        yield client, settings


def files_under(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()] if folder.exists() else []


def test_a_dataset_upload_that_fills_the_disk_is_a_503_and_leaves_no_file(
    api_on_small_disk: tuple[TestClient, Settings],
) -> None:
    client, settings = api_on_small_disk
    rows = "".join(
        json.dumps({"text": f"statement number {i} " + "x" * 40, "label": i % 2}) + "\n" for i in range(60_000)
    )
    response = client.post("/v1/datasets", files={"file": ("big.jsonl", rows.encode(), "application/jsonl")})
    error = assert_envelope(response, 503, "store_full")
    assert response.headers["retry-after"]
    assert error["details"] == {"backend": "disk"}
    assert files_under(settings.resolved_artifact_dir / "datasets") == []
    assert client.get("/v1/datasets").json()["items"] == []


def test_an_adapter_upload_that_fills_the_disk_is_a_503_and_leaves_no_file(
    api_on_small_disk: tuple[TestClient, Settings], tiny_llama: Path
) -> None:
    client, settings = api_on_small_disk
    model = client.post("/v1/models", json={"name": "tiny", "source": str(tiny_llama)}).json()
    archive = b"PK\x03\x04" + os.urandom(3 * 2**20)  # checked by its magic bytes only, then stored
    response = client.post(
        "/v1/adapters/upload",
        data={"base_model": model["id"], "name": "a"},
        files={"file": ("a.zip", archive, "application/zip")},
    )
    assert_envelope(response, 503, "store_full")
    assert files_under(settings.resolved_artifact_dir / "staging") == []


def test_yaml_documents_are_read_with_the_safe_loader(api: Any) -> None:
    body = yaml.dump({"experiment": {"name": "x"}}) + "\nmodel: !!python/object/apply:os.getcwd []\n"
    response = api.post("/v1/experiments", content=body.encode(), headers={"content-type": "application/yaml"})
    error = assert_envelope(response, 422, "invalid_field")
    assert error["details"]["field"] == "body"
