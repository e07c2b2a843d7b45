"""What the service answers, as typed values. These mirror the v1 response bodies; fields
the client does not know yet are ignored, so a newer service does not break an older client.
They are copies, so that the client imports without the service: tests/client/test_wire_contract.py
compares them with the service's OpenAPI document, field by field and enum value by value."""

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field

TerminalStatus = Literal["succeeded", "failed", "cancelled"]
JobStatus = Literal["queued", "running", TerminalStatus]
# read from the Literal, so that the terminal statuses are written once
TERMINAL_STATUSES: frozenset[str] = frozenset(get_args(TerminalStatus))
TokenPosition = Literal["last", "mean"]
ProbeMethod = Literal["logistic", "mass_mean"]
Dtype = Literal["float32", "bfloat16", "float16"]
Quantization = Literal["8bit", "4bit"]
ApiScope = Literal["read", "submit", "admin"]


class Answer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class Health(Answer):
    status: Literal["ok"]


class Readiness(Answer):
    status: Literal["ready"]
    checks: dict[str, Any]


class Progress(Answer):
    """Where a job is: `done` of `total` in `stage`, and `details`, the figures of this point
    where the stage has some (a fine-tune's step: `loss`, `learning_rate`, `tokens`, and
    `validation_loss` where it was computed)."""

    stage: str | None
    done: int
    total: int | None
    details: dict[str, Any] | None = None


class JobError(Answer):
    code: str
    message: str
    details: dict[str, Any] = {}


class JobPart(Answer):
    """One part of a job spread over workers (a large extraction)."""

    id: str
    status: JobStatus
    worker: str | None
    attempts: int
    progress: Progress


class Job(Answer):
    id: str
    kind: str
    status: JobStatus
    progress: Progress
    result: dict[str, Any] | None
    error: JobError | None
    cancel_requested: bool
    attempts: int = 0
    worker: str | None
    model_id: str | None
    parent_id: str | None = None
    parts: list[JobPart] | None = None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def is_final(self) -> bool:
        return self.status in TERMINAL_STATUSES


class Model(Answer):
    id: str
    name: str
    source: str
    source_kind: Literal["local", "gguf", "hf_cache"]
    resolved_path: str
    revision: str | None
    dtype: Dtype
    quantization: Quantization | None
    fingerprint: str
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    status: Literal["pending", "ready", "failed"]
    status_reason: str | None
    parameter_count: int | None
    memory_footprint_bytes: int | None
    has_chat_template: bool | None
    linear_modules: list[str] | None = None  # what a fine-tune's LoRA may target; None until checked
    check_job_id: str | None
    created_at: datetime
    updated_at: datetime


class Dataset(Answer):
    id: str
    name: str
    kind: Literal["statements", "multiple_choice", "chat"]
    source_format: Literal["jsonl", "csv"]
    rows: int
    label_balance: dict[str, int]
    sha256: str
    upload_sha256: str
    size_bytes: int
    created_at: datetime


class Adapter(Answer):
    id: str
    name: str
    base_model_id: str
    r: int
    lora_alpha: float
    target_modules: list[str]
    sha256: str
    identity: str | None = None  # the weights and output-changing config, hashed; None from gateways before it existed
    size_bytes: int
    source_kind: Literal["tinker", "local_folder", "local_archive", "url", "upload", "finetune"]
    source: str
    tinker_path: str | None
    tinker_run_id: str | None
    conversion: dict[str, Any]
    training: dict[str, Any]
    import_job_id: str | None
    created_at: datetime


class Extraction(Answer):
    id: str
    status: JobStatus
    job_id: str
    model_id: str
    adapter_id: str | None
    dataset_id: str | None
    text_count: int
    layers: list[int]
    token_position: TokenPosition
    prompt_format: str
    max_length: int | None
    shape: list[int] | None
    dtype: str | None
    truncated_count: int | None
    cache_hits: int | None
    model_fingerprint: str
    adapter_fingerprint: str | None
    created_at: datetime
    finished_at: datetime | None


class Estimator(Answer):
    """Which calibration-error estimator a value comes from: `bins` (None for the kernel of
    smooth ECE), `binning`, `norm` and `form`."""

    name: str
    bins: int | None
    binning: Literal["equal_width", "equal_mass", "kernel"]
    norm: Literal["l1", "l2", "max"]
    form: Literal["binary", "max_probability"]


class Estimate(Answer):
    """A metric's value with its 95% bootstrap interval (None where undefined) and the
    interval's method: "percentile", or "bca" / "basic" for the binned calibration errors
    (None without an interval, or from a service before intervals named their method)."""

    value: float | None
    interval: list[float] | None
    interval_method: Literal["percentile", "bca", "basic"] | None = None
    label: str | None = None
    estimator: Estimator | None = Field(None, description="Which definition, for ECE-like metrics.")


class Probe(Answer):
    id: str
    run_id: str
    model_id: str
    adapter_id: str | None
    dataset_id: str
    layer: int
    method: ProbeMethod
    token_position: TokenPosition
    prompt_format: str
    max_length: int | None
    recalibration: str | None
    is_best: bool
    validation: dict[str, Any]
    metrics: dict[str, Estimate]
    created_at: datetime


class ProbeRun(Answer):
    id: str
    job_id: str
    status: JobStatus
    model_id: str
    adapter_id: str | None
    dataset_id: str
    layers: list[int]
    methods: list[ProbeMethod]
    token_position: TokenPosition
    prompt_format: str
    split: dict[str, Any]
    recalibration: str | None
    baselines: bool | None = None  # None from gateways that always computed them
    best_probe_id: str | None
    probes: list[Probe]
    created_at: datetime
    finished_at: datetime | None

    @property
    def best_probe(self) -> Probe | None:
        return next((probe for probe in self.probes if probe.id == self.best_probe_id), None)


class ReliabilityBin(Answer):
    """One bin of a reliability diagram; the means are None for an empty bin."""

    lower: float
    upper: float
    count: int
    mean_confidence: float | None
    accuracy: float | None


class ConfidenceHistogram(Answer):
    edges: list[float]
    counts: list[int]


class RiskCoverage(Answer):
    """Keeping the most confident items first: the fraction wrong among the kept at each coverage."""

    coverage: list[float]
    risk: list[float]


class BootstrapSettings(Answer):
    resamples: int
    seed: int
    level: float


class CalibrationReport(Answer):
    """Every report metric on one set of items, with the reliability bins (`equal_width`,
    `equal_mass`), the confidence histogram, the risk–coverage curve (None from reports
    stored before it) and the bootstrap settings."""

    n: int
    base_rate: float
    metrics: dict[str, Estimate]
    bins: dict[str, list[ReliabilityBin]]
    histogram: ConfidenceHistogram
    risk_coverage: RiskCoverage | None = None
    bootstrap: BootstrapSettings


class BaselineDifference(Estimate):
    """A metric of the probe minus the same metric of one baseline, with its paired
    bootstrap interval; `better` says which way the metric improves, `verdict` whether the
    interval excludes 0 ("probe better", "baseline better", "no clear difference")."""

    better: Literal["higher", "lower"]
    verdict: Literal["probe better", "baseline better", "no clear difference"]


class ProbeReport(Answer):
    """A probe's calibration on its held-out test split; `baseline` is the same for a
    multiple-choice model's own probability of its answer, None for statements;
    `uncalibrated` the same for a recalibrated probe's probabilities before recalibration,
    None when it is not recalibrated; `baselines` the same for each of the model's own
    confidences by name (`own_probability`, `entropy`, `margin`; `p_true`), and
    `versus_baselines` the probe's difference from each, by baseline and metric (both empty
    for reports written before baselines had names)."""

    probe: Probe
    report: CalibrationReport
    baseline: CalibrationReport | None
    uncalibrated: CalibrationReport | None = None

    baselines: dict[str, CalibrationReport] = Field(default_factory=dict)
    versus_baselines: dict[str, dict[str, BaselineDifference]] = Field(default_factory=dict)


class Evaluation(Answer):
    """A trained probe scored on a labelled dataset, perhaps under another variant of its
    model (`adapter_id` None: the base). `rows` is `all`, or `test` when the dataset, variant
    and prompt format are the probe's own (only its run's test split is scored); `n` and
    `metrics` are None until the job ends."""

    id: str
    job_id: str
    status: JobStatus
    probe_id: str
    model_id: str
    adapter_id: str | None
    dataset_id: str
    prompt_format: str
    rows: Literal["all", "test"]
    n: int | None
    metrics: dict[str, Estimate] | None
    created_at: datetime
    finished_at: datetime | None


class EvaluationReport(Answer):
    """An evaluation's calibration report on the rows it scored; `baseline`, `uncalibrated`,
    `baselines` and `versus_baselines` as a probe's report has them."""

    evaluation: Evaluation
    report: CalibrationReport
    baseline: CalibrationReport | None
    uncalibrated: CalibrationReport | None = None
    baselines: dict[str, CalibrationReport] = Field(default_factory=dict)
    versus_baselines: dict[str, dict[str, BaselineDifference]] = Field(default_factory=dict)


class TransferRow(Answer):
    """A training unit of a transfer matrix: one dataset, or the union of all of them, with
    the layer chosen on its validation split and each layer's validation AUROC."""

    label: str
    dataset_ids: list[str]
    layer: int
    n_train: int
    validation_auroc: dict[str, float | None]


class TransferColumn(Answer):
    """A test set: `rows` is `test` when it is a training set too (its test split only)."""

    dataset_id: str
    label: str
    rows: Literal["all", "test"]
    n: int


class TransferCell(Answer):
    n: int
    metrics: dict[str, Estimate]
    auroc_by_layer: dict[str, float | None]


class TransferMatrix(Answer):
    rows: list[TransferRow]
    columns: list[TransferColumn]
    cells: list[list[TransferCell]]

    def values(self, metric: str = "auroc") -> list[list[float | None]]:
        """`metric`'s value in every cell, row by row."""
        return [[cell.metrics[metric].value if metric in cell.metrics else None for cell in row] for row in self.cells]


class Transfer(Answer):
    """Probes trained on `train_dataset_ids` (one per set, or one on their union) scored on
    `test_dataset_ids`; `matrix` is None until the job succeeds (and in lists)."""

    id: str
    job_id: str
    status: JobStatus
    model_id: str
    adapter_id: str | None
    train_dataset_ids: list[str]
    test_dataset_ids: list[str]
    union_train: bool
    layers: list[int]
    method: ProbeMethod
    token_position: TokenPosition
    max_length: int | None
    prompt_format: str
    split: dict[str, Any]
    created_at: datetime
    finished_at: datetime | None
    matrix: TransferMatrix | None = None


class Score(Answer):
    probe_id: str
    layer: int
    confidences: list[float]


class ValidationSummary(Answer):
    n: int
    auroc: float | None
    nll: float
    brier: float


class Precision(Answer):
    dtype: Dtype
    quantization: Quantization | None


class ComparisonVariant(Answer):
    """The base (`label` "base") or one adapter, at the comparison's layer, with its own
    confidences' reports (`baselines`) and its probe's differences from them
    (`versus_baselines`), both empty in reports written before baselines were reported."""

    label: str
    model_id: str
    adapter_id: str | None
    precision: Precision
    report: CalibrationReport
    baselines: dict[str, CalibrationReport] = Field(default_factory=dict)
    versus_baselines: dict[str, dict[str, BaselineDifference]] = Field(default_factory=dict)


class CrossTransfer(Answer):
    auroc: float | None
    ece: float
    brier: float
    n: int


class SelfLabelSummary(Answer):
    """How a model answered a multiple-choice set: its accuracy, its letter picks, the gold letters."""

    n: int
    accuracy: float
    picks: dict[str, int]
    answers: dict[str, int]


class RateDifference(Answer):
    value: float
    interval: list[float] | None
    estimator: str


class AnswerDifference(Answer):
    accuracy: RateDifference
    picks_total_variation: float


class ComparisonReport(Answer):
    """The base and its adapters side by side: `differences` and `cross_transfer` by label,
    `per_layer_validation` and `per_layer_test` (test AUROC and ECE) by layer and then label; on multiple choice, `answers` and
    `answer_differences` by label."""

    layer: int
    variants: list[ComparisonVariant]
    differences: dict[str, dict[str, Estimate]]
    cross_transfer: dict[str, CrossTransfer]
    per_layer_validation: dict[str, dict[str, ValidationSummary]]
    flags: list[str]
    test_n: int
    per_layer_test: dict[str, dict[str, dict[str, Estimate]]] | None = None
    answers: dict[str, SelfLabelSummary] | None = None
    answer_differences: dict[str, AnswerDifference] | None = None


class Comparison(Answer):
    id: str
    job_id: str
    status: JobStatus
    model_id: str
    adapter_ids: list[str]
    dataset_id: str
    layers: list[int]
    method: ProbeMethod
    token_position: TokenPosition
    prompt_format: str
    created_at: datetime
    finished_at: datetime | None
    report: ComparisonReport | None = None


class TinkerModel(Answer):
    model_name: str | None
    max_context_length: int | None = None
    trainable: bool | None = None
    sampleable: bool | None = None


class ApiKey(Answer):
    """An API key as the service lists it: `prefix` recognises it, the key itself is not there."""

    id: str
    name: str
    prefix: str
    scopes: list[ApiScope]
    rate_limit_per_minute: int | None
    rate_limit_burst: int | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class CreatedApiKey(ApiKey):
    """The answer to a key's creation, the only one that holds the key (`secret`)."""

    secret: str = Field(repr=False)


Item = TypeVar("Item", bound=Answer)


class Page(Answer, Generic[Item]):
    """One page of a list, newest first; pass `next_cursor` as `cursor` for the next one."""

    items: list[Item]
    next_cursor: str | None


class Finetune(Answer):
    """A LoRA adapter trained from a base model and a dataset. `settings` holds every setting
    the run used (`lora` and `training`, defaults filled in); `summary` (None until it
    succeeds) the examples used and left out and the final and best losses."""

    id: str
    job_id: str
    status: JobStatus
    name: str
    backend: Literal["local", "tinker"]
    base_model_id: str
    dataset_id: str
    dataset_sha256: str
    prompt_format: str
    settings: dict[str, Any]
    adapter_id: str | None
    summary: dict[str, Any] | None
    created_at: datetime
    finished_at: datetime | None

    @property
    def final_loss(self) -> float | None:
        """The training loss of the last step."""
        return (self.summary or {}).get("final_loss")

    @property
    def final_validation_loss(self) -> float | None:
        return (self.summary or {}).get("final_validation_loss")

    @property
    def best_validation_loss(self) -> float | None:
        return (self.summary or {}).get("best_validation_loss")


class LossPoint(Answer):
    """One optimizer step: its mean cross-entropy over the completion tokens it covers, and
    the loss on the held-out examples where it was computed."""

    step: int
    loss: float
    learning_rate: float
    tokens: int
    validation_loss: float | None = None


class LossHistory(Answer):
    finetune_id: str
    points: list[LossPoint]


class Experiment(Answer):
    id: str
    name: str
    status: JobStatus
    job_id: str
    config: dict[str, Any]
    links: dict[str, str | None]
    created_at: datetime
    finished_at: datetime | None
