"""Transfer matrices: probes trained on some labelled datasets, scored on others."""

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.registry.tables import Transfer
from app.schemas.common import Request, prompt_format_field
from app.schemas.jobs import JobOut, JobStatus
from app.schemas.probes import ProbeMethod, SplitFractions
from app.schemas.reports import Estimate, StoredReportPart

MAX_TRANSFER_DATASETS = 16


class TransferCreate(Request):
    model: str = Field(description="Id of a registered base model.")
    adapter: str | None = Field(None, description="An adapter of that model, whose states and labels are used.")
    train: list[str] = Field(
        min_length=1,
        max_length=MAX_TRANSFER_DATASETS,
        description="Datasets to train on: a probe per dataset (or one on their union, with `union`).",
    )
    test: list[str] = Field(
        min_length=1,
        max_length=MAX_TRANSFER_DATASETS,
        description="Datasets to score every probe on; one also in `train` is scored on its test split only.",
    )
    union: bool = Field(False, description="One probe on the union of the training sets' train splits.")
    layers: list[int] = Field(
        min_length=1, max_length=64, description="A probe per layer; the layer is chosen on validation."
    )
    method: ProbeMethod = "logistic"
    token_position: Literal["last", "mean"] = "last"
    max_length: int | None = Field(None, ge=1, le=1_000_000)
    prompt_format: str = prompt_format_field()
    split: SplitFractions = Field(default_factory=SplitFractions, description="Each training set's stratified split.")
    seed: int = Field(0, ge=0, le=2**31 - 1)


class TransferRow(StoredReportPart):
    """A training unit: one dataset, or the union of all of them."""

    label: str
    dataset_ids: list[str]
    layer: int = Field(description="Chosen on the unit's validation split (highest AUROC).")
    n_train: int
    validation_auroc: dict[str, float | None] = Field(description="Validation AUROC of each layer's probe.")


class TransferColumn(StoredReportPart):
    """A test set and which of its rows were scored."""

    dataset_id: str
    label: str
    rows: Literal["all", "test"]
    n: int


class TransferCell(StoredReportPart):
    n: int
    metrics: dict[str, Estimate] = Field(description="Every report metric of the row's probe on the column's rows.")
    auroc_by_layer: dict[str, float | None] = Field(
        description="The AUROC each layer's probe gets there (no interval)."
    )


class TransferMatrix(StoredReportPart):
    rows: list[TransferRow]
    columns: list[TransferColumn]
    cells: list[list[TransferCell]] = Field(description="`cells[row][column]`.")


class TransferOut(BaseModel):
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
    token_position: Literal["last", "mean"]
    max_length: int | None
    prompt_format: str
    split: dict[str, Any]
    created_at: datetime
    finished_at: datetime | None
    matrix: TransferMatrix | None = Field(None, description="The matrix; null until the job succeeds.")

    @classmethod
    def of(cls, transfer: Transfer, status: str, matrix: dict[str, Any] | None) -> "TransferOut":
        fields = {name: getattr(transfer, name) for name in cls.model_fields if name not in {"status", "matrix"}}
        return cls(**fields, status=status, matrix=matrix)


class TransferAccepted(BaseModel):
    job: JobOut
    transfer: TransferOut


class TransferPage(BaseModel):
    items: list[TransferOut]
    next_cursor: str | None
