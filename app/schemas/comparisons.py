"""Comparisons of a base model with its adapters."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from app.schemas.common import Request, prompt_format_field
from app.schemas.jobs import JobOut, JobStatus
from app.schemas.probes import ProbeMethod, SplitFractions
from app.schemas.reports import ComparisonReport


class ComparisonCreate(Request):
    model: str = Field(description="Id of the base model.")
    adapters: list[str] = Field(min_length=1, max_length=8, description="Adapters of that base (same weights source).")
    dataset: str
    layers: list[int] = Field(min_length=1, max_length=64)
    token_position: Literal["last", "mean"] = "last"
    max_length: int | None = Field(None, ge=1, le=1_000_000)
    prompt_format: str = prompt_format_field()
    method: ProbeMethod = "logistic"
    split: SplitFractions = Field(default_factory=SplitFractions)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    on_mixed_precision: Literal["fail", "flag"] = Field(
        "fail",
        description="An adapter imported for another dtype or quantization of the same base: refuse (fail), or run it and flag the report.",
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
    prompt_format: str = Field(description="How texts became model input: `raw`, `chat`, or the template.")
    created_at: datetime
    finished_at: datetime | None
    report: ComparisonReport | None = Field(
        None,
        description="Side-by-side metrics, paired differences, cross-transfer, flags; null until the job succeeds.",
    )


class ComparisonAccepted(BaseModel):
    job: JobOut
    comparison: ComparisonOut
