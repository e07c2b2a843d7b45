"""The `experiment` job: an experiment config (docs/concepts.md#experiment-configs) run end to end in one job — a fine-tune
or an adapter import, dataset, extraction, probes — each step through the same code as its own endpoint, so every step a
previous run already did comes back from the registry or the cache."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select, update

from app.errors import ServiceError
from app.inputs.datasets import InvalidDataset, UnlabelledDataset, default_name, parse_upload, require_labelled
from app.inputs.prompt_formats import RAW, InvalidPromptFormat, check_prompt_format, data_kind
from app.inputs.user_files import FileTooLarge, NotARegularFile, read_regular_file
from app.job_kinds import (
    AdapterImportParameters,
    ExperimentParameters,
    ExtractionParameters,
    FinetuneParameters,
    JobParameters,
    ProbeTrainingParameters,
)
from app.registry.datasets import RegistrationRace, register_dataset
from app.registry.finetunes import finetune_request, matching_finetune, new_finetune
from app.registry.tables import (
    Adapter,
    Dataset,
    Experiment,
    Extraction,
    Finetune,
    Model,
    ProbeRun,
    new_id,
    utcnow,
)
from workers import extraction, finetune, probe_training
from workers.adapters import importer
from workers.context import JobContext, subject_row
from workers.errors import JobFailed

SPLIT = {"train": 0.6, "validation": 0.2, "test": 0.2}
StepParametersT = TypeVar("StepParametersT", bound=JobParameters)


@dataclass
class StageContext(JobContext[StepParametersT]):
    """The experiment's job context for one step: progress is named after the step."""

    step: str = ""

    def progress(self, stage: str, done: int, total: int | None = None, details: dict[str, Any] | None = None) -> None:
        super().progress(f"{self.step}: {stage}", done, total, details)


def _step(context: JobContext[Any], step: str, params: StepParametersT) -> StageContext[StepParametersT]:
    return StageContext(
        job_id=context.job_id, params=params, runtime=context.runtime, attempt=context.attempt, step=step
    )


def _labelled(kind: str, what: str) -> None:
    """A chat dataset fails the job: its conversations have no labels to probe."""
    try:
        require_labelled(kind, what)
    except UnlabelledDataset as exc:
        raise JobFailed("invalid_dataset", str(exc), field="probe.dataset") from None


def _dataset(context: JobContext[ExperimentParameters]) -> Dataset:
    """The config's dataset: registered already, or a file read and registered now. A chat
    file fails the job before it is registered."""
    worker = context.runtime
    dataset_id, dataset_path = context.params.dataset, context.params.dataset_path
    if dataset_id is not None:
        with worker.sessions() as session:
            dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            raise JobFailed("not_found", f"dataset {dataset_id} was deleted")
        _labelled(dataset.kind, f"dataset {dataset_id}")
        return dataset
    assert dataset_path is not None  # the parameters' model requires one of the two
    path = Path(dataset_path)
    limit = worker.settings.max_dataset_bytes
    try:
        # a user-named path: it may have become a FIFO or a device, or grown, since the gateway looked
        upload = parse_upload(read_regular_file(path, limit), path.name)
    except FileNotFoundError as exc:
        raise JobFailed("not_found", f"{path.name}: the dataset file is gone") from exc
    except NotARegularFile as exc:
        raise JobFailed("invalid_dataset", f"{exc}; a dataset file must be a regular file", kind=exc.kind) from exc
    except FileTooLarge as exc:
        raise JobFailed(
            "too_large", f"{path.name} is larger than {limit} bytes (MAX_DATASET_BYTES)", limit_bytes=limit
        ) from exc
    except InvalidDataset as exc:  # a malformed file: the same message the upload endpoint gives
        raise JobFailed(exc.code, f"{path.name}: {exc.message}", **exc.details) from exc
    _labelled(upload.kind, path.name)
    try:
        return register_dataset(worker.sessions, worker.artifacts, upload, default_name(path.name))[0]
    except RegistrationRace as exc:
        raise JobFailed("conflict", exc.message) from None


def prompt_format_of(config: dict[str, Any]) -> str:
    """The config's prompt format: `raw` for configs stored before it could be given."""
    return str(config["extraction"].get("prompt_format", RAW))


def _probe_run(
    context: JobContext[ExperimentParameters],
    experiment: Experiment,
    model: Model,
    adapter: Adapter | None,
    dataset: Dataset,
) -> ProbeRun:
    """A finished run with exactly these settings, or a new one trained now."""
    config = experiment.config
    methods = config["probe"]["method"] if isinstance(config["probe"]["method"], list) else [config["probe"]["method"]]
    split = SPLIT | {"seed": config["experiment"]["seed"], "whiten": False}
    settings = {
        "model_id": model.id,
        "adapter_id": adapter.id if adapter else None,
        "dataset_id": dataset.id,
        "layers": context.params.layers,
        "methods": methods,
        "token_position": config["extraction"]["token_position"],
        "max_length": config["extraction"]["max_length"],
        "prompt_format": prompt_format_of(config),
        "split": split,
        "recalibration": config["probe"]["recalibration"],
    }
    with context.runtime.sessions() as session:
        for run in session.scalars(
            select(ProbeRun).where(ProbeRun.model_id == model.id, ProbeRun.best_probe_id.is_not(None))
        ):
            if all(getattr(run, key) == value for key, value in settings.items()):
                return run
    run = ProbeRun(id=new_id("prr"), job_id=context.job_id, **settings)
    with context.runtime.sessions() as session, session.begin():
        session.add(run)
    probe_training.run(_step(context, "probes", ProbeTrainingParameters(run_id=run.id)))
    with context.runtime.sessions() as session:
        finished = session.get(ProbeRun, run.id)
    assert finished is not None
    return finished


def _finetuned_adapter(context: JobContext[ExperimentParameters], experiment: Experiment, model: Model) -> Adapter:
    """The adapter of the config's fine-tune: from a finished fine-tune with the same
    settings, or trained now as a `finetune` job would train it."""
    request = finetune_request(experiment.config["finetune"], model.id, f"{experiment.name} fine-tune")
    with context.runtime.sessions() as session, session.begin():
        try:
            row = new_finetune(session, request, context.job_id)
        except ServiceError as exc:
            raise JobFailed(exc.code, f"finetune: {exc.message}", **exc.details) from None
        existing = matching_finetune(session, request, row.dataset_sha256, row.prompt_format)
        if existing is None:
            session.add(row)
    finetune_id = existing.id if existing is not None else row.id
    if existing is None:
        finetune.run(_step(context, "fine-tune", FinetuneParameters(finetune_id=finetune_id)))
    with context.runtime.sessions() as session:
        finished = session.get(Finetune, finetune_id)
        adapter = session.get(Adapter, finished.adapter_id) if finished and finished.adapter_id else None
    if adapter is None:
        raise JobFailed("not_found", f"the adapter of fine-tune {finetune_id} is gone")
    return adapter


def run(context: JobContext[ExperimentParameters]) -> dict[str, Any]:
    worker = context.runtime
    with worker.sessions() as session:
        experiment = subject_row(session, Experiment, context.params.experiment_id, "experiment")
        model = subject_row(session, Model, experiment.model_id, "model")

    adapter = _finetuned_adapter(context, experiment, model) if experiment.config.get("finetune") else None
    source = context.params.adapter
    if source is not None:
        params = AdapterImportParameters(
            source_kind=source.source_kind,
            source=source.source,
            tinker_run_id=source.tinker_run_id,
            base_model_id=model.id,
            name=f"{experiment.name} adapter",
            metadata={"experiment": experiment.name},
        )
        imported = importer.run(_step(context, "adapter import", params))
        with worker.sessions() as session:
            adapter = session.get(Adapter, imported["adapter_id"])
    dataset = _dataset(context)
    try:
        check_prompt_format(prompt_format_of(experiment.config), data_kind(dataset.kind))
    except InvalidPromptFormat as exc:
        raise JobFailed(
            "invalid_parameters",
            f"extraction.prompt_format: {exc} (the dataset holds {dataset.kind.replace('_', ' ')})",
            field="extraction.prompt_format",
        ) from None

    config = experiment.config["extraction"]
    states = Extraction(
        id=new_id("ext"),
        job_id=context.job_id,
        model_id=model.id,
        adapter_id=adapter.id if adapter else None,
        dataset_id=dataset.id,
        text_count=dataset.rows,
        layers=context.params.layers,
        token_position=config["token_position"],
        max_length=config["max_length"],
        prompt_format=prompt_format_of(experiment.config),
        model_fingerprint=model.fingerprint,
        adapter_fingerprint=adapter.identity if adapter else None,
    )
    with worker.sessions() as session, session.begin():
        session.add(states)
    extracted = extraction.run(_step(context, "extraction", ExtractionParameters(extraction_id=states.id)))
    probe_run = _probe_run(context, experiment, model, adapter, dataset)

    with worker.sessions() as session, session.begin():
        session.execute(
            update(Experiment)
            .where(Experiment.id == experiment.id)
            .values(
                adapter_id=adapter.id if adapter else None,
                dataset_id=dataset.id,
                extraction_id=states.id,
                probe_run_id=probe_run.id,
                finished_at=utcnow(),
            )
        )
    return {
        "experiment_id": experiment.id,
        "finetune_id": adapter.source if adapter and adapter.source_kind == "finetune" else None,
        "adapter_id": adapter.id if adapter else None,
        "dataset_id": dataset.id,
        "extraction_id": states.id,
        "extraction_cache_hits": extracted["cache_hits"],
        "probe_run_id": probe_run.id,
        "best_probe_id": probe_run.best_probe_id,
        "report": f"/v1/probes/{probe_run.best_probe_id}/report.html",
    }
