"""Hidden-state extractions: the request and its record."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from app.registry.tables import Extraction
from app.schemas.common import Request, prompt_format_field
from app.schemas.jobs import JobOut, JobStatus


class ExtractionCreate(Request):
    model: str = Field(description="Id of a registered base model.")
    adapter: str | None = Field(None, description="Id of a registered LoRA adapter of that model.")
    texts: list[str] | None = Field(None, description="Texts inline (at most MAX_INLINE_TEXTS); or give `dataset`.")
    dataset: str | None = Field(None, description="Id of an uploaded dataset; or give `texts`.")
    layers: list[int] = Field(
        min_length=1,
        max_length=512,
        description="0 = embeddings, i = output of block i (before the final norm); negative counts from the end.",
    )
    token_position: Literal["last", "mean"] = Field(
        "last", description="The last real token, or the mean over real tokens."
    )
    max_length: int | None = Field(
        None, ge=1, le=1_000_000, description="Truncate texts to this many tokens (the job counts how many were)."
    )
    prompt_format: str = prompt_format_field()


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
    prompt_format: str = Field(description="How texts became model input: `raw`, `chat`, or the template.")
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
