"""What each kind of job is given: one frozen model of its parameters per kind.

A route builds the model of its job's kind, `app.jobs` stores it in the job row as JSON,
and the worker validates the row against the same model before the handler runs
(`workers/runner.py`): a handler reads typed attributes, and a row that does not fit fails
its job at once with `invalid_parameters`. Fields that today's rows leave out when they have
no value (`texts` of an extraction of a dataset, `upload` of an import that is no upload)
are left out of the JSON too. Torch-free: the gateway imports it.
"""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.inputs.adapter_sources import SourceKind


def _is_none(value: Any) -> bool:
    return value is None


class JobParameters(BaseModel):
    """Parameters of a job, or a part of them: frozen, as nothing changes them once the job
    is submitted."""

    model_config = ConfigDict(frozen=True)


class NoParameters(JobParameters):
    """A job that needs nothing but its kind (`ping`, `tinker_models`)."""


class ModelCheckParameters(JobParameters):
    """A `model_check`: load a registered model and run one token through it."""

    model_id: str = Field(description="The model to check; its row becomes `ready` or `failed`.")


class ExtractionParameters(JobParameters):
    """An `extraction`: hidden states of texts at layers, as its extraction row says."""

    extraction_id: str = Field(description="The extraction row: model, adapter, dataset, layers, position.")
    texts: list[str] | None = Field(
        None,
        exclude_if=_is_none,
        description="The texts of an extraction of inline texts; left out for one of a dataset.",
    )


class ExtractionPartParameters(JobParameters):
    """An `extraction_part`: one part of an extraction spread over workers, as earlier versions
    planned them (parts are `states_part` jobs now; one still queued runs as before). It
    computes the states of some of the extraction's texts into the content cache."""

    extraction_id: str = Field(description="The extraction this part belongs to.")
    part: int = Field(ge=0, description="The part's number, from 0, in the order of the extraction's batch plan.")
    indices: list[int] = Field(
        description="Positions in the extraction's text list of the texts this part computes, in that list's order: "
        "together a run of whole batches of the plan one worker would make for all of them."
    )
    token_budget: int = Field(
        gt=0, description="The batch plan's padded tokens per batch, as the planning worker had it."
    )
    max_batch_size: int = Field(
        gt=0, description="The batch plan's most texts per batch, as the planning worker had it."
    )


class StatesPartParameters(JobParameters):
    """A `states_part`: one part of the hidden states a job needs of a dataset's rows, spread
    over workers (`workers/fanout.py`). It computes the states of some rows, rendered under
    the prompt format, into the content cache and keeps no array; its parent job reads them
    from the cache once every part has succeeded."""

    group: str = Field(
        description="Which set of states of its parent this part serves (a window of an extraction, a variant of a "
        "comparison, a dataset of a transfer)."
    )
    part: int = Field(ge=0, description="The part's number among its parent's parts, from 0, in planning order.")
    dataset_id: str = Field(description="The dataset whose rows are the texts.")
    prompt_format: str = Field(description="How each row becomes the text the model reads.")
    model_id: str = Field(description="The model whose hidden states are computed.")
    adapter_id: str | None = Field(None, description="The adapter applied to the model; null for the base model.")
    layers: list[int] = Field(min_length=1, description="The layers, as the parent's request lists them.")
    token_position: str = Field(description="`last` or `mean`, as the parent's request says.")
    max_length: int | None = Field(None, description="Tokens kept of each text, as the parent's request says.")
    rows: list[int] = Field(
        description="Positions in the dataset of the rows this part computes, ascending: together a run of whole "
        "batches of the plan one worker would make for the parent's texts."
    )
    token_budget: int = Field(gt=0, description="The batch plan's padded tokens per batch, as the parent planned.")
    max_batch_size: int = Field(gt=0, description="The batch plan's most texts per batch, as the parent planned.")


class ImportSource(JobParameters):
    """Where an adapter is imported from, as the gateway classified it (`app/inputs/adapter_sources.py`)."""

    source_kind: SourceKind = Field(description="`tinker`, `local_folder`, `local_archive`, `url` or `upload`.")
    source: str = Field(
        description="The Tinker path, the resolved local path, the URL, or an upload's file name (for the record)."
    )
    tinker_run_id: str | None = Field(None, description="The Tinker training run, for a Tinker source.")


class AdapterImportParameters(ImportSource):
    """An `adapter_import`: fetch, convert and register a LoRA adapter of a base model."""

    base_model_id: str = Field(description="The registered model the adapter was trained on.")
    name: str = Field(description="The adapter's name in the registry.")
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="The user's training metadata, kept with the adapter."
    )
    upload: str | None = Field(
        None,
        exclude_if=_is_none,
        description="The store key of an uploaded archive (`staging/uploads/…`), removed once the import ends; "
        "left out for other sources.",
    )

    @model_validator(mode="after")
    def _upload_names_its_archive(self) -> "AdapterImportParameters":
        if (self.source_kind == "upload") != (self.upload is not None):
            raise ValueError("`upload` is given for an upload, and only for one")
        return self


class ProbeTrainingParameters(JobParameters):
    """A `probe_training`: probes per layer and method, as its probe run row says."""

    run_id: str = Field(description="The probe run row: model, adapter, dataset, layers, methods, split.")


class ProbeScoringParameters(JobParameters):
    """A `probe_scoring`: P(correct) of texts under a trained probe."""

    probe_id: str = Field(description="The probe to score with.")
    texts: list[str] = Field(description="The texts to score, in the answer's order.")
    prompt_format: str = Field("raw", description="How each text becomes the model's input, checked by the gateway.")


class ProbeEvaluationParameters(JobParameters):
    """A `probe_evaluation`: a trained probe scored on a labelled dataset, as its row says."""

    evaluation_id: str = Field(description="The evaluation row: probe, model variant, dataset, prompt format, rows.")


class SplitParameters(JobParameters):
    """A seeded stratified train/validation/test split."""

    train: float = Field(description="Fraction of the texts probes are fitted on.")
    validation: float = Field(description="Fraction the layer is chosen on.")
    test: float = Field(description="Fraction the report is made on.")
    seed: int = Field(description="Seed of the split and of the bootstrap.")


class ComparisonParameters(JobParameters):
    """A `comparison`: a base model and its adapters on the same texts, split and layers."""

    comparison_id: str = Field(description="The comparison row: model, adapters, dataset, layers, method.")
    split: SplitParameters = Field(description="The one split every model is trained and reported on.")
    max_length: int | None = Field(description="Tokens kept of each text; None: the model's own limit.")


class TransferParameters(JobParameters):
    """A `transfer`: a transfer matrix, as its row says."""

    transfer_id: str = Field(
        description="The transfer row: model variant, training and test sets, layers, method, split."
    )


class FinetuneParameters(JobParameters):
    """A `finetune`: a LoRA adapter trained as its fine-tune row says, then registered."""

    finetune_id: str = Field(description="The fine-tune row: base model, dataset, settings, prompt format.")


class ExperimentParameters(JobParameters):
    """An `experiment`: a config run end to end — adapter import, dataset, extraction, probes."""

    experiment_id: str = Field(description="The experiment row, holding the config.")
    layers: list[int] = Field(description="The config's layers, resolved against the model's layer count.")
    adapter: ImportSource | None = Field(description="Where to import the adapter from; None: the base model alone.")
    dataset: str | None = Field(description="A registered dataset's id; None when `dataset_path` is given.")
    dataset_path: str | None = Field(description="A dataset file to register first; None when `dataset` is given.")

    @model_validator(mode="after")
    def _one_dataset(self) -> "ExperimentParameters":
        if (self.dataset is None) == (self.dataset_path is None):
            raise ValueError("exactly one of `dataset` and `dataset_path` is given")
        return self


PARAMETERS: dict[str, type[JobParameters]] = {
    "adapter_import": AdapterImportParameters,
    "comparison": ComparisonParameters,
    "experiment": ExperimentParameters,
    "extraction": ExtractionParameters,
    "extraction_part": ExtractionPartParameters,
    "finetune": FinetuneParameters,
    "model_check": ModelCheckParameters,
    "ping": NoParameters,
    "probe_evaluation": ProbeEvaluationParameters,
    "probe_scoring": ProbeScoringParameters,
    "probe_training": ProbeTrainingParameters,
    "states_part": StatesPartParameters,
    "tinker_models": NoParameters,
    "transfer": TransferParameters,
}
