"""Registry tables. Times are stored and returned in UTC, timezone-aware on every backend."""

import secrets
import time
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def new_id(prefix: str) -> str:
    """An opaque id that sorts by creation time: prefix, 12 hex digits of milliseconds, 10 random."""
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(5)}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """SQLite drops time zones; this gives every value back as aware UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to the registry")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime, dict[str, Any]: JSON}


class Model(Base):
    """A registered base model. Its identity is (source, revision, dtype, quantization)."""

    __tablename__ = "models"
    __table_args__ = (
        UniqueConstraint("source", "revision_key", "dtype", "quantization_key", name="uq_models_identity"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(1000))
    source_kind: Mapped[str] = mapped_column(String(20))
    resolved_path: Mapped[str] = mapped_column(String(2000))
    revision: Mapped[str | None] = mapped_column(String(200))
    revision_key: Mapped[str] = mapped_column(String(200), default="")
    dtype: Mapped[str] = mapped_column(String(20))
    quantization: Mapped[str | None] = mapped_column(String(10))
    quantization_key: Mapped[str] = mapped_column(String(10), default="")
    fingerprint: Mapped[str] = mapped_column(String(64), default="")
    architecture: Mapped[str] = mapped_column(String(200))
    model_type: Mapped[str] = mapped_column(String(100))
    num_layers: Mapped[int] = mapped_column(Integer)
    hidden_size: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    status_reason: Mapped[str | None] = mapped_column(Text)
    parameter_count: Mapped[int | None] = mapped_column(BigInteger)
    memory_footprint_bytes: Mapped[int | None] = mapped_column(BigInteger)
    has_chat_template: Mapped[bool | None] = mapped_column(Boolean)
    # the last part of the name of every linear layer inside the blocks, as the check found them
    linear_modules: Mapped[list[str] | None] = mapped_column(JSON)
    check_job_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Job(Base):
    """Anything that runs on a worker. The row, not Redis, is the truth about its state."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(40), index=True)
    status: Mapped[str] = mapped_column(String(20), index=True, default="queued")
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    progress_stage: Mapped[str | None] = mapped_column(String(100))
    progress_done: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int | None] = mapped_column(Integer)
    progress_details: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    queue: Mapped[str] = mapped_column(String(200))
    worker: Mapped[str | None] = mapped_column(String(200))
    model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"), index=True)
    # a part of a job spread over workers (`extraction_part`) names the job it is part of
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()


class Dataset(Base):
    """An uploaded dataset, stored normalised as JSONL in the artifact store. Its identity
    is the sha256 of that normalised content, so the same rows uploaded as CSV or JSONL,
    or twice, are one dataset."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(20))
    source_format: Mapped[str] = mapped_column(String(10))
    rows: Mapped[int] = mapped_column(Integer)
    label_balance: Mapped[dict[str, Any]] = mapped_column()
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    upload_sha256: Mapped[str] = mapped_column(String(64))
    artifact: Mapped[str] = mapped_column(String(500))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Extraction(Base):
    """Hidden states of some texts at some layers; the array lives in the artifact store."""

    __tablename__ = "extractions"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    adapter_id: Mapped[str | None] = mapped_column(String(40))
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"), index=True)
    text_count: Mapped[int] = mapped_column(Integer)
    layers: Mapped[list[int]] = mapped_column(JSON)
    token_position: Mapped[str] = mapped_column(String(10))
    prompt_format: Mapped[str] = mapped_column(Text, default="raw", server_default="raw")
    max_length: Mapped[int | None] = mapped_column(Integer)
    artifact: Mapped[str | None] = mapped_column(String(500))
    shape: Mapped[list[int] | None] = mapped_column(JSON)
    dtype: Mapped[str | None] = mapped_column(String(20))
    truncated_count: Mapped[int | None] = mapped_column(Integer)
    cache_hits: Mapped[int | None] = mapped_column(Integer)
    model_fingerprint: Mapped[str] = mapped_column(String(64))
    adapter_fingerprint: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()


class CacheShard(Base):
    """One shard of the hidden-state cache: the safetensors file at `path` holds tensor
    `hidden_states`, float32, shaped (`rows`, len(`layers`), hidden) — row r of it is the text
    its `CachedText` gives row r, slot s is layer `layers[s]`. Every vector in it is of cache
    `space`, the hash of everything a vector depends on besides its text and layer (model,
    adapter, quantization, dtype, token position, max_length, prompt format). A slot whose
    layer the registry never learned (`null`, only in shards indexed before this table) is
    never read."""

    __tablename__ = "cache_shards"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    space: Mapped[str] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(String(500), unique=True)
    layers: Mapped[list[int | None]] = mapped_column(JSON)
    rows: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CachedText(Base):
    """A text in a cache shard: its vectors at every layer of the shard are row `row` of it.
    One row per text per shard, whatever the number of layers; keyed by the text's sha256
    first, so "these texts, in this space's shards" is one index range per text."""

    __tablename__ = "cached_texts"

    text_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    shard_id: Mapped[int] = mapped_column(
        ForeignKey("cache_shards.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    row: Mapped[int] = mapped_column(Integer)
    truncated: Mapped[bool] = mapped_column(Boolean, default=False)


class CacheSpace(Base):
    """Which model a cache space holds hidden states of, recorded before the space's first
    entry is written: a space is a hash (`workers/state_cache.py` `cache_space`), so the
    spaces of a model cannot be worked out from its row alone, and deleting the model
    deletes them by this record."""

    __tablename__ = "cache_spaces"

    space: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Adapter(Base):
    """An imported LoRA adapter, converted to PEFT and checked against its base model.
    A row exists only once its files are in the artifact store."""

    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("base_model_id", "identity", name="uq_adapters_base_identity"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    base_model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    source_kind: Mapped[str] = mapped_column(String(20))
    source: Mapped[str] = mapped_column(String(2000))
    tinker_path: Mapped[str | None] = mapped_column(String(1000))
    tinker_run_id: Mapped[str | None] = mapped_column(String(300))
    r: Mapped[int] = mapped_column(Integer)
    lora_alpha: Mapped[float] = mapped_column()
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    sha256: Mapped[str] = mapped_column(String(64))
    # the weights' sha256 and the config values that change the output (app.registry.adapters.adapter_identity)
    identity: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    artifact: Mapped[str] = mapped_column(String(500))
    conversion: Mapped[dict[str, Any]] = mapped_column(default=dict)
    training: Mapped[dict[str, Any]] = mapped_column(default=dict)
    import_job_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ProbeRun(Base):
    """One training request: probes for some layers and methods on one dataset, with the
    labels, split and baseline they share."""

    __tablename__ = "probe_runs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    adapter_id: Mapped[str | None] = mapped_column(String(40), index=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    layers: Mapped[list[int]] = mapped_column(JSON)
    methods: Mapped[list[str]] = mapped_column(JSON)
    token_position: Mapped[str] = mapped_column(String(10))
    prompt_format: Mapped[str] = mapped_column(Text, default="raw", server_default="raw")
    max_length: Mapped[int | None] = mapped_column(Integer)
    split: Mapped[dict[str, Any]] = mapped_column()
    recalibration: Mapped[str | None] = mapped_column(String(20))
    artifact: Mapped[str | None] = mapped_column(String(500))
    best_probe_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()


class Probe(Base):
    """A trained probe for one layer and method; its weights, held-out predictions and
    calibration report live under `artifact` (a folder)."""

    __tablename__ = "probes"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("probe_runs.id"), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    adapter_id: Mapped[str | None] = mapped_column(String(40), index=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    layer: Mapped[int] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(String(20))
    token_position: Mapped[str] = mapped_column(String(10))
    prompt_format: Mapped[str] = mapped_column(Text, default="raw", server_default="raw")
    max_length: Mapped[int | None] = mapped_column(Integer)
    recalibration: Mapped[str | None] = mapped_column(String(20))
    is_best: Mapped[bool] = mapped_column(Boolean, default=False)
    artifact: Mapped[str] = mapped_column(String(500))
    validation: Mapped[dict[str, Any]] = mapped_column()
    metrics: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ProbeEvaluation(Base):
    """A trained probe scored on another labelled dataset (or another variant of its model):
    labels, states and report are the evaluated model's. `rows` says which rows were scored:
    `all`, or `test` when the dataset is the probe's own under the same model, adapter and
    prompt format (its training rows would flatter it). The folder `artifact` holds the
    report and the predictions."""

    __tablename__ = "probe_evaluations"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    probe_id: Mapped[str] = mapped_column(ForeignKey("probes.id"), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    adapter_id: Mapped[str | None] = mapped_column(String(40))
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    prompt_format: Mapped[str] = mapped_column(Text)
    rows: Mapped[str] = mapped_column(String(10))
    n: Mapped[int | None] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    artifact: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()


class Transfer(Base):
    """A transfer matrix: probes trained on each dataset of `train_dataset_ids` (or on their
    union) scored on each of `test_dataset_ids`, one model variant, the same layers, method
    and split. `artifact` is the folder of its report once the job succeeds."""

    __tablename__ = "transfers"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    adapter_id: Mapped[str | None] = mapped_column(String(40))
    train_dataset_ids: Mapped[list[str]] = mapped_column(JSON)
    test_dataset_ids: Mapped[list[str]] = mapped_column(JSON)
    union_train: Mapped[bool] = mapped_column(Boolean, default=False)
    layers: Mapped[list[int]] = mapped_column(JSON)
    method: Mapped[str] = mapped_column(String(20))
    token_position: Mapped[str] = mapped_column(String(10))
    max_length: Mapped[int | None] = mapped_column(Integer)
    prompt_format: Mapped[str] = mapped_column(Text)
    split: Mapped[dict[str, Any]] = mapped_column()
    artifact: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()


class Comparison(Base):
    """Base and adapters side by side on the same texts and layers."""

    __tablename__ = "comparisons"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    adapter_ids: Mapped[list[str]] = mapped_column(JSON)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    layers: Mapped[list[int]] = mapped_column(JSON)
    method: Mapped[str] = mapped_column(String(20))
    token_position: Mapped[str] = mapped_column(String(10))
    prompt_format: Mapped[str] = mapped_column(Text, default="raw", server_default="raw")
    artifact: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()


class Finetune(Base):
    """A LoRA adapter trained from a base model and a dataset. Its folder `artifact` holds the
    loss history and, while it runs, checkpoints; `adapter_id` is set once the adapter it
    made is registered."""

    __tablename__ = "finetunes"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(String(200))
    backend: Mapped[str] = mapped_column(String(20))
    base_model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    dataset_sha256: Mapped[str] = mapped_column(String(64))
    prompt_format: Mapped[str] = mapped_column(Text, default="raw")
    settings: Mapped[dict[str, Any]] = mapped_column()
    artifact: Mapped[str] = mapped_column(String(500))
    adapter_id: Mapped[str | None] = mapped_column(String(40))
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()


class Experiment(Base):
    """A whole experiment config run as one job; links to everything it made or reused."""

    __tablename__ = "experiments"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(String(200))
    config: Mapped[dict[str, Any]] = mapped_column()
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    adapter_id: Mapped[str | None] = mapped_column(String(40))
    dataset_id: Mapped[str | None] = mapped_column(String(40))
    extraction_id: Mapped[str | None] = mapped_column(String(40))
    probe_run_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()


class ApiKey(Base):
    """An API key. Only a SHA-256 of the key is kept; `prefix` is its public part (random,
    not secret), shown in lists and used to find the row. Revoked keys stay, for the record."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(20), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[str]] = mapped_column(JSON)
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer)
    rate_limit_burst: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()
