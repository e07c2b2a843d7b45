"""Adapter import end to end: the real Tinker SDK against the stand-in, folders, archives and
uploads through a real worker; what the registry keeps; what the gateway refuses at once."""

import io
import os
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests import tiny_models
from tests.api.test_extractions import download, finished
from tests.api.test_models import register
from tests.conftest import Stack, wait_for_job
from tests.special_files import call_without_blocking
from tests.tinker_standin import StandinCheckpoint

BASE_NAME = "tiny-org/tiny-llama"
TEXTS = ["The city of Paris is in France.", "Fifty-one is larger than forty-nine."]


def adapter_files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in ("adapter_model.safetensors", "adapter_config.json")}


def sources_root(stack: Stack) -> Path:
    root = stack.settings.adapter_roots[0]
    root.mkdir(parents=True, exist_ok=True)
    return root


def import_adapter(stack: Stack, source: str, base_model: str, name: str = "ft") -> dict[str, Any]:
    response = stack.client.post(
        "/v1/adapters/import",
        json={"source": source, "base_model": base_model, "name": name, "metadata": {"dataset": "cities"}},
    )
    assert response.status_code == 202, response.json()
    return wait_for_job(stack.client, response.json()["job"]["id"])


@pytest.fixture
def base(stack: Stack, tiny_llama: Path) -> dict[str, Any]:
    response = stack.client.post("/v1/models", json={"name": BASE_NAME, "source": str(tiny_llama)})
    return response.json()


def tinker_checkpoint(
    tinker_standin: Any, tmp_path: Path, base_folder: Path, base_model: str = BASE_NAME
) -> tuple[StandinCheckpoint, dict[str, Any]]:
    tensors = tiny_models.save_tinker_adapter(tmp_path / "tinker-export", base_folder)
    checkpoint = tinker_standin.add_checkpoint(
        StandinCheckpoint(
            run_id=f"{tmp_path.name}:train:0",
            name="final",
            base_model=base_model,
            files=adapter_files(tmp_path / "tinker-export"),
        )
    )
    return checkpoint, tensors


def hidden_layer_one(model: Any, texts: list[str], tokenizer: Any) -> np.ndarray:
    with torch.inference_mode():
        return np.array(
            [
                model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True).hidden_states[1][0, -1].numpy()
                for text in texts
            ]
        )


def test_a_tinker_checkpoint_imports_through_the_sdk_and_changes_the_hidden_states(
    stack: Stack, base: dict[str, Any], tiny_llama: Path, tinker_standin: Any, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    checkpoint, tensors = tinker_checkpoint(tinker_standin, tmp_path, tiny_llama)
    job = import_adapter(stack, checkpoint.tinker_path, base["id"])
    assert job["status"] == "succeeded", job["error"]
    adapter = stack.client.get(f"/v1/adapters/{job['result']['adapter_id']}").json()
    assert (adapter["r"], adapter["lora_alpha"]) == (4, 8)
    assert adapter["tinker_path"] == checkpoint.tinker_path and adapter["tinker_run_id"] == checkpoint.run_id
    assert (
        adapter["training"]["user"] == {"dataset": "cities"}
        and adapter["training"]["tinker"]["base_model"] == BASE_NAME
    )
    assert "lm_head" in adapter["target_modules"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    stored = stack.settings.resolved_artifact_dir / "adapters" / adapter["identity"]
    imported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), stored).eval()
    ids = torch.tensor([[1, 17, 5, 42, 9]])
    with torch.inference_mode():
        torch.testing.assert_close(
            imported(ids).logits, tiny_models.merge_by_hand(tiny_llama, tensors)(ids).logits, atol=1e-5, rtol=1e-5
        )

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    with_adapter = finished(
        stack.client,
        stack.client.post(
            "/v1/extractions", json={"model": base["id"], "adapter": adapter["id"], "layers": [1], "texts": TEXTS}
        ),
    )
    without = finished(
        stack.client, stack.client.post("/v1/extractions", json={"model": base["id"], "layers": [1], "texts": TEXTS})
    )
    merged = hidden_layer_one(tiny_models.merge_by_hand(tiny_llama, tensors), TEXTS, tokenizer)
    plain = hidden_layer_one(tiny_models.merge_by_hand(tiny_llama, {}), TEXTS, tokenizer)
    np.testing.assert_allclose(download(stack.client, with_adapter["result"]["extraction_id"])[:, 0], merged, atol=1e-5)
    np.testing.assert_allclose(download(stack.client, without["result"]["extraction_id"])[:, 0], plain, atol=1e-5)
    assert not np.allclose(merged, plain, atol=1e-3)
    assert without["result"]["model_loads"] == with_adapter["result"]["model_loads"], "the base was loaded again"


def test_importing_the_same_weights_twice_returns_the_existing_adapter(
    stack: Stack, base: dict[str, Any], tiny_llama: Path, tinker_standin: Any, tmp_path: Path
) -> None:
    checkpoint, _ = tinker_checkpoint(tinker_standin, tmp_path, tiny_llama)
    first = import_adapter(stack, checkpoint.tinker_path, base["id"])
    second = import_adapter(stack, checkpoint.tinker_path, base["id"])
    assert second["result"]["adapter_id"] == first["result"]["adapter_id"] and second["result"]["created"] is False
    assert [a["id"] for a in stack.client.get("/v1/adapters", params={"base_model": base["id"]}).json()["items"]] == [
        first["result"]["adapter_id"]
    ]


def test_a_checkpoint_of_another_base_model_is_refused(
    stack: Stack, base: dict[str, Any], tiny_llama: Path, tinker_standin: Any, tmp_path: Path
) -> None:
    checkpoint, _ = tinker_checkpoint(tinker_standin, tmp_path, tiny_llama, base_model="meta-llama/Llama-3.1-8B")
    job = import_adapter(stack, checkpoint.tinker_path, base["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "base_model_mismatch"
    assert "Llama-3.1-8B" in job["error"]["message"]
    assert stack.client.get("/v1/adapters", params={"base_model": base["id"]}).json()["items"] == []


def test_an_adapter_that_does_not_fit_the_base_fails_and_leaves_nothing(
    stack: Stack, base: dict[str, Any], tmp_path: Path
) -> None:
    wider = tiny_models.save_tiny_llama(tmp_path / "wider", hidden_size=32)
    folder = sources_root(stack) / f"{tmp_path.name}-wide"
    tiny_models.save_tinker_adapter(folder, wider)
    job = import_adapter(stack, str(folder), base["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "adapter_base_mismatch"
    assert stack.client.get("/v1/adapters", params={"base_model": base["id"]}).json()["items"] == []
    staging = stack.settings.resolved_artifact_dir / "staging" / job["id"]
    assert not staging.exists()


def test_a_peft_folder_under_the_allowed_roots_imports(
    stack: Stack, base: dict[str, Any], tiny_llama: Path, tmp_path: Path
) -> None:
    folder = sources_root(stack) / f"{tmp_path.name}-peft"
    tiny_models.save_tinker_adapter(folder, tiny_llama)
    job = import_adapter(stack, str(folder), base["id"])
    assert job["status"] == "succeeded", job["error"]
    adapter = stack.client.get(f"/v1/adapters/{job['result']['adapter_id']}").json()
    assert adapter["source_kind"] == "local_folder"
    stored = stack.settings.resolved_artifact_dir / "adapters" / adapter["identity"]
    assert sorted(p.name for p in stored.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_the_same_weights_with_two_alphas_are_two_adapters_each_extracting_its_own_hidden_states(
    stack: Stack, base: dict[str, Any], tiny_llama: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    seen: dict[float, np.ndarray] = {}
    for alpha in (8, 32):
        folder = sources_root(stack) / f"{tmp_path.name}-alpha-{alpha}"
        tensors = tiny_models.save_tinker_adapter(folder, tiny_llama, seed=71, lora_alpha=alpha)
        job = import_adapter(stack, str(folder), base["id"])
        assert job["status"] == "succeeded" and job["result"]["created"], job
        request = {"model": base["id"], "adapter": job["result"]["adapter_id"], "layers": [1], "texts": TEXTS}
        seen[alpha] = download(
            stack.client,
            finished(stack.client, stack.client.post("/v1/extractions", json=request))["result"]["extraction_id"],
        )[:, 0]
        expected = hidden_layer_one(tiny_models.merge_by_hand(tiny_llama, tensors, lora_alpha=alpha), TEXTS, tokenizer)
        np.testing.assert_allclose(seen[alpha], expected, rtol=1e-4, atol=1e-4, err_msg=f"lora_alpha={alpha}")
    assert not np.allclose(seen[8], seen[32], atol=1e-3)


def test_a_local_archive_under_the_allowed_roots_imports(
    stack: Stack, base: dict[str, Any], tiny_llama: Path, tmp_path: Path
) -> None:
    tiny_models.save_tinker_adapter(tmp_path / "export", tiny_llama, seed=3)
    archive = _archive(tmp_path / "export", sources_root(stack) / f"{tmp_path.name}.tar.gz", "tar.gz")
    job = import_adapter(stack, str(archive), base["id"])
    assert job["status"] == "succeeded", job["error"]
    assert stack.client.get(f"/v1/adapters/{job['result']['adapter_id']}").json()["source_kind"] == "local_archive"


def _archive(folder: Path, target: Path, kind: str) -> Path:
    if kind == "zip":
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
            for file in folder.iterdir():
                archive.write(file, f"checkpoint/{file.name}")
    else:
        with tarfile.open(target, "w:gz" if kind == "tar.gz" else "w") as archive:
            for file in folder.iterdir():
                archive.add(file, f"checkpoint/{file.name}")
    return target


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "zip"])
def test_an_uploaded_archive_imports(
    stack: Stack, base: dict[str, Any], tiny_llama: Path, tmp_path: Path, kind: str
) -> None:
    tiny_models.save_tinker_adapter(tmp_path / "legacy", tiny_llama)
    archive = _archive(tmp_path / "legacy", tmp_path / f"adapter.{kind}", kind)
    with archive.open("rb") as handle:
        response = stack.client.post(
            "/v1/adapters/upload",
            data={"base_model": base["id"], "name": "legacy"},
            files={"file": (archive.name, handle)},
        )
    assert response.status_code == 202, response.json()
    job = wait_for_job(stack.client, response.json()["job"]["id"])
    assert job["status"] == "succeeded", job["error"]
    assert stack.client.get(f"/v1/adapters/{job['result']['adapter_id']}").json()["source_kind"] == "upload"
    assert not any((stack.settings.resolved_artifact_dir / "staging" / "uploads").iterdir())


def test_a_hostile_upload_fails_and_leaves_nothing_behind(stack: Stack, base: dict[str, Any], tmp_path: Path) -> None:
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w") as archive:
        member = tarfile.TarInfo("../../escaped.json")
        member.size = 2
        archive.addfile(member, io.BytesIO(b"{}"))
    response = stack.client.post(
        "/v1/adapters/upload",
        data={"base_model": base["id"], "name": "evil"},
        files={"file": ("evil.tar", payload.getvalue())},
    )
    job = wait_for_job(stack.client, response.json()["job"]["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "path_traversal"
    artifacts = stack.settings.resolved_artifact_dir
    assert not (artifacts.parent / "escaped.json").exists() and not (artifacts / "escaped.json").exists()
    assert not (artifacts / "staging" / job["id"]).exists()
    assert not any((artifacts / "staging" / "uploads").iterdir())


def test_deleting_an_adapter_removes_its_row_and_files(
    stack: Stack, base: dict[str, Any], tiny_llama: Path, tmp_path: Path
) -> None:
    folder = sources_root(stack) / f"{tmp_path.name}-delete"
    tiny_models.save_tinker_adapter(folder, tiny_llama, seed=7)
    adapter_id = import_adapter(stack, str(folder), base["id"])["result"]["adapter_id"]
    identity = stack.client.get(f"/v1/adapters/{adapter_id}").json()["identity"]
    assert stack.client.delete(f"/v1/adapters/{adapter_id}").status_code == 204
    assert stack.client.get(f"/v1/adapters/{adapter_id}").status_code == 404
    assert not (stack.settings.resolved_artifact_dir / "adapters" / identity).exists()


# --- refused by the gateway at once -----------------------------------------------------------


def test_tinker_sampler_checkpoints_that_cannot_be_downloaded_are_422s_saying_what_to_do(
    api: Any, tiny_llama: Path
) -> None:
    model = register(api, tiny_llama).json()
    response = api.post(
        "/v1/adapters/import",
        json={"source": "tinker://run-1:train:0/sampler_weights/final", "base_model": model["id"], "name": "x"},
    )
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "external_weights" in message
    assert api.get("/v1/jobs", params={"kind": "adapter_import"}).json()["items"] == []


def training_state(tinker_standin: Any, base_folder: Path, steps: int = 2) -> str:
    """A `weights` checkpoint made on the stand-in through the SDK, as a user's training run
    makes one with `save_state`."""
    import tinker

    from workers.adapters.tinker_training import datum
    from workers.finetuning import Example

    tinker_standin.add_base_model(BASE_NAME, base_folder)
    service = tinker.ServiceClient(base_url=tinker_standin.base_url, api_key=tinker_standin.api_key)
    training = service.create_lora_training_client(base_model=BASE_NAME, rank=4, seed=0).result(timeout=60)
    example = datum(Example(token_ids=(1, 17, 5, 42, 9, 2), targets=(3, 4, 5)))
    for _ in range(steps):
        training.forward_backward([example], "cross_entropy").result(timeout=60)
        training.optim_step(tinker.AdamParams(learning_rate=0.05)).result(timeout=60)
    path = training.save_state("trained").result(timeout=60).path
    service.close("success").result(timeout=60)
    return str(path)


def test_a_tinker_training_state_imports_through_a_temporary_export_that_is_then_deleted(
    stack: Stack, base: dict[str, Any], tiny_llama: Path, tinker_standin: Any
) -> None:
    path = training_state(tinker_standin, tiny_llama)
    sessions_before = set(tinker_standin.finished)
    job = import_adapter(stack, path, base["id"])
    assert job["status"] == "succeeded", job["error"]
    adapter = stack.client.get(f"/v1/adapters/{job['result']['adapter_id']}").json()
    assert adapter["tinker_path"] == path and adapter["training"]["tinker"]["base_model"] == BASE_NAME
    assert adapter["r"] == 4 and {"q_proj", "down_proj", "lm_head"} <= set(adapter["target_modules"])
    deleted = [p for p in tinker_standin.deleted if "/external_weights/confprobe-" in p]
    assert deleted and not [p for p in deleted if p in tinker_standin.checkpoints]
    assert [status for session, status in tinker_standin.finished.items() if session not in sessions_before] == [
        "success"
    ]

    # the imported adapter computes what the state the stand-in saved computes
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    exported_run = tinker_standin.runs[deleted[-1].removeprefix("tinker://").split("/")[0]]
    stored = stack.settings.resolved_artifact_dir / "adapters" / adapter["identity"]
    imported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), stored).eval()
    ids = torch.tensor([[1, 17, 5, 42, 9]])
    with torch.inference_mode():
        torch.testing.assert_close(imported(ids).logits, exported_run.model.eval()(ids).logits, atol=1e-5, rtol=1e-5)


def test_a_training_state_whose_download_fails_fails_the_import_and_still_deletes_the_export(
    stack: Stack, base: dict[str, Any], tiny_llama: Path, tinker_standin: Any
) -> None:
    path = training_state(tinker_standin, tiny_llama, steps=1)
    deleted_before = len(tinker_standin.deleted)
    tinker_standin.failing_files = True
    try:
        job = import_adapter(stack, path, base["id"])
    finally:
        tinker_standin.failing_files = False
    assert job["status"] == "failed" and job["error"]["code"] == "tinker_download_failed", job["error"]
    deleted = tinker_standin.deleted[deleted_before:]
    assert len(deleted) == 1 and "/external_weights/confprobe-" in deleted[0]
    assert deleted[0] not in tinker_standin.checkpoints


def test_a_tinker_import_without_a_key_is_a_503_naming_the_setting(
    database_url: str, redis_server: Any, tmp_path: Path, tiny_llama: Path
) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.conftest import make_settings

    settings = make_settings(database_url, redis_server.url, tmp_path / "var", tinker_api_key=None)
    with TestClient(create_app(settings)) as client:
        model = register(client, tiny_llama).json()
        response = client.post(
            "/v1/adapters/import",
            json={"source": "tinker://run/external_weights/final", "base_model": model["id"], "name": "x"},
        )
    assert response.status_code == 503
    assert "TINKER_API_KEY" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("source", "status"),
    [
        ("https://evil.example.com/adapter.tar", 403),
        ("http://models.example.com/adapter.tar", 422),
        ("/etc", 403),
        ("tinker://only/two", 422),
    ],
)
def test_sources_outside_what_is_allowed_are_refused(api: Any, tiny_llama: Path, source: str, status: int) -> None:
    model = register(api, tiny_llama).json()
    response = api.post("/v1/adapters/import", json={"source": source, "base_model": model["id"], "name": "x"})
    assert response.status_code == status
    assert response.json()["error"]["details"]["field"] == "source"


@pytest.mark.parametrize("special", ["archive", "weights", "config", "device_link"])
def test_a_fifo_or_device_as_the_source_or_in_its_folder_is_a_422_naming_the_source(
    api: Any, settings: Any, tiny_llama: Path, tmp_path: Path, special: str
) -> None:
    root = settings.adapter_roots[0]
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"{tmp_path.name}-{special}"
    tiny_models.save_tinker_adapter(folder, tiny_llama)
    fifo = {
        "archive": root / f"{tmp_path.name}.zip",
        "weights": folder / "adapter_model.safetensors",
        "config": folder / "adapter_config.json",
    }.get(special)
    if fifo is None:
        (folder / "adapter_model.safetensors").unlink()
        (folder / "adapter_model.safetensors").symlink_to("/dev/zero")
    else:
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo)
    source = root / f"{tmp_path.name}.zip" if special == "archive" else folder
    model = register(api, tiny_llama).json()
    response = call_without_blocking(
        lambda: api.post("/v1/adapters/import", json={"source": str(source), "base_model": model["id"], "name": "x"}),
        [fifo] if fifo else [],
    )
    assert response.status_code == 422, response.json()
    error = response.json()["error"]
    assert error["details"]["field"] == "source" and (
        "FIFO" in error["message"] or "character device" in error["message"]
    )
    assert api.get("/v1/jobs", params={"kind": "adapter_import"}).json()["items"] == []


def test_a_folder_of_more_files_than_an_archive_may_hold_is_a_413(
    api: Any, settings: Any, tiny_llama: Path, tmp_path: Path
) -> None:
    folder = settings.adapter_roots[0] / f"{tmp_path.name}-crowded"
    tiny_models.save_tinker_adapter(folder, tiny_llama)
    for index in range(settings.max_archive_files):
        (folder / f"note-{index}.txt").write_text("x")
    model = register(api, tiny_llama).json()
    response = api.post("/v1/adapters/import", json={"source": str(folder), "base_model": model["id"], "name": "x"})
    assert (response.status_code, response.json()["error"]["code"]) == (413, "too_many_files")


def test_a_missing_file_under_the_roots_is_a_404(api: Any, settings: Any, tiny_llama: Path) -> None:
    model = register(api, tiny_llama).json()
    response = api.post(
        "/v1/adapters/import",
        json={"source": str(settings.adapter_roots[0] / "nope"), "base_model": model["id"], "name": "x"},
    )
    assert response.status_code == 404


def test_a_symlink_out_of_the_roots_is_refused(api: Any, settings: Any, tiny_llama: Path) -> None:
    root = settings.adapter_roots[0]
    root.mkdir(parents=True, exist_ok=True)
    (root / "sneaky").symlink_to("/etc")
    model = register(api, tiny_llama).json()
    response = api.post(
        "/v1/adapters/import", json={"source": str(root / "sneaky"), "base_model": model["id"], "name": "x"}
    )
    assert response.status_code == 403


def test_an_upload_that_is_no_archive_is_a_422_and_nothing_stays(api: Any, settings: Any, tiny_llama: Path) -> None:
    model = register(api, tiny_llama).json()
    response = api.post(
        "/v1/adapters/upload",
        data={"base_model": model["id"], "name": "x"},
        files={"file": ("adapter.tar", b"not an archive at all")},
    )
    assert response.status_code == 422
    assert response.json()["error"]["details"]["field"] == "file"
    uploads = settings.resolved_artifact_dir / "staging" / "uploads"
    assert not uploads.exists() or not any(uploads.iterdir())


def test_an_unknown_adapter_is_a_404(api: Any) -> None:
    assert api.get("/v1/adapters/adp_nope").status_code == 404
    assert api.delete("/v1/adapters/adp_nope").status_code == 404


def test_an_upload_for_an_unknown_model_is_a_404(api: Any) -> None:
    response = api.post(
        "/v1/adapters/upload", data={"base_model": "mdl_nope", "name": "x"}, files={"file": ("a.tar", b"x")}
    )
    assert response.status_code == 404


def test_tinker_models_come_from_the_service_through_a_worker_and_are_cached(stack: Stack, tinker_standin: Any) -> None:
    import redis

    redis.Redis.from_url(stack.settings.resolved_redis_url).delete(f"{stack.settings.queue_prefix}:tinker-models")
    asked_before = tinker_standin.requests.count("GET /api/v1/get_server_capabilities")
    response = stack.client.get("/v1/tinker/models")
    assert response.status_code == 200, response.json()
    assert [m["model_name"] for m in response.json()["models"]] == [
        m["model_name"] for m in tinker_standin.supported_models
    ]
    assert stack.client.get("/v1/tinker/models").json() == response.json()
    assert tinker_standin.requests.count("GET /api/v1/get_server_capabilities") == asked_before + 1


def test_tinker_models_without_a_worker_in_time_answer_202_with_the_job(api: Any) -> None:
    response = api.get("/v1/tinker/models", params={"timeout_s": 0.3})
    assert response.status_code == 202
    assert response.json()["job"]["kind"] == "tinker_models"
    assert response.headers["location"] == f"/v1/jobs/{response.json()['job']['id']}"


def test_tinker_models_without_a_key_is_a_503_naming_the_setting(
    database_url: str, redis_server: Any, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.conftest import make_settings

    with TestClient(
        create_app(make_settings(database_url, redis_server.url, tmp_path / "var", tinker_api_key=None))
    ) as client:
        response = client.get("/v1/tinker/models")
    assert response.status_code == 503 and "TINKER_API_KEY" in response.json()["error"]["message"]


def test_deleting_an_adapter_an_unfinished_job_uses_is_a_409_unless_forced(
    api: Any, settings: Any, tiny_llama: Path
) -> None:
    from tests.api.test_jobs import run_queued_jobs
    from tests.api.test_probes import upload_rows

    model = register(api, tiny_llama).json()
    folder = settings.adapter_roots[0] / "in-use"
    tiny_models.save_tinker_adapter(folder, tiny_llama)
    job_id = api.post(
        "/v1/adapters/import", json={"source": str(folder), "base_model": model["id"], "name": "x"}
    ).json()["job"]["id"]
    run_queued_jobs(settings)
    adapter = api.get(f"/v1/adapters/{api.get(f'/v1/jobs/{job_id}').json()['result']['adapter_id']}").json()
    extraction = api.post(
        "/v1/extractions", json={"model": model["id"], "adapter": adapter["id"], "layers": [1], "texts": ["x"]}
    ).json()
    rows = [{"text": f"Statement {i}.", "label": i % 2} for i in range(40)]
    dataset = upload_rows(api, rows, "adapter-probe")
    body = {"model": model["id"], "adapter": adapter["id"], "dataset": dataset["id"], "layers": [1]}
    probe_run = api.post("/v1/probes", json=body).json()
    refused = api.delete(f"/v1/adapters/{adapter['id']}")
    assert refused.status_code == 409
    assert sorted(refused.json()["error"]["details"]["used_by"]) == sorted(
        [extraction["job"]["id"], probe_run["job"]["id"]]
    )
    assert api.get(f"/v1/adapters/{adapter['id']}").status_code == 200
    assert api.delete(f"/v1/adapters/{adapter['id']}", params={"force": True}).status_code == 204
    assert not (settings.resolved_artifact_dir / "adapters" / adapter["identity"]).exists()


def test_an_adapter_of_another_model_is_refused_for_extraction(api: Any, settings: Any, tiny_llama: Path) -> None:
    from tests.api.test_jobs import run_queued_jobs

    model = register(api, tiny_llama).json()
    other = register(api, tiny_llama, dtype="bfloat16").json()
    folder = settings.adapter_roots[0] / "mine"
    tiny_models.save_tinker_adapter(folder, tiny_llama)
    job_id = api.post(
        "/v1/adapters/import", json={"source": str(folder), "base_model": model["id"], "name": "x"}
    ).json()["job"]["id"]
    run_queued_jobs(settings)
    adapter_id = api.get(f"/v1/jobs/{job_id}").json()["result"]["adapter_id"]
    response = api.post(
        "/v1/extractions", json={"model": other["id"], "adapter": adapter_id, "layers": [1], "texts": ["x"]}
    )
    assert response.status_code == 422 and response.json()["error"]["details"]["field"] == "adapter"


def test_an_adapter_path_too_long_for_the_filesystem_is_a_422(api: Any, tiny_llama: Path) -> None:
    model = register(api, tiny_llama).json()
    response = api.post("/v1/adapters/import", json={"source": "/" + "a" * 900, "base_model": model["id"], "name": "x"})
    assert response.status_code == 422 and response.json()["error"]["details"]["field"] == "source"


def test_refusals_of_a_local_source_quote_it_as_given_never_where_links_lead_or_the_working_directory(
    api: Any, settings: Any, tmp_path: Path
) -> None:
    outside = tmp_path / "private-target-folder"
    outside.mkdir()
    root = settings.adapter_roots[0]
    root.mkdir(parents=True, exist_ok=True)
    link = root / f"{tmp_path.name}-link"
    link.symlink_to(outside)
    for source in (str(link), "relative/adapter", f"{root}/{tmp_path.name}-missing", str(root / ("x" * 300))):
        error = api.post("/v1/adapters/import", json={"source": source, "base_model": "mdl_x", "name": "a"}).json()[
            "error"
        ]
        assert source in error["message"] or error["message"] == "source: not a usable path: File name too long", error
        assert "private-target-folder" not in error["message"] and os.getcwd() not in error["message"].replace(
            source, ""
        )
