"""Probes: training requests, trained probes and their runs, scoring."""

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.inputs.datasets import DatasetKind
from app.registry.tables import Probe
from app.schemas.common import Dtype, Quantization, Request, prompt_format_field
from app.schemas.jobs import JobOut, JobStatus
from app.schemas.reports import BaselineDifference, CalibrationReport

ProbeMethod = Literal["logistic", "mass_mean"]
# how a probe's validation logits are mapped to probabilities (none: left as they are)
Recalibration = Literal["temperature", "platt", "isotonic"]
# train, validation and test each need a member of every class
MIN_PER_CLASS = 3


class SplitFractions(Request):
    train: float = Field(0.6, gt=0, lt=1)
    validation: float = Field(0.2, gt=0, lt=1)
    test: float = Field(0.2, gt=0, lt=1)


class ProbeCreate(Request):
    model: str = Field(description="Id of a registered base model.")
    adapter: str | None = Field(None, description="Id of an adapter of that model; its own labels and states are used.")
    dataset: str = Field(
        description="Statements (labels given) or multiple choice (labelled by the model itself); not chat."
    )
    layers: list[int] = Field(
        min_length=1, max_length=128, description="One probe per layer (and method); negative counts from the end."
    )
    token_position: Literal["last", "mean"] = "last"
    max_length: int | None = Field(None, ge=1, le=1_000_000)
    prompt_format: str = prompt_format_field()
    method: ProbeMethod | list[ProbeMethod] = Field(
        "logistic", description="`logistic`, `mass_mean`, or a list of both."
    )
    whiten: bool = Field(False, description="Mass-mean only: whiten the direction with a shrinkage covariance.")
    split: SplitFractions = Field(
        default_factory=SplitFractions, description="Stratified train/validation/test fractions."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1)
    recalibration: Recalibration | None = Field(
        None, description="`temperature`, `platt` or `isotonic`, fitted on the validation split."
    )
    baselines: bool = Field(
        True,
        description="Report the model's own confidences beside the probes (docs/concepts.md#baselines). For "
        "statements on a causal LM this is one more forward pass over every statement (P(True)); false skips it. "
        "Multiple choice has its baselines from labelling at no cost, so they are always reported.",
    )


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
    prompt_format: str = Field(description="How texts became model input: `raw`, `chat`, or the template.")
    recalibration: str | None
    is_best: bool = Field(description="The best of its run on the validation split.")
    validation: dict[str, Any] = Field(description="Validation metrics the choices were made on.")
    metrics: dict[str, Any] = Field(
        description="Held-out test metrics: value, 95% bootstrap interval and its method (`interval_method`) each."
    )
    created_at: datetime

    @classmethod
    def of(cls, probe: Probe) -> "ProbeOut":
        return cls.model_validate(probe, from_attributes=True)


class ProbeReportOut(BaseModel):
    """A probe and its calibration on the held-out test split."""

    probe: ProbeOut
    report: CalibrationReport
    baseline: CalibrationReport | None = Field(
        description="The same for the model's own probability of its answer (multiple choice); null for statements."
    )
    uncalibrated: CalibrationReport | None = Field(
        None,
        description="For a recalibrated probe, the same for its own probabilities before the recalibration, on the "
        "same test split; null or absent when the probe is not recalibrated.",
    )
    baselines: dict[str, CalibrationReport] = Field(
        default_factory=dict,
        description="The same for each of the model's own confidences, by name: `own_probability`, `entropy` and "
        "`margin` for multiple choice, `p_true` for statements on a causal language model. Absent from reports "
        "written before baselines had names.",
    )
    versus_baselines: dict[str, dict[str, BaselineDifference]] = Field(
        default_factory=dict,
        description="By baseline, then by metric: the probe's value minus the baseline's with a paired bootstrap "
        "interval, and whether the probe is better. Absent where `baselines` is.",
    )


class ProbeCardModel(BaseModel):
    """The base model whose hidden states the probe reads."""

    id: str
    name: str
    source: str = Field(description="As registered: a Hugging Face id, a folder or a GGUF file.")
    revision: str | None
    fingerprint: str = Field(
        description="Identifies the weights: the snapshot commit, a hash of a local folder's config and weight files, "
        "or a GGUF file's sha256."
    )
    dtype: Dtype
    quantization: Quantization | None
    num_layers: int
    hidden_size: int = Field(description="Length of the hidden state the probe's vectors are applied to.")


class ProbeCardAdapter(BaseModel):
    """The LoRA adapter the model ran with; all but `id` null if it was deleted since."""

    id: str
    name: str | None
    sha256: str | None = Field(description="sha256 of the adapter's adapter_model.safetensors.")
    identity: str | None = Field(
        description="sha256 over the weights' sha256 and the config values that change the adapter's output."
    )


class ProbeCardDataset(BaseModel):
    id: str
    name: str
    sha256: str = Field(description="sha256 of the normalised rows (JSONL).")
    kind: DatasetKind
    rows: int


class ProbeCardSplit(BaseModel):
    """The stratified split of the dataset's rows: fitted on train, chosen on validation, measured on test."""

    train: float
    validation: float
    test: float
    seed: int


class ProbeCard(BaseModel):
    """Everything needed to apply a probe outside the service, and what it was trained and
    measured on (docs/concepts.md#exporting-a-probe)."""

    card_version: Literal[1] = 1
    probe_id: str
    run_id: str
    method: ProbeMethod
    formula: str = Field(description="How P(correct) is computed from a hidden state and the exported arrays.")
    arrays: dict[str, str] = Field(description="Each array of the exported safetensors file and what it holds.")
    hidden_state: str = Field(description="Which hidden state the probe reads, in words.")
    model: ProbeCardModel
    adapter: ProbeCardAdapter | None
    layer: int
    layer_convention: str
    token_position: Literal["last", "mean"]
    max_length: int | None = Field(description="Inputs were truncated to their first max_length tokens (null: never).")
    prompt_format: str = Field(description="How texts became model input: `raw`, `chat`, or the template.")
    dataset: ProbeCardDataset
    split: ProbeCardSplit
    recalibration: Recalibration | None
    metrics: dict[str, Any] = Field(description="Held-out test metrics: value and 95% bootstrap interval each.")
    created_at: datetime


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
    prompt_format: str = Field(description="How texts became model input: `raw`, `chat`, or the template.")
    split: dict[str, Any]
    recalibration: str | None
    baselines: bool = Field(description="Whether statements' P(True) was computed beside the probes.")
    best_probe_id: str | None
    probes: list[ProbeOut]
    created_at: datetime
    finished_at: datetime | None


class ProbeAccepted(BaseModel):
    job: JobOut
    run: ProbeRunOut


class ScoreRequest(Request):
    texts: list[str] = Field(
        min_length=1, description="Texts to score (statements, or multiple-choice prompts as the dataset formats them)."
    )
    prompt_format: str | None = prompt_format_field(
        None,
        "How each text becomes the model's input (`raw`, `chat`, or a template naming `{text}`); by default the "
        "probe's own, which states it was trained on.",
    )
    timeout_s: float = Field(
        30, ge=0, le=300, description="How long to wait for the answer before answering 202 with the job."
    )


class ScoreOut(BaseModel):
    probe_id: str
    layer: int
    confidences: list[float] = Field(description="P(correct) for each text, recalibrated if the probe is.")
