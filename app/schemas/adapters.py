"""LoRA adapters: imports, records, and the base models Tinker offers."""

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field

from app.inputs.documents import within_depth_limit
from app.registry.tables import Adapter
from app.schemas.common import Request


class AdapterImport(Request):
    source: str = Field(
        min_length=1,
        max_length=2000,
        description="`tinker://<run>/external_weights/<name>`, a PEFT folder or archive under ADAPTER_ROOTS, "
        "or an `https://` URL on ADAPTER_URL_HOSTS.",
    )
    base_model: str = Field(description="Id of the registered base model the adapter was trained on.")
    name: str = Field(min_length=1, max_length=200)
    metadata: Annotated[dict[str, Any], AfterValidator(within_depth_limit)] = Field(
        default_factory=dict, description="Training metadata to keep with it (dataset, run, notes…)."
    )


class AdapterOut(BaseModel):
    id: str
    name: str
    base_model_id: str
    r: int
    lora_alpha: float
    target_modules: list[str]
    sha256: str = Field(description="sha256 of the converted adapter_model.safetensors.")
    identity: str = Field(
        description="sha256 over the weights' sha256 and the config values that change the adapter's output (r, lora_alpha, "
        "target_modules, use_rslora, bias, fan_in_fan_out); one adapter per identity and base model."
    )
    size_bytes: int
    source_kind: Literal["tinker", "local_folder", "local_archive", "url", "upload", "finetune"] = Field(
        description="Where it came from: an import's source kind, or `finetune` for one a fine-tune of the service trained "
        "(`source` is then the fine-tune's id)."
    )
    source: str
    tinker_path: str | None
    tinker_run_id: str | None
    conversion: dict[str, Any] = Field(description="What the import changed to make a PEFT adapter.")
    training: dict[str, Any] = Field(
        description="Training metadata: the user's, what Tinker reports, or a fine-tune's provenance (`finetune`: its id, "
        "backend, base, dataset sha256, every setting, the losses)."
    )
    import_job_id: str | None
    created_at: datetime

    @classmethod
    def of(cls, adapter: Adapter) -> "AdapterOut":
        return cls.model_validate(adapter, from_attributes=True)


class AdapterPage(BaseModel):
    items: list[AdapterOut]
    next_cursor: str | None


class TinkerModel(BaseModel):
    model_name: str | None
    max_context_length: int | None = None
    trainable: bool | None = None
    sampleable: bool | None = None


class TinkerModels(BaseModel):
    models: list[TinkerModel]
