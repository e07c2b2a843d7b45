"""Experiment configs (the seed framework's format, run as one job) and their records."""

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.inputs.model_sources import Revision
from app.schemas.common import Dtype, Quantization, Request, prompt_format_field
from app.schemas.finetunes import Backend, LoraSettings, TrainingSettings
from app.schemas.jobs import JobOut, JobStatus
from app.schemas.probes import ProbeMethod, Recalibration


class ExperimentMeta(Request):
    name: str = Field(min_length=1, max_length=200)
    seed: int = Field(0, ge=0, le=2**31 - 1)


class ExperimentModel(Request):
    name: str = Field(
        min_length=1, max_length=1000, description="Hugging Face id in the local cache, a local folder, or a GGUF file."
    )
    revision: Revision | None = None
    dtype: Dtype = "float32"
    quantization: Quantization | None = None
    tinker_lora_path: str | None = Field(
        None, description="A PEFT adapter folder (under ADAPTER_ROOTS) to use when Tinker is not enabled."
    )


class ExperimentTinker(Request):
    enabled: bool = False
    checkpoint_path: str | None = Field(None, description="`tinker://<run>/external_weights/<name>`.")
    download_weights: bool = Field(True, description="Accepted for compatibility: weights are always downloaded.")
    output_dir: str | None = Field(None, description="Accepted for compatibility: adapters go to the artifact store.")


class ExperimentExtraction(Request):
    layers: list[int] = Field(min_length=1, max_length=128)
    token_position: Literal["last", "mean"] = "last"
    max_length: int | None = Field(None, ge=1, le=1_000_000)
    prompt_format: str = prompt_format_field()
    cache_dir: str | None = Field(
        None, description="Accepted for compatibility: the service keeps its own content cache."
    )


class ExperimentProbe(Request):
    dataset: str = Field(description="Id of an uploaded dataset, or a JSONL/CSV file under ADAPTER_ROOTS.")
    method: ProbeMethod | list[ProbeMethod] = "logistic"
    recalibration: Recalibration | None = None


class ExperimentFinetune(Request):
    """Fine-tune the model first (docs/concepts.md#fine-tunes) and probe the adapter it makes:
    the seed's "fine-tune, then probe" as one config. Excludes an imported adapter."""

    dataset: str = Field(description="Id of a registered dataset to fine-tune on (statements, multiple choice, chat).")
    name: str | None = Field(
        None, min_length=1, max_length=200, description="The adapter's name; default: the experiment's."
    )
    backend: Backend = Field("local", description="`local` (a worker's own device) or `tinker`.")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    prompt_format: str | None = prompt_format_field(
        None, "How each example's prompt is written; default `raw`, `chat` for chat data."
    )


class ExperimentConfig(Request):
    """The experiment config format of the seed framework (docs/concepts.md#experiment-configs)."""

    experiment: ExperimentMeta
    model: ExperimentModel
    tinker: ExperimentTinker = Field(default_factory=ExperimentTinker)
    finetune: ExperimentFinetune | None = Field(
        None,
        description="Fine-tune the model first and probe the adapter; excludes `tinker` and `model.tinker_lora_path`.",
    )
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
