"""Running the real `adapter_import` job function in the test process: a worker runtime on a
fresh SQLite registry, the real Redis and a local artifact store; a ready tiny base model;
a job row at a given attempt, as the runner would have started it."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app import broker
from app.inputs.adapter_sources import SourceKind
from app.inputs.model_sources import ModelShape, ResolvedSource
from app.job_kinds import AdapterImportParameters
from app.registry.models import new_model
from app.registry.tables import Job, new_id
from app.settings import Settings
from tests import tiny_models
from tests.conftest import Databases, RedisServer, make_settings
from workers import runtime
from workers.context import JobContext

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture
def settings(databases: Databases, redis_server: RedisServer, tmp_path: Path) -> Settings:
    return make_settings(databases.new("sqlite"), redis_server.url, tmp_path / "var")


@pytest.fixture
def worker(settings: Settings) -> Iterator[runtime.WorkerRuntime]:
    yield runtime.build_runtime(settings)


@pytest.fixture
def model_id(worker: runtime.WorkerRuntime, tiny_llama: Path) -> str:
    shape = ModelShape(architecture="LlamaForCausalLM", model_type="llama", num_layers=2, hidden_size=16)
    model = new_model(
        "tiny",
        ResolvedSource(kind="local", identity=str(tiny_llama), path=tiny_llama),
        None,
        "float32",
        None,
        shape,
        "f",
    )
    model.status = "ready"
    with worker.sessions() as session, session.begin():
        session.add(model)
    return model.id


def import_job(
    worker: runtime.WorkerRuntime, model_id: str, source_kind: SourceKind, source: Path, attempt: int = 1
) -> JobContext[AdapterImportParameters]:
    """A running `adapter_import` job of this worker, at `attempt`, and its context."""
    params = AdapterImportParameters(
        source_kind=source_kind, source=str(source), base_model_id=model_id, name="ft", metadata={}
    )
    job_id = new_id("job")
    with worker.sessions() as session, session.begin():
        session.add(
            Job(
                id=job_id,
                kind="adapter_import",
                params=params.model_dump(mode="json"),
                status="running",
                worker=worker.name,
                attempts=attempt,
                queue=broker.default_queue(worker.settings),
            )
        )
    return JobContext(job_id=job_id, params=params, runtime=worker, attempt=attempt)


def adapter_folder(folder: Path, base: Path, **config: Any) -> Path:
    tiny_models.save_tinker_adapter(folder, base)
    if config:
        (folder / CONFIG).write_text(json.dumps({"r": 4, "lora_alpha": 8} | config))
    return folder
