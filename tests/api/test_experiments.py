"""Experiment configs (docs/concepts.md#experiment-configs) run as one job, resumed from the registry and the cache."""

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import tiny_models
from tests.api.test_adapters import adapter_files, sources_root
from tests.api.test_datasets import CONVERSATION
from tests.api.test_models import _put_in_hf_cache
from tests.api.test_probes import shared_rows, upload_rows
from tests.conftest import Stack, wait_for_job
from tests.tinker_standin import StandinCheckpoint

HF_ID = "tiny-org/experiment-llama"


def submit(client: Any, config: dict[str, Any], as_yaml: bool = True) -> Any:
    if as_yaml:
        return client.post(
            "/v1/experiments", content=yaml.safe_dump(config).encode(), headers={"content-type": "application/yaml"}
        )
    return client.post("/v1/experiments", json=config)


def finished(stack: Stack, config: dict[str, Any], as_yaml: bool = True) -> dict[str, Any]:
    response = submit(stack.client, config, as_yaml)
    assert response.status_code == 202, response.json()
    job = wait_for_job(stack.client, response.json()["job"]["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    return job


@pytest.fixture
def cached_model(stack: Stack, tiny_llama: Path) -> str:
    """The tiny model in the stack's Hugging Face cache, under an id, as a real one would be."""
    cache = stack.settings.hf_cache_dir
    assert cache is not None
    if not (cache / f"models--{HF_ID.replace('/', '--')}").exists():
        _put_in_hf_cache(cache, HF_ID, tiny_llama)
    return HF_ID


def cities_file(stack: Stack, name: str) -> Path:
    path = sources_root(stack) / name
    path.write_text("\n".join(json.dumps(row) for row in shared_rows("geometry_of_truth/cities.jsonl", 90)))
    return path


def test_the_seed_config_with_a_tinker_checkpoint_runs_end_to_end_and_resumes(
    stack: Stack, cached_model: str, tinker_standin: Any, tmp_path: Path
) -> None:
    snapshot = next((stack.settings.hf_cache_dir / f"models--{HF_ID.replace('/', '--')}" / "snapshots").iterdir())  # type: ignore[operator]
    tiny_models.save_tinker_adapter(tmp_path / "export", snapshot, seed=31)
    checkpoint = tinker_standin.add_checkpoint(
        StandinCheckpoint(
            run_id=f"{tmp_path.name}:train:0", name="final", base_model=HF_ID, files=adapter_files(tmp_path / "export")
        )
    )
    config = {
        "experiment": {"name": "tinker-finetuned-probe", "seed": 42},
        "model": {"name": cached_model, "tinker_lora_path": "weights/x/peft_adapter"},
        "tinker": {
            "enabled": True,
            "checkpoint_path": checkpoint.tinker_path,
            "download_weights": True,
            "output_dir": "weights/x",
        },
        "extraction": {"layers": [1, 2], "cache_dir": "cache/x"},
        "probe": {"method": "logistic", "dataset": str(cities_file(stack, f"{tmp_path.name}.jsonl"))},
    }
    first = finished(stack, config)
    experiment = stack.client.get(f"/v1/experiments/{first['result']['experiment_id']}").json()
    assert experiment["status"] == "succeeded"
    for name in ("model", "adapter", "dataset", "extraction", "probe_run", "best_probe", "report"):
        assert experiment["links"][name], name
        assert stack.client.get(experiment["links"][name]).status_code == 200, name
    assert stack.client.get(experiment["links"]["adapter"]).json()["tinker_path"] == checkpoint.tinker_path

    again = finished(stack, config)
    assert again["result"]["adapter_id"] == first["result"]["adapter_id"]
    assert again["result"]["dataset_id"] == first["result"]["dataset_id"]
    assert again["result"]["extraction_cache_hits"] == 90
    assert again["result"]["probe_run_id"] == first["result"]["probe_run_id"]


def test_a_json_config_with_a_peft_folder_runs(
    stack: Stack, cached_model: str, tiny_llama: Path, tmp_path: Path
) -> None:
    folder = sources_root(stack) / f"{tmp_path.name}-peft"
    tiny_models.save_tinker_adapter(folder, tiny_llama, seed=32)
    config = {
        "experiment": {"name": "peft-probe"},
        "model": {"name": cached_model, "tinker_lora_path": str(folder)},
        "extraction": {"layers": [-1], "prompt_format": "Claim: {text}"},
        "probe": {"method": ["logistic", "mass_mean"], "dataset": str(cities_file(stack, f"{tmp_path.name}.jsonl"))},
    }
    job = finished(stack, config, as_yaml=False)
    run = stack.client.get(f"/v1/probe-runs/{job['result']['probe_run_id']}").json()
    assert {probe["method"] for probe in run["probes"]} == {"logistic", "mass_mean"} and run["adapter_id"] == job[
        "result"
    ]["adapter_id"]
    extraction = stack.client.get(f"/v1/extractions/{job['result']['extraction_id']}").json()
    assert run["prompt_format"] == extraction["prompt_format"] == "Claim: {text}"


def test_a_template_for_questions_on_a_statements_file_fails_the_job_naming_the_key(
    stack: Stack, cached_model: str, tmp_path: Path
) -> None:
    config = {
        "experiment": {"name": "wrong-template"},
        "model": {"name": cached_model},
        "extraction": {"layers": [1], "prompt_format": "{question}\n{choices}\nAnswer:"},
        "probe": {"dataset": str(cities_file(stack, f"{tmp_path.name}.jsonl"))},
    }
    response = submit(stack.client, config)
    assert response.status_code == 202, response.json()  # the file's kind is known once a worker reads it
    job = wait_for_job(stack.client, response.json()["job"]["id"], timeout=300)
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_parameters"
    assert (
        job["error"]["message"].startswith("extraction.prompt_format:") and "unknown field" in job["error"]["message"]
    )


def test_a_prompt_format_that_fits_no_data_is_a_422_naming_its_key(api: Any, tiny_llama: Path) -> None:
    config = {
        "experiment": {"name": "x"},
        "model": {"name": str(tiny_llama)},
        "extraction": {"layers": [1], "prompt_format": "{text} {choices}"},
        "probe": {"dataset": "dst_x"},
    }
    response = submit(api, config)
    assert response.status_code == 422 and response.json()["error"]["details"]["field"] == "extraction.prompt_format"


def test_a_chat_dataset_is_a_422_naming_the_probe_dataset(api: Any, tiny_llama: Path) -> None:
    dataset = upload_rows(api, [CONVERSATION], "chat")
    config = {
        "experiment": {"name": "x"},
        "model": {"name": str(tiny_llama)},
        "extraction": {"layers": [1]},
        "probe": {"dataset": dataset["id"]},
    }
    response = submit(api, config)
    assert response.status_code == 422, response.json()
    error = response.json()["error"]
    assert (error["details"]["field"], error["details"]["dataset"]) == ("probe.dataset", dataset["id"])
    assert error["message"] == (
        f"probe.dataset: dataset {dataset['id']} holds chat conversations, which have no labels to probe; "
        "chat datasets are for fine-tuning"
    )
    assert api.get("/v1/jobs", params={"kind": "experiment"}).json()["items"] == []


def test_unknown_keys_are_a_422_naming_each(api: Any) -> None:
    config = {
        "experiment": {"name": "x", "colour": "red"},
        "model": {"name": "org/model", "quantisation": "8bit"},
        "extraction": {"layers": [1]},
        "probe": {"dataset": "dst_x"},
        "extras": {},
    }
    response = submit(api, config)
    assert response.status_code == 422
    fields = {item["field"] for item in response.json()["error"]["details"]["fields"]}
    assert fields == {"experiment.colour", "model.quantisation", "extras"}


def test_a_missing_required_key_is_a_422_naming_it(api: Any) -> None:
    response = submit(api, {"experiment": {"name": "x"}, "model": {"name": "org/model"}, "probe": {"dataset": "dst_x"}})
    assert response.status_code == 422
    assert [item["field"] for item in response.json()["error"]["details"]["fields"]] == ["extraction"]


def test_malformed_yaml_is_a_422(api: Any) -> None:
    response = api.post(
        "/v1/experiments", content=b"experiment: [unclosed", headers={"content-type": "application/yaml"}
    )
    assert response.status_code == 422 and "YAML" in response.json()["error"]["message"]


def test_tinker_enabled_without_a_checkpoint_is_a_422(api: Any, tiny_llama: Path) -> None:
    config = {
        "experiment": {"name": "x"},
        "model": {"name": str(tiny_llama)},
        "tinker": {"enabled": True},
        "extraction": {"layers": [1]},
        "probe": {"dataset": "dst_x"},
    }
    response = submit(api, config)
    assert response.status_code == 422 and response.json()["error"]["details"]["field"] == "tinker.checkpoint_path"


def test_an_unknown_experiment_is_a_404(api: Any) -> None:
    assert api.get("/v1/experiments/exp_nope").status_code == 404


def _number_questions(stack_or_api: Any) -> dict[str, Any]:
    rows = [
        {"question": f"Which number is {n}?", "choices": [str(n), str(n + 1), str(n + 2)], "answer": n % 3}
        for n in range(30)
    ]
    return upload_rows(stack_or_api, rows, "numbers-30")


def test_a_config_with_a_finetune_section_probes_the_adapter_it_trained_and_reuses_it_on_a_rerun(
    stack: Stack, cached_model: str, tmp_path: Path
) -> None:
    questions = _number_questions(stack.client)
    config = {
        "experiment": {"name": "finetune-then-probe", "seed": 3},
        "model": {"name": cached_model},
        "finetune": {
            "dataset": questions["id"],
            "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "training": {"steps": 3, "batch_size": 4},
        },
        "extraction": {"layers": [1, 2]},
        "probe": {"dataset": str(cities_file(stack, f"{tmp_path.name}.jsonl"))},
    }
    first = finished(stack, config)
    finetune = stack.client.get(f"/v1/finetunes/{first['result']['finetune_id']}").json()
    assert finetune["status"] == "succeeded" and finetune["adapter_id"] == first["result"]["adapter_id"]
    assert finetune["name"] == "finetune-then-probe fine-tune" and finetune["dataset_id"] == questions["id"]
    run = stack.client.get(f"/v1/probe-runs/{first['result']['probe_run_id']}").json()
    assert run["adapter_id"] == finetune["adapter_id"]

    again = finished(stack, config)
    assert again["result"]["finetune_id"] == finetune["id"]  # the finished fine-tune, not a second one
    assert again["result"]["probe_run_id"] == first["result"]["probe_run_id"]


@pytest.mark.parametrize(
    ("finetune", "extra", "field"),
    [
        ({"lora": {"r": 0}}, {}, "finetune.lora.r"),
        ({"training": {"colour": 1}}, {}, "finetune.training.colour"),
        ({"dataset": "dst_nope"}, {}, "finetune.dataset"),
        ({"prompt_format": "{text}"}, {}, "finetune.prompt_format"),
        ({}, {"tinker_lora_path": "somewhere"}, "finetune"),
    ],
)
def test_a_bad_finetune_section_is_a_422_naming_its_key(
    api: Any, tiny_llama: Path, finetune: dict[str, Any], extra: dict[str, Any], field: str
) -> None:
    questions = _number_questions(api)
    config = {
        "experiment": {"name": "bad"},
        "model": {"name": str(tiny_llama), **extra},
        "finetune": {"dataset": questions["id"], **finetune},
        "extraction": {"layers": [1]},
        "probe": {"dataset": questions["id"]},
    }
    response = submit(api, config)
    assert response.status_code == 422, response.json()
    error = response.json()["error"]
    assert (error["details"].get("field") or error["details"]["fields"][0]["field"]) == field, error
    assert api.get("/v1/finetunes").json()["items"] == []
