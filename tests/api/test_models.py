"""Registering base models: what the gateway answers at once, before any worker runs."""

import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from app.inputs.model_configs import (
    MAX_ATTENTION_HEADS,
    MAX_EXPERTS,
    MAX_HIDDEN_SIZE,
    MAX_INTERMEDIATE_SIZE,
    MAX_LAYERS,
    MAX_POSITION_EMBEDDINGS,
    MAX_VOCAB_SIZE,
)
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
    queue = redis.Redis.from_url(settings.resolved_redis_url).lrange(f"rq:queue:{settings.queue_prefix}:jobs", 0, -1)
    queued = cast(list[bytes], queue)  # a connection without decode_responses answers bytes
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


def _put_in_hf_cache(
    cache: Path, repo_id: str, files: Path, commit: str = "0123456789abcdef0123456789abcdef01234567"
) -> Path:
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


def test_with_model_roots_a_folder_outside_them_is_a_403_whether_or_not_it_exists(
    settings: Settings, tiny_llama: Path, tmp_path: Path
) -> None:
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
            assert (
                response.json()["error"]["details"]["field"] == "source"
                and "MODEL_ROOTS" in response.json()["error"]["message"]
            )
        assert len(api.get("/v1/models").json()["items"]) == 1


# --- Hostile sources: revisions, special files, absurd configs ------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"
# How long a request may take before the test calls it hung: a detector of requests that
# never end, not a measure of speed.
HANG_S = 60


def _release_fifos(paths: list[Path]) -> None:
    """Open each FIFO for writing and close it: a reader blocked on it gets end-of-file."""
    for path in paths:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader waiting, or no FIFO there
            pass


def answered(call: Callable[[], Any], fifos: list[Path] | None = None) -> Any:
    """What `call` returns, run in a thread that must end within HANG_S: a request blocked
    on a FIFO would otherwise hang the whole run. The FIFOs are released either way."""
    outcome: list[Any] = []
    thread = threading.Thread(target=lambda: outcome.append(call()), daemon=True)
    thread.start()
    thread.join(HANG_S)
    _release_fifos(fifos or [])
    assert outcome, f"no answer within {HANG_S} s: the request is blocked"
    return outcome[0]


def _hf_repository(settings: Settings, tiny_llama: Path, repo_id: str = "tiny-org/tiny-llama") -> Path:
    assert settings.hf_cache_dir is not None
    _put_in_hf_cache(settings.hf_cache_dir, repo_id, tiny_llama, COMMIT)
    return settings.hf_cache_dir / f"models--{repo_id.replace('/', '--')}"


def _error(response: Any) -> dict[str, Any]:
    return response.json()["error"]


def _names_field(response: Any, field: str) -> bool:
    error = _error(response)
    return error["details"].get("field") == field or field in {
        item["field"] for item in error["details"].get("fields", [])
    }


@pytest.mark.parametrize(
    "revision",
    [
        "/dev/zero",
        "../..",
        "../../../../etc/passwd",
        "main/../../x",
        "a//b",
        "/main",
        "main/",
        ".git",
        "refs/.hidden",
        "x.lock",
        "a b",
        "main\n",
    ],
)
def test_a_revision_that_is_not_a_ref_name_is_a_422_naming_revision(
    api: Any, settings: Settings, tiny_llama: Path, revision: str
) -> None:
    _hf_repository(settings, tiny_llama)
    response = answered(lambda: register(api, "tiny-org/tiny-llama", revision=revision))
    assert response.status_code == 422
    assert _names_field(response, "revision")
    assert api.get("/v1/models").json()["items"] == []


def test_an_experiment_configs_model_revision_is_checked_the_same_way(api: Any) -> None:
    config = {
        "experiment": {"name": "x"},
        "model": {"name": "tiny-org/tiny-llama", "revision": "/dev/zero"},
        "extraction": {"layers": [1]},
        "probe": {"dataset": "ds_x"},
    }
    response = answered(lambda: api.post("/v1/experiments", json=config))
    assert response.status_code == 422
    assert _names_field(response, "model.revision")


def test_a_commit_hash_revision_and_a_tag_in_refs_both_resolve_to_the_snapshot(
    api: Any, settings: Settings, tiny_llama: Path
) -> None:
    repository = _hf_repository(settings, tiny_llama)
    (repository / "refs" / "release").mkdir()
    (repository / "refs" / "release" / "v1.0").write_text(COMMIT + "\n")
    for revision in (COMMIT, "release/v1.0"):
        response = register(api, "tiny-org/tiny-llama", revision=revision)
        assert response.status_code == 201, response.json()
        assert Path(response.json()["resolved_path"]) == (repository / "snapshots" / COMMIT).resolve()


def test_a_ref_that_is_a_fifo_is_a_prompt_422_naming_revision(api: Any, settings: Settings, tiny_llama: Path) -> None:
    repository = _hf_repository(settings, tiny_llama)
    os.mkfifo(repository / "refs" / "pipe")
    response = answered(lambda: register(api, "tiny-org/tiny-llama", revision="pipe"), [repository / "refs" / "pipe"])
    assert response.status_code == 422
    assert _names_field(response, "revision") and "FIFO" in _error(response)["message"]


def test_a_ref_that_is_a_folder_answers_exactly_like_a_missing_ref(
    api: Any, settings: Settings, tiny_llama: Path
) -> None:
    repository = _hf_repository(settings, tiny_llama)
    (repository / "refs" / "dir-ref").mkdir()
    as_folder = register(api, "tiny-org/tiny-llama", revision="dir-ref")
    as_missing = register(api, "tiny-org/tiny-llama", revision="gone-ref")
    assert as_folder.status_code == as_missing.status_code == 404
    assert _error(as_folder)["message"].replace("dir-ref", "gone-ref") == _error(as_missing)["message"]
    assert _error(as_folder)["details"] == _error(as_missing)["details"]


@pytest.mark.parametrize(
    "content",
    ["{elsewhere}", "../../../{elsewhere_name}", "not a commit", "0" * 100_000],
    ids=["absolute", "relative", "text", "long"],
)
def test_a_ref_that_does_not_hold_a_commit_hash_registers_nothing(
    api: Any, settings: Settings, tiny_llama: Path, tmp_path: Path, content: str
) -> None:
    repository = _hf_repository(settings, tiny_llama)
    elsewhere = shutil.copytree(tiny_llama, tmp_path / "elsewhere")  # a model outside the cache
    (repository / "refs" / "main").write_text(content.format(elsewhere=elsewhere, elsewhere_name=elsewhere.name))
    response = answered(lambda: register(api, "tiny-org/tiny-llama"))
    assert response.status_code == 422
    assert _names_field(response, "revision") and "commit hash" in _error(response)["message"]
    assert api.get("/v1/models").json()["items"] == []


def test_a_ref_that_is_a_device_is_refused_without_reading_it(api: Any, settings: Settings, tiny_llama: Path) -> None:
    repository = _hf_repository(settings, tiny_llama)
    (repository / "refs" / "zero").symlink_to("/dev/zero")
    response = answered(lambda: register(api, "tiny-org/tiny-llama", revision="zero"))
    assert response.status_code == 422
    assert _names_field(response, "revision") and "character device" in _error(response)["message"]


def test_a_snapshot_linked_out_of_the_cache_is_a_403_that_does_not_say_where_it_leads(
    api: Any, settings: Settings, tiny_llama: Path, tmp_path: Path
) -> None:
    repository = _hf_repository(settings, tiny_llama)
    elsewhere = shutil.copytree(tiny_llama, tmp_path / "elsewhere")
    other = "fedcba9876543210fedcba9876543210fedcba98"
    (repository / "snapshots" / other).symlink_to(elsewhere)
    response = register(api, "tiny-org/tiny-llama", revision=other)
    assert response.status_code == 403
    assert _names_field(response, "source") and str(elsewhere) not in _error(response)["message"]
    assert api.get("/v1/models").json()["items"] == []


def test_with_model_roots_a_cache_outside_them_is_a_403_whether_or_not_the_model_is_cached(
    settings: Settings, tiny_llama: Path, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    _hf_repository(settings, tiny_llama)
    (tmp_path / "roots").mkdir()
    with TestClient(create_app(settings.model_copy(update={"model_roots": [tmp_path / "roots"]}))) as api:
        for repo_id in ("tiny-org/tiny-llama", "tiny-org/not-cached"):
            response = register(api, repo_id)
            assert response.status_code == 403, repo_id
            assert _names_field(response, "source") and "MODEL_ROOTS" in _error(response)["message"]
            assert str(settings.hf_cache_dir) not in _error(response)["message"]


def test_with_model_roots_holding_the_cache_a_cached_model_registers(settings: Settings, tiny_llama: Path) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    _hf_repository(settings, tiny_llama)
    assert settings.hf_cache_dir is not None
    with TestClient(create_app(settings.model_copy(update={"model_roots": [settings.hf_cache_dir]}))) as api:
        assert register(api, "tiny-org/tiny-llama").status_code == 201


def test_a_config_json_that_is_a_fifo_is_a_prompt_422_naming_the_source(api: Any, tiny_llama: Path) -> None:
    (tiny_llama / "config.json").unlink()
    os.mkfifo(tiny_llama / "config.json")
    response = answered(lambda: register(api, tiny_llama), [tiny_llama / "config.json"])
    assert response.status_code == 422
    assert _names_field(response, "source") and "FIFO" in _error(response)["message"]


def test_a_config_json_linked_to_a_device_is_a_422_naming_the_source(api: Any, tiny_llama: Path) -> None:
    (tiny_llama / "config.json").unlink()
    (tiny_llama / "config.json").symlink_to("/dev/zero")
    response = answered(lambda: register(api, tiny_llama))
    assert response.status_code == 422
    assert _names_field(response, "source") and "character device" in _error(response)["message"]


def test_a_config_json_over_its_size_bound_is_a_422_naming_the_source(api: Any, tiny_llama: Path) -> None:
    from app.inputs.user_files import METADATA_MAX_BYTES

    config = json.loads((tiny_llama / "config.json").read_text())
    config["padding"] = "x" * METADATA_MAX_BYTES
    (tiny_llama / "config.json").write_text(json.dumps(config))
    response = register(api, tiny_llama)
    assert response.status_code == 422
    assert _names_field(response, "source") and "config.json is larger than" in _error(response)["message"]


@pytest.mark.parametrize(
    "text",
    ['{"n": ' + "1" * 5000 + "}", "[" * 100_000 + "]" * 100_000, b"\xff\xfe{}"],
    ids=["long-number", "deep", "not-utf8"],
)
def test_a_config_json_python_cannot_parse_is_a_422_not_a_500(api: Any, tiny_llama: Path, text: str | bytes) -> None:
    (tiny_llama / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    response = register(api, tiny_llama)
    assert response.status_code == 422
    assert _names_field(response, "source")


def test_weight_files_that_are_fifos_do_not_block_registration(api: Any, tiny_llama: Path) -> None:
    (tiny_llama / "model.safetensors").unlink()
    os.mkfifo(tiny_llama / "model.safetensors")
    response = answered(lambda: register(api, tiny_llama), [tiny_llama / "model.safetensors"])
    assert response.status_code == 201


def _with_config(folder: Path, **changes: Any) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("key", "bound"),
    [
        ("num_hidden_layers", MAX_LAYERS),
        ("hidden_size", MAX_HIDDEN_SIZE),
        ("intermediate_size", MAX_INTERMEDIATE_SIZE),
        ("num_attention_heads", MAX_ATTENTION_HEADS),
        ("num_key_value_heads", MAX_ATTENTION_HEADS),
        ("vocab_size", MAX_VOCAB_SIZE),
        ("max_position_embeddings", MAX_POSITION_EMBEDDINGS),
        ("num_local_experts", MAX_EXPERTS),
    ],
)
def test_a_config_size_over_its_bound_is_a_422_naming_the_key_and_the_bound(
    api: Any, tiny_llama: Path, key: str, bound: int
) -> None:
    response = register(api, _with_config(tiny_llama, **{key: 10**9}))
    assert response.status_code == 422
    error = _error(response)
    assert error["details"]["field"] == "source" and error["details"]["config_key"] == key
    assert error["details"]["bound"] == bound and f"{bound:,}" in error["message"]
    assert api.get("/v1/models").json()["items"] == []


def test_the_largest_sizes_within_the_bounds_are_accepted(api: Any, tiny_llama: Path) -> None:
    folder = _with_config(
        tiny_llama, num_hidden_layers=MAX_LAYERS, hidden_size=MAX_HIDDEN_SIZE, vocab_size=MAX_VOCAB_SIZE
    )
    assert register(api, folder).status_code == 201


@pytest.mark.parametrize(
    "value",
    [-1, 1.5, True, "12", [4, -4], {"n": 3}],
    ids=["negative", "float", "bool", "string", "negative-in-list", "object"],
)
def test_a_config_size_that_is_not_a_whole_number_is_a_422_naming_the_key(
    api: Any, tiny_llama: Path, value: Any
) -> None:
    response = register(api, _with_config(tiny_llama, intermediate_size=value))
    assert response.status_code == 422
    assert _error(response)["details"]["config_key"].startswith("intermediate_size")


def test_sizes_nested_in_a_sub_config_are_bounded_too(api: Any, tiny_llama: Path) -> None:
    response = register(api, _with_config(tiny_llama, text_config={"num_hidden_layers": 10**9}))
    assert response.status_code == 422
    assert _error(response)["details"]["config_key"] == "text_config.num_hidden_layers"


def test_too_many_expert_blocks_are_a_422_even_when_each_size_is_within_bounds(api: Any, tiny_llama: Path) -> None:
    response = register(api, _with_config(tiny_llama, num_hidden_layers=MAX_LAYERS, num_local_experts=MAX_EXPERTS))
    assert response.status_code == 422
    assert "MAX_EXPERT_BLOCKS" in _error(response)["message"]


# --- Messages name paths as the caller gave them ---------------------------------------


def test_a_403_for_model_roots_names_the_source_as_given_not_where_its_link_leads(
    settings: Settings, tiny_llama: Path, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    inside = tmp_path / "models"
    inside.mkdir()
    (inside / "escape").symlink_to(tiny_llama)
    with TestClient(create_app(settings.model_copy(update={"model_roots": [inside]}))) as api:
        linked = register(api, inside / "escape")
        relative = register(api, "./somewhere-else")
    assert linked.status_code == relative.status_code == 403
    assert str(inside / "escape") in _error(linked)["message"] and str(tiny_llama) not in _error(linked)["message"]
    assert "'./somewhere-else'" in _error(relative)["message"] and os.getcwd() not in _error(relative)["message"]


def test_a_missing_relative_folder_is_named_as_given_not_under_the_gateways_working_directory(api: Any) -> None:
    response = register(api, "./no-such-model-folder")
    assert response.status_code == 404
    assert "'./no-such-model-folder'" in _error(response)["message"] and os.getcwd() not in _error(response)["message"]
