"""Probe evaluations: a trained probe scored on another labelled dataset, or on another
variant (base or adapter) of its model."""

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.registry.tables import ProbeEvaluation
from app.schemas.common import Request, prompt_format_field
from app.schemas.jobs import JobOut, JobStatus
from app.schemas.reports import BaselineDifference, CalibrationReport

EvaluatedRows = Literal["all", "test"]


class EvaluationCreate(Request):
    dataset: str = Field(
        description="Statements (labels given) or multiple choice (labelled by the evaluated model itself); not chat."
    )
    adapter: str | None = Field(
        None,
        description="The variant whose states (and, for multiple choice, answers) are scored: an adapter of the "
        "probe's model, or null for the base model. Left out: the probe's own (its adapter, or the base).",
    )
    prompt_format: str | None = prompt_format_field(
        None,
        "How each text or question becomes the model's input (`raw`, `chat`, or a template); by default the "
        "probe's own, which its states were read under.",
    )


class EvaluationOut(BaseModel):
    id: str
    job_id: str
    status: JobStatus
    probe_id: str
    model_id: str
    adapter_id: str | None = Field(description="The adapter whose states were scored; null: the base model.")
    dataset_id: str
    prompt_format: str
    rows: EvaluatedRows = Field(
        description="`all` rows of the dataset, or only the `test` split of the probe's run when the dataset, "
        "model variant and prompt format are the probe's own (its training rows would flatter it)."
    )
    n: int | None = Field(description="Items scored; null until the job ends.")
    metrics: dict[str, Any] | None = Field(description="Each metric's value and 95% interval; null until the job ends.")
    created_at: datetime
    finished_at: datetime | None

    @classmethod
    def of(cls, evaluation: ProbeEvaluation, status: str) -> "EvaluationOut":
        fields = {name: getattr(evaluation, name) for name in cls.model_fields if name != "status"}
        return cls(**fields, status=status)


class EvaluationAccepted(BaseModel):
    job: JobOut
    evaluation: EvaluationOut


class EvaluationPage(BaseModel):
    items: list[EvaluationOut]
    next_cursor: str | None


class EvaluationReportOut(BaseModel):
    """An evaluation and its calibration report on the rows it scored."""

    evaluation: EvaluationOut
    report: CalibrationReport
    baseline: CalibrationReport | None = Field(
        description="The same for the model's own probability of its answer (multiple choice); null for statements."
    )
    uncalibrated: CalibrationReport | None = Field(
        None, description="For a recalibrated probe, the same for its probabilities before the recalibration."
    )
    baselines: dict[str, CalibrationReport] = Field(
        default_factory=dict,
        description="The same for each of the evaluated model's own confidences on these rows, by name "
        "(docs/concepts.md#baselines).",
    )
    versus_baselines: dict[str, dict[str, BaselineDifference]] = Field(
        default_factory=dict,
        description="By baseline, then by metric: the probe's value minus the baseline's with a paired bootstrap "
        "interval, and whether the probe is better.",
    )
