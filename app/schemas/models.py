"""Base models: registration and what the registry says of one."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from app.inputs.model_sources import Revision
from app.registry.tables import Model
from app.schemas.common import DISPLAY_NAME_MAX, Dtype, Quantization, Request


class ModelCreate(Request):
    name: str = Field(min_length=1, max_length=DISPLAY_NAME_MAX, description="Display name.")
    source: str = Field(
        min_length=1,
        max_length=1000,
        description="A local folder with config.json and weights; a local GGUF file (llama.cpp's single-file "
        "format, e.g. `/models/SmolLM2-135M-Instruct.Q4_1.gguf`: architecture, layers and hidden size come from "
        "its header, the fingerprint is its sha256, and workers dequantize it into `dtype`); or a Hugging Face id "
        "already in the local cache.",
    )
    revision: Revision | None = Field(
        None, description="Hugging Face revision: a 40-hex commit hash, or a branch or tag name in the local cache."
    )
    dtype: Dtype = Field("float32", description="Weights' dtype on the worker.")
    quantization: Quantization | None = Field(None, description="bitsandbytes quantization of the linear layers.")


class ModelOut(BaseModel):
    id: str
    name: str
    source: str
    source_kind: Literal["local", "gguf", "hf_cache"] = Field(
        description="`local` (a folder), `gguf` (a GGUF file) or `hf_cache` (a Hugging Face id in the local cache)."
    )
    resolved_path: str
    revision: str | None
    dtype: Dtype
    quantization: Quantization | None
    fingerprint: str = Field(
        description="Identifies the weights: the snapshot commit, a hash of a local folder's config and weight files, "
        "or a GGUF file's sha256."
    )
    architecture: str = Field(
        description="The config's first architecture (`LlamaForCausalLM`), or a GGUF file's `general.architecture` (`llama`)."
    )
    model_type: str
    num_layers: int
    hidden_size: int
    status: Literal["pending", "ready", "failed"]
    status_reason: str | None
    parameter_count: int | None
    memory_footprint_bytes: int | None
    has_chat_template: bool | None = Field(
        description="Whether the tokenizer has a chat template (`prompt_format: chat` needs one); null until known."
    )
    linear_modules: list[str] | None = Field(
        None,
        description="The linear layers inside the blocks, by the last part of their names: what a fine-tune's "
        "LoRA may target (all of them by default); null until the model's check has run.",
    )
    check_job_id: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, model: Model) -> "ModelOut":
        return cls.model_validate(model, from_attributes=True)


class ModelPage(BaseModel):
    items: list[ModelOut]
    next_cursor: str | None
