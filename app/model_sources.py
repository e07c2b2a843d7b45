"""Where a model's files are, and what its `config.json` says — read as plain JSON, so the
gateway learns a model's shape without torch or transformers."""

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import ServiceError, invalid_field

HF_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$", re.ASCII)

# Config keys that name the same thing across architectures (Llama/BERT, GPT-2, T5-style).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model")


@dataclass(frozen=True)
class ModelShape:
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int


@dataclass(frozen=True)
class ResolvedSource:
    kind: str  # "local" or "hf_cache"
    identity: str  # what makes two registrations the same source
    path: Path


def _looks_like_path(source: str) -> bool:
    try:
        return source.startswith(("/", "./", "../", "~")) or Path(source).expanduser().exists()
    except (OSError, ValueError):  # a name too long, or with a NUL, for this filesystem
        return False


def resolve_source(source: str, revision: str | None, hf_cache_dir: Path | None = None, model_roots: list[Path] | None = None) -> ResolvedSource:
    """A local folder, or a Hugging Face id that is already in the local cache. Nothing is
    downloaded: a model not on this machine is a 404 naming `source`. With `model_roots`,
    a local folder must lie under one of them (after resolving links), else 403 — checked
    before existence, so callers cannot map the filesystem."""
    if _looks_like_path(source):
        try:
            path = Path(source).expanduser().resolve()
            roots = [root.expanduser().resolve() for root in model_roots or []]
            if roots and not any(path.is_relative_to(root) for root in roots):
                raise ServiceError(403, "forbidden", f"source: {str(path)!r} is outside the folders models may be registered from (MODEL_ROOTS)", field="source")
            exists = path.exists()
        except (OSError, ValueError) as exc:
            raise invalid_field("source", f"not a usable path: {exc}") from exc
        if not exists:
            raise ServiceError(404, "not_found", f"source: no such folder {str(path)!r}", field="source")
        if not path.is_dir():
            raise invalid_field("source", f"{str(path)!r} is not a folder")
        if revision is not None:
            raise invalid_field("revision", "a local folder has no revisions; leave revision out")
        return ResolvedSource(kind="local", identity=str(path), path=path)
    if not HF_REPO_ID.match(source):
        raise invalid_field("source", "neither an existing local folder nor a Hugging Face id like 'org/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(source, revision=revision, cache_dir=hf_cache_dir, local_files_only=True)
    except HFValidationError as exc:
        raise invalid_field("source", f"not a valid Hugging Face id: {exc}") from exc
    except LocalEntryNotFoundError as exc:
        raise ServiceError(
            404,
            "not_found",
            f"source: {source!r} (revision {revision or 'main'}) is not in the local Hugging Face cache; "
            "the service never downloads models — put it in the cache or pass a local folder",
            field="source",
        ) from exc
    return ResolvedSource(kind="hf_cache", identity=source, path=Path(folder))


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def fingerprint(source: ResolvedSource) -> str:
    """What identifies the model's weights in cache keys. A Hugging Face snapshot is named
    by its commit, which pins every file; a local folder is hashed from its config bytes and
    each weight file's name, size and modification time (hashing gigabytes of weights on
    every registration would cost minutes)."""
    digest = hashlib.sha256()
    if source.kind == "hf_cache":
        digest.update(f"hf:{source.identity}@{source.path.name}".encode())
        return digest.hexdigest()
    digest.update(b"local:" + (source.path / "config.json").read_bytes())
    for weights in sorted(p for p in source.path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _first_int(config: dict[str, Any], keys: tuple[str, ...], name: str) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise invalid_field("source", f"config.json has no {name} (looked for {', '.join(keys)})", config_keys=list(keys))


def read_model_shape(folder: Path) -> ModelShape:
    """Architecture, layer count and hidden size from `config.json`. A config that needs
    remote code (`auto_map`) is refused: the service never runs `trust_remote_code`."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise invalid_field("source", f"{str(folder)!r} has no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid_field("source", f"config.json is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise invalid_field("source", "config.json is not a JSON object")
    if config.get("auto_map") or config.get("trust_remote_code"):
        raise invalid_field(
            "source",
            "the model needs trust_remote_code (its config.json has auto_map), which this service never enables",
        )
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise invalid_field("source", "config.json has no model_type")
    architectures = config.get("architectures")
    architecture = architectures[0] if isinstance(architectures, list) and architectures and isinstance(architectures[0], str) else model_type
    return ModelShape(
        architecture=architecture,
        model_type=model_type,
        num_layers=_first_int(config, LAYER_COUNT_KEYS, "layer count"),
        hidden_size=_first_int(config, HIDDEN_SIZE_KEYS, "hidden size"),
    )
