"""`DELETE` of models, datasets, extractions, probes, comparisons and transfers: the row and
its files go, with what was computed from it; a queued job that uses it, or (for a model or a
dataset) a result made from it, is a 409 naming them unless `force=true`; a deleted model's
cache entries and shards go, another model's stay."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.registry.database import create_registry_engine, session_factory, transaction
from app.registry.tables import (
    Adapter,
    CachedText,
    CacheShard,
    CacheSpace,
    Comparison,
    Extraction,
    Job,
    Model,
    Probe,
    ProbeEvaluation,
    ProbeRun,
    Transfer,
    new_id,
)
from app.settings import Settings
from app.storage import open_store
from tests.api.test_jobs import run_queued_jobs
from tests.api.test_models import register

only_sqlite = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

STATEMENTS = [{"text": f"{i} plus {i} is {2 * i + i % 2}.", "label": 1 - i % 2} for i in range(12)]
OTHER_STATEMENTS = [{"text": f"{i} times two is {2 * i + i % 2}.", "label": 1 - i % 2} for i in range(12)]
SPLIT = {"train": 0.5, "validation": 0.25, "test": 0.25, "seed": 0}


def registry(settings: Settings) -> sessionmaker[Session]:
    return session_factory(create_registry_engine(settings.resolved_database_url))


def stored(settings: Settings, key: str) -> bool:
    """Whether the store holds `key`, or anything under it for a folder."""
    path = settings.resolved_artifact_dir / key
    return path.is_file() or (path.is_dir() and any(item.is_file() for item in path.rglob("*")))


def upload(api: Any, rows: list[dict[str, Any]], name: str = "statements") -> dict[str, Any]:
    content = "".join(json.dumps(row) + "\n" for row in rows).encode()
    response = api.post("/v1/datasets", files={"file": (f"{name}.jsonl", content)}, data={"name": name})
    assert response.status_code == 201, response.text
    return response.json()


def ready_model(api: Any, settings: Settings, source: Path, dtype: str = "float32") -> dict[str, Any]:
    """A registered model whose check is over (marked so: no worker runs here)."""
    model = register(api, source, dtype=dtype).json()
    with transaction(registry(settings)) as session:
        session.get_one(Job, model["check_job_id"]).status = "succeeded"
        session.get_one(Model, model["id"]).status = "ready"
    return model


@dataclass(frozen=True)
class Lab:
    """Finished results of one model on one dataset, with their files in the store."""

    model_id: str
    dataset_id: str
    adapter_id: str
    extraction_id: str
    run_id: str
    probe_ids: tuple[str, str]
    evaluation_id: str
    comparison_id: str
    transfer_id: str

    def folders(self) -> list[str]:
        """Every folder of the lab's results in the store."""
        return [
            f"extractions/{self.extraction_id}",
            f"probe_runs/{self.run_id}",
            *(f"probes/{probe_id}" for probe_id in self.probe_ids),
            f"evaluations/{self.evaluation_id}",
            f"comparisons/{self.comparison_id}",
            f"transfers/{self.transfer_id}",
        ]


def finished_job(session: Session, kind: str, model_id: str) -> str:
    job = Job(id=new_id("job"), kind=kind, params={}, queue="q", model_id=model_id, status="succeeded")
    session.add(job)
    session.flush()
    return job.id


def build_lab(settings: Settings, model_id: str, dataset_id: str, tag: str) -> Lab:
    """Rows as finished jobs leave them, and a file in each of their folders."""
    store = open_store(settings)
    common = {"model_id": model_id, "token_position": "last", "prompt_format": "raw", "max_length": None}
    with transaction(registry(settings)) as session:
        adapter = Adapter(
            id=new_id("adp"),
            name="a",
            base_model_id=model_id,
            source_kind="upload",
            source="x",
            r=4,
            lora_alpha=8.0,
            target_modules=["q_proj"],
            sha256=tag * 64,
            identity=tag * 64,
            size_bytes=1,
            artifact=f"adapters/{tag * 64}",
        )
        extraction = Extraction(
            id=new_id("ext"),
            job_id=finished_job(session, "extraction", model_id),
            dataset_id=dataset_id,
            text_count=12,
            layers=[1],
            artifact=None,
            model_fingerprint="f",
            **common,
        )
        run = ProbeRun(
            id=new_id("prr"),
            job_id=finished_job(session, "probe_training", model_id),
            dataset_id=dataset_id,
            layers=[1, 2],
            methods=["logistic"],
            split=SPLIT,
            **common,
        )
        probes = [
            Probe(
                id=new_id("prb"),
                run_id=run.id,
                dataset_id=dataset_id,
                layer=layer,
                method="logistic",
                is_best=layer == 1,
                artifact="",
                validation={},
                metrics={},
                **common,
            )
            for layer in (1, 2)
        ]
        for probe in probes:
            probe.artifact = f"probes/{probe.id}"
        run.best_probe_id = probes[0].id
        evaluation = ProbeEvaluation(
            id=new_id("evl"),
            job_id=finished_job(session, "probe_evaluation", model_id),
            probe_id=probes[0].id,
            model_id=model_id,
            dataset_id=dataset_id,
            prompt_format="raw",
            rows="all",
        )
        comparison = Comparison(
            id=new_id("cmp"),
            job_id=finished_job(session, "comparison", model_id),
            model_id=model_id,
            adapter_ids=[adapter.id],
            dataset_id=dataset_id,
            layers=[1],
            method="logistic",
            token_position="last",
        )
        transfer = Transfer(
            id=new_id("trf"),
            job_id=finished_job(session, "transfer", model_id),
            train_dataset_ids=[dataset_id],
            test_dataset_ids=[dataset_id],
            layers=[1],
            method="logistic",
            split=SPLIT,
            **common,
        )
        session.add_all([adapter, extraction, run])
        session.flush()
        session.add_all(probes)
        session.flush()
        session.add_all([evaluation, comparison, transfer])
        extraction.artifact = f"extractions/{extraction.id}/hidden_states.safetensors"
        run.artifact = f"probe_runs/{run.id}"
        evaluation.artifact = f"evaluations/{evaluation.id}"
        comparison.artifact = f"comparisons/{comparison.id}/report.json"
        transfer.artifact = f"transfers/{transfer.id}"
    lab = Lab(
        model_id=model_id,
        dataset_id=dataset_id,
        adapter_id=adapter.id,
        extraction_id=extraction.id,
        run_id=run.id,
        probe_ids=(probes[0].id, probes[1].id),
        evaluation_id=evaluation.id,
        comparison_id=comparison.id,
        transfer_id=transfer.id,
    )
    store.write_bytes(f"{adapter.artifact}/adapter_model.safetensors", b"weights")
    for folder in lab.folders():
        store.write_bytes(f"{folder}/report.json", b"{}")
    return lab


@pytest.fixture
def lab(api: Any, settings: Settings, tiny_llama: Path) -> Lab:
    model = ready_model(api, settings, tiny_llama)
    return build_lab(settings, model["id"], upload(api, STATEMENTS)["id"], "a")


def gone(api: Any, *paths: str) -> bool:
    return all(api.get(path).status_code == 404 for path in paths)


# --- each kind: its row and files go ------------------------------------------------------------


@only_sqlite
def test_deleting_an_extraction_removes_its_row_and_array(api: Any, settings: Settings, lab: Lab) -> None:
    assert stored(settings, f"extractions/{lab.extraction_id}")
    response = api.delete(f"/v1/extractions/{lab.extraction_id}")
    assert response.status_code == 204 and response.content == b"" and "location" not in response.headers
    assert gone(api, f"/v1/extractions/{lab.extraction_id}")
    assert not stored(settings, f"extractions/{lab.extraction_id}")
    assert api.get(f"/v1/datasets/{lab.dataset_id}").status_code == 200


@only_sqlite
def test_deleting_a_comparison_removes_its_row_and_folder(api: Any, settings: Settings, lab: Lab) -> None:
    assert api.delete(f"/v1/comparisons/{lab.comparison_id}").status_code == 204
    assert gone(api, f"/v1/comparisons/{lab.comparison_id}")
    assert not stored(settings, f"comparisons/{lab.comparison_id}")
    assert api.get(f"/v1/adapters/{lab.adapter_id}").status_code == 200


@only_sqlite
def test_deleting_a_transfer_removes_its_row_and_folder(api: Any, settings: Settings, lab: Lab) -> None:
    assert api.delete(f"/v1/transfers/{lab.transfer_id}").status_code == 204
    assert gone(api, f"/v1/transfers/{lab.transfer_id}")
    assert not stored(settings, f"transfers/{lab.transfer_id}")


@only_sqlite
def test_deleting_a_probe_removes_its_folder_and_evaluations_and_its_run_loses_its_best(
    api: Any, settings: Settings, lab: Lab
) -> None:
    best, other = lab.probe_ids
    assert api.delete(f"/v1/probes/{best}").status_code == 204
    assert gone(api, f"/v1/probes/{best}", f"/v1/evaluations/{lab.evaluation_id}")
    assert not stored(settings, f"probes/{best}") and not stored(settings, f"evaluations/{lab.evaluation_id}")
    run = api.get(f"/v1/probe-runs/{lab.run_id}").json()
    assert run["best_probe_id"] is None and [probe["id"] for probe in run["probes"]] == [other]
    assert stored(settings, f"probes/{other}") and stored(settings, f"probe_runs/{lab.run_id}")


@only_sqlite
def test_deleting_the_last_probe_of_a_run_deletes_the_run(api: Any, settings: Settings, lab: Lab) -> None:
    for probe_id in lab.probe_ids:
        assert api.delete(f"/v1/probes/{probe_id}").status_code == 204
    assert gone(api, f"/v1/probe-runs/{lab.run_id}")
    assert not stored(settings, f"probe_runs/{lab.run_id}")


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_a_dataset_results_were_made_from_is_a_409_naming_them_and_force_deletes_them_with_it(
    api: Any, settings: Settings, lab: Lab
) -> None:
    other = upload(api, OTHER_STATEMENTS, "other")
    kept = build_lab(settings, lab.model_id, other["id"], "b")
    refused = api.delete(f"/v1/datasets/{lab.dataset_id}")
    assert refused.status_code == 409
    details = refused.json()["error"]["details"]
    assert details["used_by"] == []
    assert details["referenced_by"] == {
        "extractions": [lab.extraction_id],
        "probe_runs": [lab.run_id],
        "probes": sorted(lab.probe_ids),
        "evaluations": [lab.evaluation_id],
        "comparisons": [lab.comparison_id],
        "transfers": [lab.transfer_id],
    }
    assert all(stored(settings, folder) for folder in lab.folders())

    artifact = api.get(f"/v1/datasets/{lab.dataset_id}").json()["sha256"]
    assert api.delete(f"/v1/datasets/{lab.dataset_id}", params={"force": True}).status_code == 204
    assert gone(api, f"/v1/datasets/{lab.dataset_id}", f"/v1/probes/{lab.probe_ids[0]}")
    assert not stored(settings, f"datasets/{artifact}.jsonl")
    assert not any(stored(settings, folder) for folder in lab.folders())
    assert all(stored(settings, folder) for folder in kept.folders())
    assert api.get(f"/v1/models/{lab.model_id}").status_code == 200
    assert api.get(f"/v1/adapters/{lab.adapter_id}").status_code == 200


@only_sqlite
def test_a_model_with_results_is_a_409_naming_them_and_force_deletes_everything_made_from_it(
    api: Any, settings: Settings, lab: Lab, tiny_llama: Path
) -> None:
    other_model = ready_model(api, settings, tiny_llama, dtype="bfloat16")
    kept = build_lab(settings, other_model["id"], lab.dataset_id, "b")
    refused = api.delete(f"/v1/models/{lab.model_id}")
    assert refused.status_code == 409
    details = refused.json()["error"]["details"]
    assert details["referenced_by"]["adapters"] == [lab.adapter_id]
    assert details["referenced_counts"] == {
        "adapters": 1,
        "extractions": 1,
        "probe_runs": 1,
        "probes": 2,
        "evaluations": 1,
        "comparisons": 1,
        "transfers": 1,
    }

    assert api.delete(f"/v1/models/{lab.model_id}", params={"force": True}).status_code == 204
    assert gone(api, f"/v1/models/{lab.model_id}", f"/v1/adapters/{lab.adapter_id}", f"/v1/transfers/{lab.transfer_id}")
    assert not any(stored(settings, folder) for folder in [*lab.folders(), "adapters/" + "a" * 64])
    assert all(stored(settings, folder) for folder in [*kept.folders(), "adapters/" + "b" * 64])
    assert api.get(f"/v1/datasets/{lab.dataset_id}").status_code == 200
    with registry(settings)() as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.model_id == lab.model_id)) == 0
        assert (session.scalar(select(func.count()).select_from(Job).where(Job.model_id.is_(None))) or 0) > 0


@only_sqlite
@pytest.mark.parametrize(
    "path", ["/v1/models", "/v1/datasets", "/v1/extractions", "/v1/probes", "/v1/comparisons", "/v1/transfers"]
)
def test_deleting_an_unknown_id_is_a_404(api: Any, path: str) -> None:
    response = api.delete(f"{path}/nope_123")
    assert response.status_code == 404 and response.json()["error"]["details"]["id"] == "nope_123"


# --- in use by a queued job ----------------------------------------------------------------------


def queue_user(api: Any, lab: Lab, kind: str) -> tuple[str, str]:
    """A job that uses a resource of `kind`, queued (no worker runs): the resource's path
    and the job's id."""
    if kind == "models":
        job = api.post(f"/v1/models/{lab.model_id}/check").json()["job"]
        return f"/v1/models/{lab.model_id}", job["id"]
    if kind == "datasets":
        body = {"model": lab.model_id, "dataset": lab.dataset_id, "layers": [1]}
        return f"/v1/datasets/{lab.dataset_id}", api.post("/v1/extractions", json=body).json()["job"]["id"]
    if kind == "extractions":
        answer = api.post("/v1/extractions", json={"model": lab.model_id, "texts": ["x"], "layers": [1]}).json()
        return f"/v1/extractions/{answer['extraction']['id']}", answer["job"]["id"]
    if kind == "probes":
        answer = api.post(f"/v1/probes/{lab.probe_ids[1]}/evaluations", json={"dataset": lab.dataset_id}).json()
        return f"/v1/probes/{lab.probe_ids[1]}", answer["job"]["id"]
    if kind == "comparisons":
        body = {"model": lab.model_id, "adapters": [lab.adapter_id], "dataset": lab.dataset_id, "layers": [1]}
        answer = api.post("/v1/comparisons", json=body).json()
        return f"/v1/comparisons/{answer['comparison']['id']}", answer["job"]["id"]
    body = {"model": lab.model_id, "train": [lab.dataset_id], "test": [lab.dataset_id], "layers": [1]}
    answer = api.post("/v1/transfers", json=body).json()
    return f"/v1/transfers/{answer['transfer']['id']}", answer["job"]["id"]


@only_sqlite
@pytest.mark.parametrize("kind", ["models", "datasets", "extractions", "probes", "comparisons", "transfers"])
def test_deleting_what_a_queued_job_uses_is_a_409_naming_the_job_and_force_deletes_and_cancels_it(
    api: Any, settings: Settings, lab: Lab, kind: str
) -> None:
    path, job_id = queue_user(api, lab, kind)
    refused = api.delete(path)
    assert refused.status_code == 409
    assert refused.json()["error"]["details"]["used_by"] == [job_id]
    assert api.get(path).status_code == 200

    assert api.delete(path, params={"force": True}).status_code == 204
    assert gone(api, path)
    assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


@only_sqlite
def test_a_job_queued_on_another_model_does_not_hold_up_a_deletion(
    api: Any, settings: Settings, lab: Lab, tiny_llama: Path
) -> None:
    other_model = ready_model(api, settings, tiny_llama, dtype="bfloat16")
    api.post("/v1/extractions", json={"model": other_model["id"], "texts": ["x"], "layers": [1]})
    assert api.delete(f"/v1/extractions/{lab.extraction_id}").status_code == 204


# --- the cache ------------------------------------------------------------------------------------


def cache_entries(settings: Settings, model_id: str) -> tuple[list[str], list[str]]:
    """The spaces the registry records for the model, and the shards their entries are in."""
    with registry(settings)() as session:
        spaces = list(session.scalars(select(CacheSpace.space).where(CacheSpace.model_id == model_id)))
        shards = list(session.scalars(select(CacheShard.path).where(CacheShard.space.in_(spaces))))
    return spaces, shards


@only_sqlite
def test_a_deleted_models_cache_entries_and_shards_go_and_another_models_stay(
    api: Any, settings: Settings, tiny_llama: Path
) -> None:
    from workers.state_cache import cache_space

    texts = ["Paris is in France.", "Rome is in Spain."]
    models = [register(api, tiny_llama, dtype=dtype).json() for dtype in ("float32", "bfloat16")]
    extractions = [
        api.post("/v1/extractions", json={"model": model["id"], "texts": texts, "layers": [1, 2]}).json()["extraction"]
        for model in models
    ]
    run_queued_jobs(settings)
    assert all(api.get(f"/v1/extractions/{e['id']}").json()["status"] == "succeeded" for e in extractions)
    (doomed_space,), doomed_shards = cache_entries(settings, models[0]["id"])
    (kept_space,), kept_shards = cache_entries(settings, models[1]["id"])
    with registry(settings)() as session:
        assert doomed_space == cache_space(session.get_one(Model, models[0]["id"]), None, "last", None)
    assert doomed_shards and kept_shards and all(stored(settings, shard) for shard in doomed_shards + kept_shards)

    assert api.delete(f"/v1/models/{models[0]['id']}", params={"force": True}).status_code == 204
    with registry(settings)() as session:
        counts = session.execute(select(CacheShard.space, func.count()).join(CachedText).group_by(CacheShard.space))
        remaining = {space: count for space, count in counts}
        assert list(session.scalars(select(CacheSpace.model_id))) == [models[1]["id"]]
    assert remaining == {kept_space: len(texts)}  # one row per text, whatever its layers
    assert not any(stored(settings, shard) for shard in doomed_shards)
    assert not stored(settings, doomed_shards[0].rsplit("/", 1)[0])
    assert all(stored(settings, shard) for shard in kept_shards)


@only_sqlite
def test_a_space_another_model_claims_too_stays_when_a_model_goes(
    api: Any, settings: Settings, tiny_llama: Path
) -> None:
    models = [ready_model(api, settings, tiny_llama, dtype=dtype)["id"] for dtype in ("float32", "bfloat16")]
    store = open_store(settings)
    shared, own = "cache/sh/shared/one.safetensors", "cache/ow/own/one.safetensors"
    for key in (shared, own):
        store.write_bytes(key, b"vectors")
    with transaction(registry(settings)) as session:
        session.add_all(
            [
                CacheSpace(space="space-own", model_id=models[0]),
                CacheSpace(space="space-shared", model_id=models[0]),
                CacheSpace(space="space-shared", model_id=models[1]),
            ]
        )
        shards = [
            CacheShard(space=space, path=path, layers=[1, 2], rows=1)
            for space, path in (("space-own", own), ("space-shared", shared))
        ]
        session.add_all(shards)
        session.flush()
        session.add_all(CachedText(text_sha256="t" * 64, shard_id=shard.id, row=0) for shard in shards)

    assert api.delete(f"/v1/models/{models[0]}").status_code == 204
    assert stored(settings, shared) and not stored(settings, own)
    with registry(settings)() as session:
        texts_left = session.execute(select(CacheShard.space, CacheShard.path).join(CachedText))
        assert [(space, path) for space, path in texts_left] == [("space-shared", shared)]
        assert list(session.scalars(select(CacheShard.path))) == [shared]
        claims = session.execute(select(CacheSpace.space, CacheSpace.model_id))
        assert [(space, model_id) for space, model_id in claims] == [("space-shared", models[1])]


@only_sqlite
def test_adapter_files_the_same_weights_on_another_model_share_stay_when_a_model_goes(
    api: Any, settings: Settings, lab: Lab, tiny_llama: Path
) -> None:
    other_model = ready_model(api, settings, tiny_llama, dtype="bfloat16")
    kept = build_lab(settings, other_model["id"], lab.dataset_id, "a")  # the same adapter identity, another base
    assert api.delete(f"/v1/models/{lab.model_id}", params={"force": True}).status_code == 204
    assert gone(api, f"/v1/adapters/{lab.adapter_id}")
    assert api.get(f"/v1/adapters/{kept.adapter_id}").status_code == 200
    assert stored(settings, "adapters/" + "a" * 64)
