"""Every setting of the service, read from the environment (or a `.env` file).

Defaults are the embedded single-machine set-up: SQLite and artifacts under
`./var/`, and a Redis server that `confprobe serve` starts itself when
`REDIS_URL` is not set.
"""

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal, Self
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.storage.base import checked_prefix

BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


# A key's own rate limit, in requests a minute, at most (the registry keeps it as an integer).
MAX_RATE_LIMIT = 1_000_000


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", env_ignore_empty=True
    )  # `NAME=` leaves the default

    var_dir: Path = Field(
        Path("var"),
        description="Folder for the embedded defaults: SQLite file, artifacts, embedded Redis socket.",
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the registry; default sqlite:///<VAR_DIR>/registry.db. "
        "Use postgresql+psycopg://user@host/db for several machines.",
    )
    redis_url: str | None = Field(
        None,
        description="Redis URL of the job queue; unset: `serve` starts an embedded Redis "
        "listening on <VAR_DIR>/redis.sock.",
    )
    artifact_dir: Path | None = Field(
        None, description="Artifact store folder on this machine; default <VAR_DIR>/artifacts."
    )
    artifact_store: str | None = Field(
        None,
        description="Where artifacts live when workers run on several machines, as a URL (instead of ARTIFACT_DIR): "
        "`file:///mnt/shared/artifacts`, a folder every machine mounts (writes are synced for the other machines); "
        "`s3://bucket/prefix`, an S3-compatible bucket (credentials and region from the standard AWS_* variables).",
    )
    s3_endpoint_url: str | None = Field(
        None, description="Endpoint of an S3-compatible server (MinIO: `http://minio:9000`); unset: AWS S3."
    )
    artifact_cache_max_mb: int = Field(
        51200,
        ge=0,
        description="With an s3:// store, the most a machine keeps of its local copies of artifacts; the janitor evicts "
        "the least recently used beyond it (none used within JANITOR_GRACE_S). 0: no limit.",
    )
    artifact_cache_dir: Path | None = Field(
        None,
        description="Where a machine keeps its copies of artifacts read from an s3:// store, and uploads in progress; default <VAR_DIR>/cache/artifacts.",
    )
    hf_cache_dir: Path | None = Field(
        None,
        description="Hugging Face cache searched for model ids (default: the hub's own, HF_HUB_CACHE). Never downloaded into.",
    )
    queue_prefix: str = Field("confprobe", description="Prefix of every Redis key and queue the service uses.")

    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8000, description="Port the gateway listens on.")
    max_request_bytes: int = Field(1_048_576, description="Largest JSON request body accepted; larger ones get 413.")
    max_dataset_bytes: int = Field(64 * 2**20, description="Largest dataset upload accepted; larger ones get 413.")
    page_size_max: int = Field(200, description="Largest page a list endpoint returns.")

    worker_device: str = Field("cpu", description="Device a worker owns: `cpu` or `cuda:N`.")
    worker_name: str | None = Field(None, description="Worker name; default <hostname>.<pid>.")
    worker_memory_budget_mb: int | None = Field(
        None,
        ge=1,
        description="Memory a worker may fill with resident models before evicting the least recently used; a model "
        "that does not fit alone fails with `over_memory_budget`. Unset: 90% of the GPU's memory on cuda:N, half the machine's on cpu.",
    )
    worker_keep_freed_mb: int = Field(
        1024,
        ge=0,
        le=2047,
        description="Memory a worker's C allocator (glibc) keeps mapped after a batch frees it, for the next batch "
        "to reuse instead of faulting in fresh pages (requests up to 32 MiB come from its heap): on a CPU worker "
        "~500 page faults a text fewer. 0 leaves glibc's own thresholds.",
    )
    heartbeat_interval_s: float = Field(2.0, description="How often a worker writes its heartbeat.")
    heartbeat_ttl_s: float = Field(10.0, description="A worker whose heartbeat is older than this is gone.")
    job_timeout_s: int = Field(6 * 3600, description="A job running longer than this is stopped and failed.")
    job_max_attempts: int = Field(
        2,
        ge=1,
        description="Starts a job gets in all: a job whose worker dies is queued again until it has had this many, then failed.",
    )
    redis_retry_max_s: float = Field(
        10.0,
        gt=0,
        description="Longest pause between a worker's tries to reach Redis while it is away (the pauses start at 0.5 s and "
        "double up to this); a worker waits out any outage, runs its current job on, and never exits for it.",
    )
    serve_restart_limit: int = Field(
        5,
        ge=1,
        description="`confprobe serve` restarts a part (embedded Redis, worker, gateway) that exits by itself, with a growing "
        "pause; after this many exits of one part within SERVE_RESTART_WINDOW_S it gives up and stops everything.",
    )
    serve_restart_window_s: float = Field(
        60.0, gt=0, description="The window SERVE_RESTART_LIMIT counts a part's exits in."
    )
    janitor_interval_s: float = Field(
        3600,
        ge=0,
        description="How often (deployment-wide) a worker removes artifacts no registry row refers to; 0: never (run `confprobe janitor`).",
    )
    janitor_grace_s: float = Field(
        3600, ge=0, description="The janitor leaves alone objects younger than this (and than the oldest running job)."
    )
    storage_metrics_ttl_s: float = Field(
        300,
        ge=0,
        description="`GET /metrics` lists the artifact store for its storage figures at most this often (per gateway); "
        "scrapes in between get the last listing's figures.",
    )
    storage_metrics_max_objects: int = Field(
        20000,
        ge=1,
        description="The most objects one listing for the storage figures counts per top-level folder (on a bucket, "
        "a thousand a request); past it the folder's figures are lower bounds, and say so.",
    )
    affinity_max_backlog: int = Field(
        2,
        ge=1,
        description="A job for a model waits for a worker holding it resident only while fewer jobs are ahead of it there; "
        "otherwise it goes to the shared queue and another worker loads the model.",
    )

    max_inline_texts: int = Field(
        2000, description="Most texts one extraction request may carry inline; more → 413 (upload a dataset)."
    )
    extraction_token_budget: int = Field(
        16384,
        description="Tokens per forward batch, pads included (rows × row width); lower it for big models on small "
        "devices.",
    )
    extraction_max_batch_size: int = Field(256, description="Most texts in one forward batch.")
    extraction_cache: bool = Field(True, description="Keep every extracted vector and serve repeated texts from it.")
    extraction_compile: bool = Field(
        False,
        description="Run the transformer blocks of an extraction compiled by torch.compile (TorchInductor: on a CPU "
        "it needs a C++ compiler, g++ or clang): element-wise work fused around the matrix products; on SmolLM2 on a "
        "2-core CPU as fast as eager blocks once the worker keeps freed memory (97.3 against 96.9 texts/s). A "
        "worker's first batch of each architecture compiles first (10 s to 2 min); vectors equal the eager ones to "
        "float32 rounding (1e-4 relative).",
    )
    extraction_part_texts: int = Field(
        2000,
        ge=1,
        description="A dataset's hidden states with more texts to compute than this (an extraction's, a probe run's, "
        "a comparison's, an evaluation's, a transfer's) are split into `states_part` jobs (as many as parts of this "
        "many texts it takes, each about the same work), which every live worker takes from the shared queue (the "
        "content cache must be on).",
    )
    extraction_window_texts: int = Field(
        32768,
        ge=1,
        description="An extraction of a dataset reads, plans and writes its rows this many at a time, so a worker's "
        "memory does not grow with the dataset's size; batches are planned within a window.",
    )

    bootstrap_resamples: int = Field(1000, description="Bootstrap resamples behind every reported interval.")
    max_score_texts: int = Field(1000, description="Most texts one scoring request may carry.")
    tinker_api_key: str | None = Field(
        None, description="Key for the Tinker service (starts with `tml-`); needed for tinker:// imports."
    )
    tinker_base_url: str | None = Field(None, description="Tinker service address; default: the SDK's own.")
    model_roots: list[Path] = Field(
        default_factory=list,
        description="Folders local model sources must lie under (JSON list); empty: any local folder (the single-user default). "
        "Set it on a shared service, so a caller cannot read other folders' config.json. When set, the Hugging Face cache "
        "(HF_CACHE_DIR) must lie under one of them too, for models registered by id.",
    )
    adapter_roots: list[Path] = Field(
        default_factory=list,
        description="Folders local adapter imports may read from (JSON list); empty: local paths are refused.",
    )
    adapter_url_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts `https://` adapter imports may download from (JSON list); others → 403.",
    )
    max_adapter_bytes: int = Field(
        4 * 2**30, description="Largest adapter: archive, download, or files after extraction."
    )
    max_archive_files: int = Field(64, description="Most files an adapter archive may hold.")

    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level of every process.")
    log_format: Literal["json", "text"] = Field(
        "json",
        description="`json`: one JSON object per line with the job id (null outside a job); `text`: for reading in a terminal.",
    )

    # Authentication and rate limits (README, "Authentication"). Off by default: the
    # embedded single-user service needs no key.
    auth_enabled: bool = Field(
        False, description="Require an API key (`Authorization: Bearer <key>` or `X-API-Key`) on every /v1 route."
    )
    bootstrap_admin_key: SecretStr | None = Field(
        None,
        description="A key chosen by the operator (at least 32 characters) admitted with the admin scope, "
        "for deployments that cannot run `confprobe keys create` first. Never stored; compared in constant time.",
    )
    metrics_require_key: bool = Field(
        True,
        description="With AUTH_ENABLED, `GET /metrics` (job counts, queues, workers of the whole deployment) needs a key with the `read` "
        "scope, as /v1 does (Prometheus: `authorization: {credentials: <key>}` in the scrape config); false: it stays open.",
    )
    rate_limit_per_minute: int = Field(
        600,
        ge=0,
        description="Requests a key may make per minute, shared by every gateway process (Redis); 0: no limit.",
    )
    rate_limit_burst: int | None = Field(
        None, ge=1, description="Requests a key may make at once after a quiet spell; default: RATE_LIMIT_PER_MINUTE."
    )

    @field_validator("bootstrap_admin_key")
    @classmethod
    def _long_enough_to_be_secret(cls, key: SecretStr | None) -> SecretStr | None:
        if key is None or key.get_secret_value() == "":  # `BOOTSTRAP_ADMIN_KEY=`: none
            return None
        if len(key.get_secret_value()) < 32:
            raise ValueError(
                "must be at least 32 characters (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
        return key

    @field_validator("artifact_store")
    @classmethod
    def _artifact_store_url(cls, value: str | None) -> str | None:
        """Refuse at start-up what `open_store` could not open."""
        if value is None:
            return None
        url = urlsplit(value)
        if url.query or url.fragment:
            raise ValueError("takes no query or fragment")
        if url.scheme == "file":
            if url.netloc not in ("", "localhost") or not url.path.startswith("/"):
                raise ValueError("a file:// URL names an absolute folder on this machine: file:///mnt/shared/artifacts")
        elif url.scheme == "s3":
            if not BUCKET_NAME.fullmatch(url.netloc):
                raise ValueError(
                    f"{url.netloc!r} is not an S3 bucket name (3-63 lowercase letters, digits, dots, hyphens)"
                )
            try:
                checked_prefix(url.path.strip("/"))
            except ValueError:
                raise ValueError(f"the prefix {url.path!r} climbs out of the bucket") from None
        else:
            raise ValueError("must be a file:// or s3:// URL")
        return value

    @model_validator(mode="after")
    def _one_artifact_location(self) -> Self:
        if self.artifact_dir is not None and self.artifact_store is not None:
            raise ValueError("set ARTIFACT_STORE or ARTIFACT_DIR, not both")
        return self

    @model_validator(mode="after")
    def _heartbeats_outlast_their_interval(self) -> Self:
        # a heartbeat that expires before the next one is written makes a live worker look
        # dead between beats, and its jobs would be taken from it
        if self.heartbeat_ttl_s < 2 * self.heartbeat_interval_s:
            raise ValueError(
                f"HEARTBEAT_TTL_S ({self.heartbeat_ttl_s:g}) must be at least twice HEARTBEAT_INTERVAL_S ({self.heartbeat_interval_s:g})"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.var_dir / 'registry.db').resolve()}"

    @property
    def resolved_artifact_dir(self) -> Path:
        """The folder of a local or shared (`file://`) store."""
        if self.artifact_store and self.artifact_store.startswith("file:"):
            return Path(unquote(urlsplit(self.artifact_store).path))
        return (self.artifact_dir or self.var_dir / "artifacts").resolve()

    @property
    def resolved_artifact_cache_dir(self) -> Path:
        return (self.artifact_cache_dir or self.var_dir / "cache" / "artifacts").resolve()

    @property
    def resolved_gguf_cache_dir(self) -> Path:
        """Where a worker keeps the dequantized copies of GGUF models (`workers/gguf_models.py`)."""
        return (self.var_dir / "cache" / "gguf").resolve()

    @property
    def embedded_redis_socket(self) -> Path:
        return (self.var_dir / "redis.sock").resolve()

    @property
    def resolved_redis_url(self) -> str:
        if self.redis_url:
            return self.redis_url
        return f"unix://{self.embedded_redis_socket}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
