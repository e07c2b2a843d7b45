"""Datasets: what an upload registered."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from app.inputs.datasets import DatasetKind
from app.registry.tables import Dataset


class DatasetOut(BaseModel):
    id: str
    name: str
    kind: DatasetKind = Field(
        description="`statements`, `multiple_choice`, or `chat` (conversations to fine-tune on, which nothing probes)."
    )
    source_format: Literal["jsonl", "csv"]
    rows: int
    label_balance: dict[str, int] = Field(
        description="Statements: count per label (`'0'`, `'1'`). Multiple choice: count per gold answer index. "
        "Chat: empty, as conversations have no label."
    )
    sha256: str = Field(
        description="sha256 of the normalised rows (JSONL); the same rows uploaded again give the same dataset."
    )
    upload_sha256: str = Field(description="sha256 of the uploaded file as it came.")
    size_bytes: int
    created_at: datetime

    @classmethod
    def of(cls, dataset: Dataset) -> "DatasetOut":
        return cls.model_validate(dataset, from_attributes=True)


class DatasetPage(BaseModel):
    items: list[DatasetOut]
    next_cursor: str | None
