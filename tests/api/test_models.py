"""Registering base models: what the gateway answers at once, before any worker runs."""

import json
import shutil
from pathlib import Path
from typing import Any

import redis

from app.settings import Settings
from tests.conftest import TERMINAL


def register(api: Any, source: str | Path, **extra: Any) -> Any:
    return api.post("/v1/models", json={"name": "tiny", "source": str(source), **extra})


def test_registering_a_local_folder_answers_201_with_its_shape_and_a_pending_status(api: Any, tiny_llama: Path) -> None:
    response = register(api, tiny_llama)
    assert response.status_code == 201
    model = response.json()
    assert model["architecture"] == "LlamaForCausalLM"
    assert (model["num_layers"], model["hidden_size"]) == (2, 16)
    assert model["dtype"] == "float32"
    assert model["status"] == "pending"
    assert response.headers["location"] == f"/v1/models/{model['id']}"
    assert api.get(f"/v1/models/{model['id']}").json() == model


def test_registration_queues_a_model_check_job_on_redis(api: Any, settings: Settings, tiny_llama: Path) -> None:
    model = register(api, tiny_llama).json()
    job = api.get(f"/v1/jobs/{model['check_job_id']}").json()
    assert job["kind"] == "model_check" and job["status"] == "queued" and job["model_id"] == model["id"]
    queued = redis.Redis.from_url(settings.resolved_redis_url).lrange(f"rq:queue:{settings.queue_prefix}:jobs", 0, -1)
    assert [item.decode() for item in queued] == [job["id"]]


def test_registering_the_same_source_twice_returns_the_existing_model(api: Any, tiny_llama: Path) -> None:
    first = register(api, tiny_llama)
    second = register(api, str(tiny_llama) + "/")
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    assert [m["id"] for m in api.get("/v1/models").json()["items"]] == [first.json()["id"]]
    assert len(api.get("/v1/jobs").json()["items"]) == 1


def test_another_dtype_of_the_same_source_is_another_model(api: Any, tiny_llama: Path) -> None:
    float32 = register(api, tiny_llama).json()
    bfloat16 = register(api, tiny_llama, dtype="bfloat16").json()
    assert float32["id"] != bfloat16["id"]
    assert bfloat16["dtype"] == "bfloat16"


def test_a_missing_folder_is_a_404_naming_the_source(api: Any, tmp_path: Path) -> None:
    response = register(api, tmp_path / "nowhere")
    assert response.status_code == 404
    assert response.json()["error"]["details"]["field"] == "source"
    assert api.get("/v1/models").json()["items"] == []


def test_a_folder_without_config_is_a_422_naming_the_source(api: Any, tmp_path: Path) -> None:
    response = register(api, tmp_path)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["details"]["field"] == "source" and "config.json" in error["message"]


def test_a_model_that_needs_remote_code_is_refused(api: Any, tiny_llama: Path) -> None:
    config_path = tiny_llama / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    config_path.write_text(json.dumps(config))
    response = register(api, tiny_llama)
    assert response.status_code == 422
    assert "trust_remote_code" in response.json()["error"]["message"]
    assert api.get("/v1/models").json()["items"] == []


def test_a_config_without_layer_count_is_a_422(api: Any, tiny_llama: Path) -> None:
    config_path = tiny_llama / "config.json"
    config = json.loads(config_path.read_text())
    del config["num_hidden_layers"]
    config_path.write_text(json.dumps(config))
    response = register(api, tiny_llama)
    assert response.status_code == 422
    assert "layer count" in response.json()["error"]["message"]


def test_unknown_and_invalid_fields_are_422s_naming_each_field(api: Any, tiny_llama: Path) -> None:
    response = register(api, tiny_llama, dtype="float8", quantisation="8bit")
    assert response.status_code == 422
    fields = {item["field"] for item in response.json()["error"]["details"]["fields"]}
    assert fields == {"dtype", "quantisation"}


def test_a_missing_required_field_is_named(api: Any) -> None:
    response = api.post("/v1/models", json={"name": "x"})
    assert response.status_code == 422
    assert [item["field"] for item in response.json()["error"]["details"]["fields"]] == ["source"]


def test_a_local_folder_with_a_revision_is_refused(api: Any, tiny_llama: Path) -> None:
    response = register(api, tiny_llama, revision="main")
    assert response.status_code == 422
    assert response.json()["error"]["details"]["field"] == "revision"


def _put_in_hf_cache(cache: Path, repo_id: str, files: Path, commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_a_hugging_face_id_in_the_local_cache_resolves_offline(api: Any, settings: Settings, tiny_llama: Path) -> None:
    assert settings.hf_cache_dir is not None
    snapshot = _put_in_hf_cache(settings.hf_cache_dir, "tiny-org/tiny-llama", tiny_llama)
    response = register(api, "tiny-org/tiny-llama")
    assert response.status_code == 201
    model = response.json()
    assert model["source_kind"] == "hf_cache"
    assert Path(model["resolved_path"]).resolve() == snapshot.resolve()


def test_a_hugging_face_id_not_in_the_cache_is_a_404_and_nothing_is_downloaded(api: Any) -> None:
    response = register(api, "meta-llama/Llama-3.1-8B")
    assert response.status_code == 404
    assert "never downloads" in response.json()["error"]["message"]


def test_models_are_listed_newest_first_in_pages(api: Any, tiny_llama: Path) -> None:
    ids = [register(api, tiny_llama, dtype=dtype).json()["id"] for dtype in ("float32", "bfloat16", "float16")]
    first = api.get("/v1/models", params={"limit": 2}).json()
    second = api.get("/v1/models", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [m["id"] for m in first["items"] + second["items"]] == ids[::-1]
    assert second["next_cursor"] is None


def test_an_unknown_model_is_a_404(api: Any) -> None:
    response = api.get("/v1/models/mdl_nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_a_recheck_queues_a_new_job_for_the_model(api: Any, tiny_llama: Path) -> None:
    model = register(api, tiny_llama).json()
    response = api.post(f"/v1/models/{model['id']}/check")
    assert response.status_code == 202
    job = response.json()["job"]
    assert job["status"] not in TERMINAL and job["kind"] == "model_check"
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert api.get(f"/v1/models/{model['id']}").json()["check_job_id"] == job["id"]


def test_a_source_too_long_for_the_filesystem_is_a_422(api: Any) -> None:
    response = register(api, "0" * 900)  # within the field's limit, over the filesystem's 255 per name
    assert response.status_code == 422 and response.json()["error"]["details"]["field"] == "source"


def test_a_path_too_long_for_the_filesystem_is_a_422(api: Any) -> None:
    response = register(api, "/" + "a" * 900)
    assert response.status_code == 422 and response.json()["error"]["details"]["field"] == "source"


def test_with_model_roots_a_folder_outside_them_is_a_403_whether_or_not_it_exists(settings: Settings, tiny_llama: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    inside = tmp_path / "models"
    inside.mkdir()
    allowed = shutil.copytree(tiny_llama, inside / "tiny")
    (inside / "escape").symlink_to(tiny_llama)  # a link out of the root is judged by where it leads
    with TestClient(create_app(settings.model_copy(update={"model_roots": [inside]}))) as api:
        assert register(api, allowed).status_code == 201
        for outside in (tiny_llama, tmp_path / "nowhere", inside / "escape", f"{inside}/../elsewhere"):
            response = register(api, outside)
            assert response.status_code == 403, outside
            assert response.json()["error"]["details"]["field"] == "source" and "MODEL_ROOTS" in response.json()["error"]["message"]
        assert len(api.get("/v1/models").json()["items"]) == 1
