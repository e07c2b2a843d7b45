"""Probes: training requests, trained probes and their runs, scoring."""

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.registry.tables import Probe
from app.schemas.common import Request, prompt_format_field
from app.schemas.jobs import JobOut, JobStatus
from app.schemas.reports import CalibrationReport

ProbeMethod = Literal["logistic", "mass_mean"]
# how a probe's validation logits are mapped to probabilities (none: left as they are)
Recalibration = Literal["temperature", "platt"]
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
    recalibration: Recalibration | None = Field(None, description="Fitted on the validation split.")


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
