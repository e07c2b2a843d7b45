"""`/v1/experiments`: a whole experiment config (YAML or JSON, docs/concepts.md#experiment-configs) run as one job that
chains adapter import, extraction, probe training and the report."""

from pathlib import PurePath
from typing import Any

import redis
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from app import jobs
from app.api.deps import RedisDep, SessionDep, SessionsDep, SettingsDep
from app.api.models import register
from app.errors import ServiceError, invalid_field
from app.inputs.adapter_sources import classify_source
from app.inputs.documents import parse_document
from app.inputs.prompt_formats import InvalidPromptFormat, check_prompt_format, data_kind
from app.job_kinds import ExperimentParameters, ImportSource
from app.registry.datasets import checked_labelled
from app.registry.experiments import experiment_view, new_experiment, shown_experiment
from app.registry.finetunes import finetune_request, new_finetune
from app.registry.models import checked_prompt_format, resolve_layers
from app.registry.tables import Dataset, Experiment
from app.schemas.common import DISPLAY_NAME_MAX, ERROR_RESPONSES
from app.schemas.experiments import (
    ExperimentAccepted,
    ExperimentConfig,
    ExperimentModel,
    ExperimentOut,
)
from app.schemas.jobs import JobOut
from app.schemas.models import ModelCreate
from app.settings import Settings

router = APIRouter(prefix="/v1/experiments", tags=["experiments"], responses=ERROR_RESPONSES)

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


def _parse(raw: bytes, content_type: str) -> ExperimentConfig:
    document = parse_document(raw, "yaml" if content_type.startswith(YAML_TYPES) else "json", "body")
    try:
        return ExperimentConfig.model_validate(document)
    except ValidationError as exc:
        raise _body_errors(exc, ()) from exc


def _body_errors(exc: ValidationError, at: tuple[str, ...]) -> RequestValidationError:
    """As FastAPI reports body errors, so the envelope names each key (`model.colour`)."""
    return RequestValidationError([error | {"loc": ("body", *at, *error["loc"])} for error in exc.errors()])


def _model_registration(model: ExperimentModel) -> ModelCreate:
    """The config's model as a registration. Its `name` is the source (an id or a folder);
    the display name is that, or the folder's own name when the path is longer than a
    display name may be. Anything else the registration refuses is named under `model`."""
    display_name = model.name if len(model.name) <= DISPLAY_NAME_MAX else PurePath(model.name).name[-DISPLAY_NAME_MAX:]
    try:
        return ModelCreate(
            name=display_name or model.name[-DISPLAY_NAME_MAX:],
            source=model.name,
            revision=model.revision,
            dtype=model.dtype,
            quantization=model.quantization,
        )
    except ValidationError as exc:
        raise _body_errors(exc, ("model",)) from exc


# where each field of a model registration comes from in a config
REGISTRATION_FIELDS = {
    "name": "model.name",
    "source": "model.name",
    "revision": "model.revision",
    "dtype": "model.dtype",
    "quantization": "model.quantization",
}


def _named_in_config(exc: ServiceError) -> ServiceError:
    """A registration's error, naming the config's key (`model.name`) instead of the
    registration's field (`source`)."""
    field = exc.details.get("field")
    if field not in REGISTRATION_FIELDS:
        return exc
    key = REGISTRATION_FIELDS[field]
    message = f"{key}: {exc.message.removeprefix(f'{field}: ')}"
    return ServiceError(exc.status, exc.code, message, headers=exc.headers, **(exc.details | {"field": key}))


def _adapter_source(config: ExperimentConfig) -> str | None:
    if config.finetune is not None and (config.tinker.enabled or config.model.tinker_lora_path):
        raise invalid_field(
            "finetune",
            "an experiment fine-tunes its adapter or imports one (tinker, model.tinker_lora_path), not both",
        )
    if config.tinker.enabled:
        if not config.tinker.checkpoint_path:
            raise invalid_field("tinker.checkpoint_path", "is required when tinker.enabled is true")
        return config.tinker.checkpoint_path
    return config.model.tinker_lora_path


@router.post(
    "",
    status_code=202,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ExperimentConfig"}},
                "application/yaml": {"schema": {"$ref": "#/components/schemas/ExperimentConfig"}},
            },
        }
    },
)
async def run_experiment(
    request: Request, response: Response, settings: SettingsDep, sessions: SessionsDep, connection: RedisDep
) -> ExperimentAccepted:
    """Run an experiment config as one job: import the adapter (Tinker checkpoint or PEFT
    folder), extract hidden states, train probes, report. Steps already done — the same
    model, adapter weights, dataset, texts — come from the registry and the cache, so a
    re-run after a failure resumes where it stopped."""
    from fastapi.concurrency import run_in_threadpool

    config = _parse(await request.body(), request.headers.get("content-type", "application/json"))
    return await run_in_threadpool(_submit, config, response, settings, sessions, connection)


def _submit(
    config: ExperimentConfig,
    response: Response,
    settings: Settings,
    sessions: sessionmaker[Session],
    connection: redis.Redis,
) -> ExperimentAccepted:
    adapter = _adapter_source(config)
    adapter_source = classify_source(adapter, settings) if adapter else None
    try:  # before anything is registered: a template no data can fill
        check_prompt_format(config.extraction.prompt_format, None)
    except InvalidPromptFormat as exc:
        raise invalid_field("extraction.prompt_format", f"{config.extraction.prompt_format[:80]!r} {exc}") from None
    try:
        model, _ = register(_model_registration(config.model), settings, sessions, connection)
    except ServiceError as exc:
        raise _named_in_config(exc) from exc
    dataset_path = None
    with sessions() as session:
        dataset = session.get(Dataset, config.probe.dataset)
        if dataset is None:
            dataset_path = classify_source(config.probe.dataset, settings)
            if dataset_path.kind != "local_archive":
                raise invalid_field("probe.dataset", "neither a dataset id nor a dataset file")
        else:  # a dataset file's kind is known once the worker reads it, and checked there
            checked_labelled(dataset, "probe.dataset")
    layers = resolve_layers(config.extraction.layers, model.num_layers)
    try:  # a dataset file's kind is known once the worker reads it, and checked there
        checked_prompt_format(model, config.extraction.prompt_format, data_kind(dataset.kind) if dataset else None)
    except ServiceError as exc:
        raise invalid_field("extraction.prompt_format", exc.message.removeprefix("prompt_format: ")) from None

    def prepare(session: Session, job_id: str) -> jobs.Submission[Experiment]:
        if config.finetune is not None:  # checked as a fine-tune request; the worker makes the row
            _checked_finetune(session, config, model.id, job_id)
        experiment = new_experiment(config, job_id, model.id)
        params = ExperimentParameters(
            experiment_id=experiment.id,
            layers=layers,
            adapter=ImportSource(
                source_kind=adapter_source.kind,
                source=adapter_source.location,
                tinker_run_id=adapter_source.tinker_run_id,
            )
            if adapter_source
            else None,
            dataset=config.probe.dataset if dataset_path is None else None,
            dataset_path=dataset_path.location if dataset_path else None,
        )
        return jobs.Submission(params, model.id, experiment)

    job, experiment = jobs.submit(sessions, connection, settings, "experiment", prepare)
    response.headers["Location"] = f"/v1/experiments/{experiment.id}"
    return ExperimentAccepted(job=JobOut.of(job), experiment=experiment_view(experiment, job.status, None))


def _checked_finetune(session: Session, config: ExperimentConfig, model_id: str, job_id: str) -> None:
    """The config's fine-tune, checked as `POST /v1/finetunes` checks one, its errors named
    under `finetune`."""
    assert config.finetune is not None
    try:
        request = finetune_request(config.finetune.model_dump(), model_id, config.experiment.name)
    except ValidationError as exc:
        raise _body_errors(exc, ("finetune",)) from exc
    try:
        new_finetune(session, request, job_id)
    except ServiceError as exc:
        if exc.code == "not_found" and exc.details.get("resource") == "dataset":
            raise invalid_field("finetune.dataset", f"no dataset with id {request.dataset!r}") from exc
        field = exc.details.get("field")
        if field is None:
            raise
        key = "finetune.dataset" if field == "dataset" else f"finetune.{field}"
        message = f"{key}: {exc.message.removeprefix(f'{field}: ')}"
        raise ServiceError(
            exc.status, exc.code, message, headers=exc.headers, **(exc.details | {"field": key})
        ) from exc


@router.get("/{experiment_id}")
def show_experiment(experiment_id: str, session: SessionDep) -> ExperimentOut:
    return shown_experiment(session, experiment_id)


def add_config_schema(openapi: dict[str, Any]) -> None:
    """The config's schema in the OpenAPI components: the route reads its body itself (JSON
    or YAML), so FastAPI does not add it on its own."""
    schema = ExperimentConfig.model_json_schema(ref_template="#/components/schemas/{model}")
    components = openapi.setdefault("components", {}).setdefault("schemas", {})
    components.update(schema.pop("$defs", {}))
    components["ExperimentConfig"] = schema
