"""Request and response bodies of the HTTP API (v1). Tables live in `app.registry.tables`."""

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from app.auth import display_prefix
from app.documents import within_depth_limit
from app.errors import NUL_MESSAGE
from app.model_sources import Revision
from app.registry.tables import Adapter, ApiKey, Dataset, Extraction, Job, Model, Probe
from app.settings import MAX_RATE_LIMIT

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Dtype = Literal["float32", "bfloat16", "float16"]
DISPLAY_NAME_MAX = 200  # characters in a resource's display name
Quantization = Literal["8bit", "4bit"]


def _holds_nul(value: Any) -> bool:
    """Whether any string in `value`, however deeply nested, holds a NUL (a loop, not
    recursion: a deeply nested body must not exhaust the stack). Numbers, and nested request
    bodies, which check themselves, hold none."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, list | tuple):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
    return False


def without_nul(value: Any) -> Any:
    """PostgreSQL cannot store a NUL character and SQLite can: refused in every string a
    request carries, so the answer does not depend on the registry's backend."""
    if _holds_nul(value):
        raise ValueError(NUL_MESSAGE)
    return value


class Request(BaseModel):
    """Request bodies refuse unknown keys, so a typo is a 422 naming it, not a silent default,
    and NUL characters (`without_nul`)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*")
    @classmethod
    def _without_nul(cls, value: Any) -> Any:
        return without_nul(value)


class ModelCreate(Request):
    name: str = Field(min_length=1, max_length=DISPLAY_NAME_MAX, description="Display name.")
    source: str = Field(
        min_length=1,
        max_length=1000,
        description="A local folder with config.json and weights, or a Hugging Face id already in the local cache.",
    )
    revision: Revision | None = Field(None, description="Hugging Face revision: a 40-hex commit hash, or a branch or tag name in the local cache.")
    dtype: Dtype = Field("float32", description="Weights' dtype on the worker.")
    quantization: Quantization | None = Field(None, description="bitsandbytes quantization of the linear layers.")


class Progress(BaseModel):
    stage: str | None
    done: int
    total: int | None


class JobError(BaseModel):
    code: str
    message: str
    details: dict[str, Any] = {}


class JobOut(BaseModel):
    id: str
    kind: str
    status: JobStatus
    progress: Progress
    result: dict[str, Any] | None
    error: JobError | None
    cancel_requested: bool
    attempts: int = Field(0, description="Times a worker has started the job; a job whose worker died is started again, up to JOB_MAX_ATTEMPTS.")
    worker: str | None
    model_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, job: Job) -> "JobOut":
        return cls(
            id=job.id,
            kind=job.kind,
            status=job.status,  # type: ignore[arg-type]
            progress=Progress(stage=job.progress_stage, done=job.progress_done, total=job.progress_total),
            result=job.result,
            error=JobError(**job.error) if job.error else None,
            cancel_requested=job.cancel_requested,
            attempts=job.attempts or 0,
            worker=job.worker,
            model_id=job.model_id,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


class JobAccepted(BaseModel):
    job: JobOut


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class ModelOut(BaseModel):
    id: str
    name: str
    source: str
    source_kind: Literal["local", "hf_cache"]
    resolved_path: str
    revision: str | None
    dtype: Dtype
    quantization: Quantization | None
    fingerprint: str = Field(description="Identifies the weights: the snapshot commit, or a hash of a local folder's config and weight files.")
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    status: Literal["pending", "ready", "failed"]
    status_reason: str | None
    parameter_count: int | None
    memory_footprint_bytes: int | None
    check_job_id: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, model: Model) -> "ModelOut":
        return cls.model_validate(model, from_attributes=True)


class ModelPage(BaseModel):
    items: list[ModelOut]
    next_cursor: str | None


class DatasetOut(BaseModel):
    id: str
    name: str
    kind: Literal["statements", "multiple_choice"]
    source_format: Literal["jsonl", "csv"]
    rows: int
    label_balance: dict[str, int] = Field(
        description="Statements: count per label (`'0'`, `'1'`). Multiple choice: count per gold answer index."
    )
    sha256: str = Field(description="sha256 of the normalised rows (JSONL); the same rows uploaded again give the same dataset.")
    upload_sha256: str = Field(description="sha256 of the uploaded file as it came.")
    size_bytes: int
    created_at: datetime

    @classmethod
    def of(cls, dataset: Dataset) -> "DatasetOut":
        return cls.model_validate(dataset, from_attributes=True)


class DatasetPage(BaseModel):
    items: list[DatasetOut]
    next_cursor: str | None


class ExtractionCreate(Request):
    model: str = Field(description="Id of a registered base model.")
    adapter: str | None = Field(None, description="Id of a registered LoRA adapter of that model.")
    texts: list[str] | None = Field(None, description="Texts inline (at most MAX_INLINE_TEXTS); or give `dataset`.")
    dataset: str | None = Field(None, description="Id of an uploaded dataset; or give `texts`.")
    layers: list[int] = Field(
        min_length=1, max_length=512, description="0 = embeddings, i = output of block i (before the final norm); negative counts from the end."
    )
    token_position: Literal["last", "mean"] = Field("last", description="The last real token, or the mean over real tokens.")
    max_length: int | None = Field(None, ge=1, le=1_000_000, description="Truncate texts to this many tokens (the job counts how many were).")


class ExtractionOut(BaseModel):
    id: str
    status: JobStatus = Field(description="Status of the job that computes it.")
    job_id: str
    model_id: str
    adapter_id: str | None
    dataset_id: str | None
    text_count: int
    layers: list[int] = Field(description="Requested layers, negative indices resolved.")
    token_position: Literal["last", "mean"]
    max_length: int | None
    shape: list[int] | None = Field(description="(texts, layers, hidden) once computed.")
    dtype: str | None
    truncated_count: int | None
    cache_hits: int | None = Field(description="Texts served from the content cache without running the model.")
    model_fingerprint: str
    adapter_fingerprint: str | None
    created_at: datetime
    finished_at: datetime | None

    @classmethod
    def of(cls, extraction: Extraction, job_status: str) -> "ExtractionOut":
        fields = {name: getattr(extraction, name) for name in cls.model_fields if name != "status"}
        return cls(**fields, status=job_status)


class ExtractionAccepted(BaseModel):
    job: JobOut
    extraction: ExtractionOut


class ExtractionPage(BaseModel):
    items: list[ExtractionOut]
    next_cursor: str | None


class AdapterImport(Request):
    source: str = Field(
        min_length=1,
        max_length=2000,
        description="`tinker://<run>/external_weights/<name>`, a PEFT folder or archive under ADAPTER_ROOTS, "
        "or an `https://` URL on ADAPTER_URL_HOSTS.",
    )
    base_model: str = Field(description="Id of the registered base model the adapter was trained on.")
    name: str = Field(min_length=1, max_length=200)
    metadata: Annotated[dict[str, Any], AfterValidator(within_depth_limit)] = Field(
        default_factory=dict, description="Training metadata to keep with it (dataset, run, notes…)."
    )


class AdapterOut(BaseModel):
    id: str
    name: str
    base_model_id: str
    r: int
    lora_alpha: float
    target_modules: list[str]
    sha256: str = Field(description="sha256 of the converted adapter_model.safetensors.")
    identity: str = Field(
        description="sha256 over the weights' sha256 and the config values that change the adapter's output (r, lora_alpha, "
        "target_modules, use_rslora, bias, fan_in_fan_out); one adapter per identity and base model."
    )
    size_bytes: int
    source_kind: Literal["tinker", "local_folder", "local_archive", "url", "upload"]
    source: str
    tinker_path: str | None
    tinker_run_id: str | None
    conversion: dict[str, Any] = Field(description="What the import changed to make a PEFT adapter.")
    training: dict[str, Any] = Field(description="Training metadata: the user's, and what Tinker reports.")
    import_job_id: str | None
    created_at: datetime

    @classmethod
    def of(cls, adapter: Adapter) -> "AdapterOut":
        return cls.model_validate(adapter, from_attributes=True)


class AdapterPage(BaseModel):
    items: list[AdapterOut]
    next_cursor: str | None


class TinkerModel(BaseModel):
    model_name: str | None
    max_context_length: int | None = None
    trainable: bool | None = None
    sampleable: bool | None = None


class TinkerModels(BaseModel):
    models: list[TinkerModel]


ProbeMethod = Literal["logistic", "mass_mean"]


class SplitFractions(Request):
    train: float = Field(0.6, gt=0, lt=1)
    validation: float = Field(0.2, gt=0, lt=1)
    test: float = Field(0.2, gt=0, lt=1)


class ProbeCreate(Request):
    model: str = Field(description="Id of a registered base model.")
    adapter: str | None = Field(None, description="Id of an adapter of that model; its own labels and states are used.")
    dataset: str = Field(description="Statements (labels given) or multiple choice (labelled by the model itself).")
    layers: list[int] = Field(min_length=1, max_length=128, description="One probe per layer (and method); negative counts from the end.")
    token_position: Literal["last", "mean"] = "last"
    max_length: int | None = Field(None, ge=1, le=1_000_000)
    method: ProbeMethod | list[ProbeMethod] = Field("logistic", description="`logistic`, `mass_mean`, or a list of both.")
    whiten: bool = Field(False, description="Mass-mean only: whiten the direction with a shrinkage covariance.")
    split: SplitFractions = Field(default_factory=SplitFractions, description="Stratified train/validation/test fractions.")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    recalibration: Literal["temperature", "platt"] | None = Field(None, description="Fitted on the validation split.")


class ProbeOut(BaseModel):
    id: str
    run_id: str
    model_id: str
    adapter_id: str | None
    dataset_id: str
    layer: int
    method: ProbeMethod
    token_position: Literal["last", "mean"]
    max_length: int | None
    recalibration: str | None
    is_best: bool = Field(description="The best of its run on the validation split.")
    validation: dict[str, Any] = Field(description="Validation metrics the choices were made on.")
    metrics: dict[str, Any] = Field(description="Held-out test metrics: value and 95% bootstrap interval each.")
    created_at: datetime

    @classmethod
    def of(cls, probe: Probe) -> "ProbeOut":
        return cls.model_validate(probe, from_attributes=True)


class ProbePage(BaseModel):
    items: list[ProbeOut]
    next_cursor: str | None


class ProbeRunOut(BaseModel):
    id: str
    job_id: str
    status: JobStatus
    model_id: str
    adapter_id: str | None
    dataset_id: str
    layers: list[int]
    methods: list[ProbeMethod]
    token_position: Literal["last", "mean"]
    split: dict[str, Any]
    recalibration: str | None
    best_probe_id: str | None
    probes: list[ProbeOut]
    created_at: datetime
    finished_at: datetime | None


class ProbeAccepted(BaseModel):
    job: JobOut
    run: ProbeRunOut


class ScoreRequest(Request):
    texts: list[str] = Field(min_length=1, description="Texts to score (statements, or multiple-choice prompts as the dataset formats them).")
    timeout_s: float = Field(30, ge=0, le=300, description="How long to wait for the answer before answering 202 with the job.")


class ScoreOut(BaseModel):
    probe_id: str
    layer: int
    confidences: list[float] = Field(description="P(correct) for each text, recalibrated if the probe is.")


class ComparisonCreate(Request):
    model: str = Field(description="Id of the base model.")
    adapters: list[str] = Field(min_length=1, max_length=8, description="Adapters of that base (same weights source).")
    dataset: str
    layers: list[int] = Field(min_length=1, max_length=64)
    token_position: Literal["last", "mean"] = "last"
    max_length: int | None = Field(None, ge=1, le=1_000_000)
    method: ProbeMethod = "logistic"
    split: SplitFractions = Field(default_factory=SplitFractions)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    on_mixed_precision: Literal["fail", "flag"] = Field(
        "fail", description="An adapter imported for another dtype or quantization of the same base: refuse (fail), or run it and flag the report."
    )


class ComparisonOut(BaseModel):
    id: str
    job_id: str
    status: JobStatus
    model_id: str
    adapter_ids: list[str]
    dataset_id: str
    layers: list[int]
    method: ProbeMethod
    token_position: Literal["last", "mean"]
    created_at: datetime
    finished_at: datetime | None
    report: dict[str, Any] | None = Field(None, description="Side-by-side metrics, paired differences, cross-transfer, flags.")


class ComparisonAccepted(BaseModel):
    job: JobOut
    comparison: ComparisonOut


class ExperimentMeta(Request):
    name: str = Field(min_length=1, max_length=200)
    seed: int = Field(0, ge=0, le=2**31 - 1)


class ExperimentModel(Request):
    name: str = Field(min_length=1, max_length=1000, description="Hugging Face id in the local cache, or a local folder.")
    revision: Revision | None = None
    dtype: Dtype = "float32"
    quantization: Quantization | None = None
    tinker_lora_path: str | None = Field(None, description="A PEFT adapter folder (under ADAPTER_ROOTS) to use when Tinker is not enabled.")


class ExperimentTinker(Request):
    enabled: bool = False
    checkpoint_path: str | None = Field(None, description="`tinker://<run>/external_weights/<name>`.")
    download_weights: bool = Field(True, description="Accepted for compatibility: weights are always downloaded.")
    output_dir: str | None = Field(None, description="Accepted for compatibility: adapters go to the artifact store.")


class ExperimentExtraction(Request):
    layers: list[int] = Field(min_length=1, max_length=128)
    token_position: Literal["last", "mean"] = "last"
    max_length: int | None = Field(None, ge=1, le=1_000_000)
    cache_dir: str | None = Field(None, description="Accepted for compatibility: the service keeps its own content cache.")


class ExperimentProbe(Request):
    dataset: str = Field(description="Id of an uploaded dataset, or a JSONL/CSV file under ADAPTER_ROOTS.")
    method: ProbeMethod | list[ProbeMethod] = "logistic"
    recalibration: Literal["temperature", "platt"] | None = None


class ExperimentConfig(Request):
    """The experiment config format of the seed framework (SPEC §6)."""

    experiment: ExperimentMeta
    model: ExperimentModel
    tinker: ExperimentTinker = Field(default_factory=ExperimentTinker)
    extraction: ExperimentExtraction
    probe: ExperimentProbe


class ExperimentOut(BaseModel):
    id: str
    name: str
    status: JobStatus
    job_id: str
    config: dict[str, Any]
    links: dict[str, str | None] = Field(description="Everything the experiment made or reused, by API path.")
    created_at: datetime
    finished_at: datetime | None


class ExperimentAccepted(BaseModel):
    job: JobOut
    experiment: ExperimentOut


class ResidentModel(BaseModel):
    model_id: str
    bytes: int
    adapters: list[str] = []


class WorkerOut(BaseModel):
    name: str
    device: str
    host: str | None = None
    pid: int | None = None
    started_at: datetime | None = None
    last_heartbeat: datetime | None = None
    memory_budget_bytes: int | None = None
    memory_used_bytes: int | None = None
    resident_models: list[ResidentModel] = []
    current_job: str | None = None


class WorkerList(BaseModel):
    items: list[WorkerOut]


ApiScope = Literal["read", "submit", "admin"]


class ApiKeyCreate(Request):
    name: str = Field(min_length=1, max_length=200, description="What the key is for, e.g. who holds it.")
    scopes: list[ApiScope] = Field(
        min_length=1, description="`read` (GET), `submit` (create, change, delete, run; includes read), `admin` (API keys; includes both)."
    )
    # bounded well inside the registry's 32-bit columns: a million a minute is more than any gateway answers
    rate_limit_per_minute: int | None = Field(
        None, ge=0, le=MAX_RATE_LIMIT, description="This key's own limit (0: none); default: the service's RATE_LIMIT_PER_MINUTE."
    )
    rate_limit_burst: int | None = Field(
        None, ge=1, le=MAX_RATE_LIMIT, description="Requests at once after a quiet spell (needs rate_limit_per_minute); default: rate_limit_per_minute."
    )


class ApiKeyOut(BaseModel):
    """A key as lists show it: never the key itself, nor its hash."""

    id: str
    name: str
    prefix: str = Field(description="How the key starts (`cpk_<prefix>`), to recognise it; not secret.")
    scopes: list[ApiScope] = Field(description="Every scope the key holds, implied ones included.")
    rate_limit_per_minute: int | None
    rate_limit_burst: int | None
    created_at: datetime
    last_used_at: datetime | None = Field(description="To the minute.")
    revoked_at: datetime | None

    @classmethod
    def of(cls, key: ApiKey) -> "ApiKeyOut":
        return cls.model_validate(key, from_attributes=True).model_copy(update={"prefix": display_prefix(key.prefix)})


class ApiKeyCreated(ApiKeyOut):
    secret: str = Field(description="The API key. It is shown this once: the service keeps only its hash.")


class ApiKeyPage(BaseModel):
    items: list[ApiKeyOut]
    next_cursor: str | None


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. `not_found`, `validation_error`.")
    message: str = Field(description="What is wrong, naming the field or resource.")
    details: dict[str, Any] = Field(description="Context: `fields` for validation errors, `field`, `limit_bytes`…")


class ErrorOut(BaseModel):
    """The envelope of every error answer."""

    error: ErrorBody


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": description}
    for status, description in {
        404: "No such resource.",
        413: "Request body too large.",
        422: "Invalid request: `details` names each bad field.",
        503: "A back-end (database, Redis) is unreachable; retry after `Retry-After` seconds.",
    }.items()
}


class HealthOut(BaseModel):
    status: Literal["ok"]


class ReadinessOut(BaseModel):
    status: Literal["ready"]
    checks: dict[str, Any]
