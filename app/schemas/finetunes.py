"""Fine-tunes: a LoRA adapter trained from a registered base model and dataset, then
registered as an adapter with its provenance (docs/concepts.md#fine-tunes)."""

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from app.schemas.common import DISPLAY_NAME_MAX, Request, prompt_format_field
from app.schemas.jobs import JobOut, JobStatus

Backend = Literal["local", "tinker"]
MAX_TARGET_MODULES = 64


class LoraSettings(Request):
    """The adapter being trained. Defaults follow Tinker's: rank 32, every linear layer of the
    blocks."""

    r: int = Field(32, ge=1, le=1024, description="LoRA rank.")
    lora_alpha: float = Field(
        32.0, gt=0, le=1e6, description="LoRA scaling numerator: the update is scaled by alpha / r."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path's input while training.")
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        max_length=MAX_TARGET_MODULES,
        description="Names of the blocks' linear layers to adapt (`q_proj`, `down_proj`, …; the last part of the "
        "module's name). Default: every linear layer of the blocks, as the model's check found them.",
    )


class TrainingSettings(Request):
    """How long and how the adapter is trained. `steps` and `epochs` exclude each other; with
    neither, one epoch. A step is one optimizer update over `batch_size ×
    gradient_accumulation_steps` examples."""

    learning_rate: float = Field(1e-4, gt=0, le=1.0, description="AdamW's learning rate at its peak.")
    lr_schedule: Literal["constant", "linear"] = Field(
        "linear", description="`linear`: decays to 0 at the last step after the warm-up; `constant`: stays."
    )
    warmup_steps: int = Field(0, ge=0, le=1_000_000, description="Steps over which the rate rises from 0.")
    weight_decay: float = Field(0.0, ge=0, le=1.0, description="AdamW's decoupled weight decay.")
    max_grad_norm: float | None = Field(
        1.0, gt=0, le=1e6, description="The gradient's norm is clipped to this before each update; null: no clipping."
    )
    steps: int | None = Field(None, ge=1, le=1_000_000, description="Optimizer steps; excludes `epochs`.")
    epochs: float | None = Field(
        None, gt=0, le=1_000, description="Passes over the training examples; excludes `steps`."
    )
    batch_size: int = Field(8, ge=1, le=4_096, description="Examples per forward and backward pass.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=1_024, description="Passes whose gradients are summed into one optimizer step."
    )
    max_length: int = Field(
        512, ge=2, le=131_072, description="Most tokens of one example; longer examples are left out and counted."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the LoRA initialisation, data order and dropout.")
    validation_fraction: float = Field(
        0.1, ge=0, le=0.5, description="Examples held out for the validation loss (0: none)."
    )
    validation_every: int = Field(50, ge=1, le=1_000_000, description="Steps between validation losses.")
    checkpoint_every: int = Field(
        50, ge=1, le=1_000_000, description="Steps between checkpoints a retried attempt resumes from."
    )

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "TrainingSettings":
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give `steps` or `epochs`, not both")
        return self


class FinetuneCreate(Request):
    base_model: str = Field(description="Id of the registered base model.")
    dataset: str = Field(description="Id of a registered dataset: statements, multiple choice or chat.")
    backend: Backend = Field(
        "local",
        description="`local`: PEFT on a worker's own device. `tinker`: the steps run on Tinker (TINKER_API_KEY), "
        "whose trainable models must include the base (matched by name); `lora.target_modules` may then be the "
        "attention projections, the MLP's, or both, `lora.dropout` must be 0, and the LoRA alpha is Tinker's own "
        "(the registered adapter records it). `training.checkpoint_every` saves Tinker training states.",
    )
    name: str = Field(min_length=1, max_length=DISPLAY_NAME_MAX, description="Name of the adapter it makes.")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    prompt_format: str | None = prompt_format_field(
        None,
        "How each example's prompt is written, as for probes (docs/concepts.md#prompt-formats); default `raw`, and "
        "`chat` for a chat dataset, which only `chat` can write.",
    )


class FinetuneOut(BaseModel):
    id: str
    job_id: str
    status: JobStatus
    name: str
    backend: Backend
    base_model_id: str
    dataset_id: str
    dataset_sha256: str
    prompt_format: str
    settings: dict[str, Any] = Field(
        description="Every setting the run used, defaults filled in: `lora` and `training`, with the resolved "
        "`target_modules` and `steps` once the worker has them."
    )
    adapter_id: str | None = Field(description="The adapter it registered; null until the job succeeds.")
    summary: dict[str, Any] | None = Field(
        description="Examples used and left out, final training loss, final and best validation loss, "
        "the step it resumed from; null until the job succeeds."
    )
    created_at: datetime
    finished_at: datetime | None


class FinetuneAccepted(BaseModel):
    job: JobOut
    finetune: FinetuneOut


class FinetunePage(BaseModel):
    items: list[FinetuneOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class LossPoint(BaseModel):
    step: int
    loss: float = Field(description="Mean cross-entropy over the step's completion tokens.")
    learning_rate: float
    tokens: int = Field(description="Completion tokens the step's loss covers.")
    validation_loss: float | None = Field(None, description="On the held-out examples, where it was computed.")


class LossHistory(BaseModel):
    finetune_id: str
    points: list[LossPoint]
