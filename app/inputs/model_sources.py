"""Where a model's files are, and what its `config.json` says — read as plain JSON (checked
by `app/inputs/model_configs.py`) — or its GGUF file's header (read by `app/inputs/gguf.py`),
so the gateway learns a model's shape without torch or transformers.

Every path here comes from a request, so nothing is trusted: a Hugging Face revision is a
checked ref name or commit hash and is resolved here, inside the cache, never handed to
huggingface_hub as a path; files are read only when regular and within a bound
(`app.inputs.user_files`); and a config's sizes are bounded, so a worker never tries to build an
absurd model.
"""

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from app.errors import ServiceError, invalid_field
from app.inputs.gguf import GgufModelInfo, InvalidGguf, file_sha256, read_model_info
from app.inputs.gguf_architectures import TRANSFORMERS_GGUF_ARCHITECTURES, transformers_model_type
from app.inputs.model_configs import (
    HIDDEN_SIZE_KEYS,
    LAYER_COUNT_KEYS,
    UnreasonableConfig,
    check_config_sizes,
    parse_config,
)
from app.inputs.user_files import (
    METADATA_MAX_BYTES,
    FileTooLarge,
    NotARegularFile,
    read_regular_file,
)

HF_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$", re.ASCII)

# --- Revisions -------------------------------------------------------------------------

# The registry's column width for a revision.
REVISION_MAX_LENGTH = 200
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
# A branch or tag name, roughly as `git check-ref-format` allows: components of
# [A-Za-z0-9._-] joined by single slashes, none starting with a dot. Published in the API
# schema; `check_revision` adds what a regular expression without look-arounds cannot say.
REVISION_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$"
# A `refs/<revision>` file holds one 40-hex commit hash (and perhaps a newline).
REF_MAX_BYTES = 256


def check_revision(value: Any) -> Any:
    """A revision names a ref inside the cache's `refs/` folder, so it must never be able to
    name anything else: no absolute path, no `..`, no empty or hidden component. Anything
    not a string is left to the field's type to refuse."""
    if not isinstance(value, str):
        return value
    if not 1 <= len(value) <= REVISION_MAX_LENGTH:
        raise ValueError(f"a revision is 1 to {REVISION_MAX_LENGTH} characters")
    if not re.fullmatch(REVISION_PATTERN, value, re.ASCII):
        raise ValueError(
            "a revision is a 40-hex commit hash or a branch or tag name: letters, digits, '.', '_', '-' "
            "and single '/' between parts, not starting or ending with '/', no part starting with '.'"
        )
    if ".." in value or any(part.endswith((".", ".lock")) for part in value.split("/")):
        raise ValueError("a revision holds no '..' and no part ending in '.' or '.lock'")
    return value


Revision = Annotated[
    str,
    BeforeValidator(check_revision),
    Field(
        min_length=1,
        max_length=REVISION_MAX_LENGTH,
        pattern=REVISION_PATTERN,
        description="Hugging Face revision: a 40-hex commit hash, or a branch or tag name in the local cache's refs/.",
    ),
]

# --- Sources ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    has_chat_template: bool | None = None  # None: not known from the files


@dataclass(frozen=True)
class ResolvedSource:
    kind: str  # "local" (a folder), "gguf" (a GGUF file) or "hf_cache"
    identity: str  # what makes two registrations the same source
    path: Path


def _looks_like_path(source: str) -> bool:
    try:
        return source.startswith(("/", "./", "../", "~")) or Path(source).expanduser().exists()
    except (OSError, ValueError):  # a name too long, or with a NUL, for this filesystem
        return False


def _outside_roots(path: Path, model_roots: list[Path] | None) -> bool:
    roots = [root.expanduser().resolve() for root in model_roots or []]
    return bool(roots) and not any(path.is_relative_to(root) for root in roots)


def _local_path(source: str, revision: str | None, model_roots: list[Path] | None) -> ResolvedSource:
    """A local folder, or a GGUF file, judged by where its links lead; messages name it as
    the caller did, never where its links lead or the gateway's working directory."""
    try:
        path = Path(source).expanduser().resolve()
        if _outside_roots(path, model_roots):
            raise ServiceError(
                403,
                "forbidden",
                f"source: {source!r} is outside the folders models may be registered from (MODEL_ROOTS)",
                field="source",
            )
        exists = path.exists()
        is_dir = path.is_dir()
        is_file = path.is_file()
    except (OSError, ValueError, RuntimeError) as exc:
        raise invalid_field("source", f"{source!r} is not a usable path") from exc
    if not exists:
        raise ServiceError(404, "not_found", f"source: no such folder {source!r}", field="source")
    if not (is_dir or is_file):
        raise invalid_field("source", f"{source!r} is not a folder or a GGUF file")
    if revision is not None:
        raise invalid_field("revision", "a local folder has no revisions; leave revision out")
    return ResolvedSource(kind="local" if is_dir else "gguf", identity=str(path), path=path)


def _hf_cache_root(hf_cache_dir: Path | None) -> Path:
    if hf_cache_dir is not None:
        return hf_cache_dir
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _not_cached(source: str, revision: str) -> ServiceError:
    return ServiceError(
        404,
        "not_found",
        f"source: {source!r} (revision {revision}) is not in the local Hugging Face cache; "
        "the service never downloads models — put it in the cache or pass a local folder",
        field="source",
    )


def _commit_of(ref: Path, source: str, revision: str) -> str:
    """The commit hash a `refs/` file holds, read only when it is a small regular file. A
    missing ref and a folder in its place (a ref named like a prefix of others) answer alike."""
    try:
        text = read_regular_file(ref, REF_MAX_BYTES).decode("ascii").strip()
    except (FileNotFoundError, NotADirectoryError):
        raise _not_cached(source, revision) from None
    except NotARegularFile as exc:
        if exc.kind == "directory":
            raise _not_cached(source, revision) from None
        raise invalid_field(
            "revision", f"the local cache's ref for {revision!r} is a {exc.kind}, not a file holding a commit hash"
        ) from None
    except (FileTooLarge, UnicodeDecodeError):
        text = ""
    except OSError as exc:
        raise invalid_field(
            "revision", f"the local cache's ref for {revision!r} cannot be read ({exc.strerror})"
        ) from None
    if not COMMIT_HASH.fullmatch(text):
        raise invalid_field("revision", f"the local cache's ref for {revision!r} does not hold a commit hash")
    return text


def _hf_snapshot(
    source: str, revision: str | None, hf_cache_dir: Path | None, model_roots: list[Path] | None
) -> ResolvedSource:
    """The snapshot folder of a Hugging Face id in the local cache, found by hand in the
    layout huggingface_hub writes (`models--org--name/{refs/<revision>, snapshots/<commit>/}`)
    so that nothing but a checked name is ever joined to a path. The snapshot, links
    resolved, must lie in that repository's `snapshots/`; with MODEL_ROOTS set, the cache
    and the snapshot must both lie under them."""
    wanted = check_revision(revision) if revision is not None else "main"
    outside_roots = ServiceError(
        403,
        "forbidden",
        f"source: the cached snapshot of {source!r} is outside the folders models may be registered from (MODEL_ROOTS)",
        field="source",
    )
    try:
        cache = _hf_cache_root(hf_cache_dir).expanduser().resolve()
        if _outside_roots(
            cache, model_roots
        ):  # before anything is looked up, so the answer says nothing of what is cached
            raise outside_roots
        repository = cache / f"models--{source.replace('/', '--')}"
        commit = wanted if COMMIT_HASH.fullmatch(wanted) else _commit_of(repository / "refs" / wanted, source, wanted)
        snapshot = (repository / "snapshots" / commit).resolve()
        is_dir = snapshot.is_dir()
    except (OSError, RuntimeError):  # a link loop, or a path this filesystem refuses
        raise _not_cached(source, wanted) from None
    if not is_dir:
        raise _not_cached(source, wanted)
    if not snapshot.is_relative_to(repository / "snapshots"):
        raise ServiceError(
            403,
            "forbidden",
            f"source: the cached snapshot of {source!r} (revision {wanted}) lies outside the Hugging Face cache",
            field="source",
        )
    if _outside_roots(snapshot, model_roots):
        raise outside_roots
    return ResolvedSource(kind="hf_cache", identity=source, path=snapshot)


def resolve_source(
    source: str, revision: str | None, hf_cache_dir: Path | None = None, model_roots: list[Path] | None = None
) -> ResolvedSource:
    """A local folder, a local GGUF file, or a Hugging Face id that is already in the local cache. Nothing is
    downloaded: a model not on this machine is a 404 naming `source`. With `model_roots`,
    the folder must lie under one of them (after resolving links), else 403 — checked
    before existence, so callers cannot map the filesystem."""
    if _looks_like_path(source):
        return _local_path(source, revision, model_roots)
    if not HF_REPO_ID.match(source) or "--" in source or ".." in source:
        raise invalid_field("source", "neither an existing local folder nor a Hugging Face id like 'org/name'")
    try:
        return _hf_snapshot(source, revision, hf_cache_dir, model_roots)
    except ValueError as exc:  # a revision that did not come through the request schema
        raise invalid_field("revision", str(exc)) from exc


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def read_config_bytes(folder: Path) -> bytes:
    """The bytes of the folder's `config.json`, read only when it is a regular file of at
    most METADATA_MAX_BYTES; else a 422 naming `source` (never where the folder is)."""
    try:
        return read_regular_file(folder / "config.json", METADATA_MAX_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        raise invalid_field("source", "the model folder has no config.json") from None
    except NotARegularFile as exc:
        raise invalid_field("source", f"the model folder's config.json is a {exc.kind}, not a regular file") from None
    except FileTooLarge:
        raise invalid_field(
            "source", f"the model folder's config.json is larger than {METADATA_MAX_BYTES:,} bytes"
        ) from None
    except OSError as exc:
        raise invalid_field("source", f"the model folder's config.json cannot be read ({exc.strerror})") from None


def fingerprint(source: ResolvedSource) -> str:
    """What identifies the model's weights in cache keys. A Hugging Face snapshot is named
    by its commit, which pins every file; a local folder is hashed from its config bytes and
    each weight file's name, size and modification time (hashing gigabytes of weights on
    every registration would cost minutes). Weight files are only stat'ed, never opened, so
    a FIFO or device among them cannot block the request. A GGUF file is one file, its own
    sha256, streamed."""
    if source.kind == "gguf":
        return _gguf_sha256(source.path)
    digest = hashlib.sha256()
    if source.kind == "hf_cache":
        digest.update(f"hf:{source.identity}@{source.path.name}".encode())
        return digest.hexdigest()
    digest.update(b"local:" + read_config_bytes(source.path))
    try:
        for weights in sorted(p for p in source.path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)):
            try:
                stat = weights.stat()
            except OSError:  # a dangling link: the worker's check says what is wrong
                continue
            digest.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    except OSError as exc:
        raise invalid_field("source", f"the model folder cannot be listed ({exc.strerror})") from None
    return digest.hexdigest()


def _first_int(config: dict[str, Any], keys: tuple[str, ...], name: str) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise invalid_field("source", f"config.json has no {name} (looked for {', '.join(keys)})", config_keys=list(keys))


def read_model_shape(folder: Path) -> ModelShape:
    """Architecture, layer count and hidden size from `config.json`. A config that needs
    remote code (`auto_map`) is refused: the service never runs `trust_remote_code`; so is
    one whose sizes pass this service's bounds (`check_config_sizes`)."""
    try:
        config = parse_config(read_config_bytes(folder))
    except ValueError as exc:
        raise invalid_field("source", str(exc)) from exc
    if config.get("auto_map") or config.get("trust_remote_code"):
        raise invalid_field(
            "source",
            "the model needs trust_remote_code (its config.json has auto_map), which this service never enables",
        )
    try:
        check_config_sizes(config)
    except UnreasonableConfig as exc:
        raise invalid_field("source", str(exc), config_key=exc.key, bound=exc.bound) from exc
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise invalid_field("source", "config.json has no model_type")
    architectures = config.get("architectures")
    architecture = (
        architectures[0]
        if isinstance(architectures, list) and architectures and isinstance(architectures[0], str)
        else model_type
    )
    return ModelShape(
        architecture=architecture,
        model_type=model_type,
        num_layers=_first_int(config, LAYER_COUNT_KEYS, "layer count"),
        hidden_size=_first_int(config, HIDDEN_SIZE_KEYS, "hidden size"),
        has_chat_template=folder_has_chat_template(folder),
    )


def folder_has_chat_template(folder: Path) -> bool | None:
    """Whether the folder's tokenizer has a chat template: a `chat_template.jinja` or
    `chat_template.json` file, or a non-empty `chat_template` in `tokenizer_config.json`.
    None when that file cannot be read within METADATA_MAX_BYTES: the worker's tokenizer
    will say."""
    if any((folder / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return True
    try:
        config = json.loads(read_regular_file(folder / "tokenizer_config.json", METADATA_MAX_BYTES))
    except FileNotFoundError:
        return False
    except (OSError, NotARegularFile, FileTooLarge, ValueError):
        return None
    return isinstance(config, dict) and bool(config.get("chat_template"))


def source_shape(source: ResolvedSource) -> ModelShape:
    """The shape of a resolved source: from a GGUF file's header, or a folder's config.json."""
    if source.kind == "gguf":
        return read_gguf_shape(source.path)
    return read_model_shape(source.path)


def gguf_model_info(path: Path) -> GgufModelInfo:
    """The model facts of a GGUF file's header, read as hostile input, its sizes within this
    service's bounds; a file that is not GGUF, is cut short, or holds a model transformers
    cannot load from GGUF is a 422 naming `source` and the problem."""
    try:
        info = read_model_info(path)
    except InvalidGguf as exc:
        raise invalid_field("source", f"not a usable GGUF file: {exc}", gguf_key=exc.key) from None
    except NotARegularFile as exc:
        raise invalid_field("source", f"the GGUF source is a {exc.kind}, not a regular file") from None
    except OSError as exc:
        raise invalid_field("source", f"the GGUF file cannot be read ({exc.strerror})") from None
    if not info.loads_in_transformers:
        supported = sorted(TRANSFORMERS_GGUF_ARCHITECTURES)
        raise invalid_field(
            "source",
            f"the GGUF file's architecture {info.architecture!r} is not one transformers loads from GGUF; "
            f"supported: {', '.join(supported)}",
            architecture=info.architecture,
            supported=supported,
        )
    try:
        check_config_sizes(gguf_config_sizes(info))
    except UnreasonableConfig as exc:
        raise invalid_field(
            "source",
            f"the GGUF header's sizes: {str(exc).removeprefix('config.json: ')}",
            config_key=exc.key,
            bound=exc.bound,
        ) from exc
    return info


def gguf_config_sizes(info: GgufModelInfo) -> dict[str, Any]:
    """A GGUF header's sizes under the config keys `check_config_sizes` bounds."""
    return {
        "num_hidden_layers": info.num_layers,
        "hidden_size": info.hidden_size,
        "max_position_embeddings": info.context_length,
        "num_attention_heads": info.attention_heads,
        "num_key_value_heads": info.key_value_heads,
        "vocab_size": info.vocab_size,
    }


def read_gguf_shape(path: Path) -> ModelShape:
    """Architecture (llama.cpp's name), layer count and hidden size from a GGUF header."""
    info = gguf_model_info(path)
    return ModelShape(
        architecture=info.architecture,
        model_type=transformers_model_type(info.architecture),
        num_layers=info.num_layers,
        hidden_size=info.hidden_size,
        has_chat_template=info.has_chat_template,
    )


def _gguf_sha256(path: Path) -> str:
    try:
        return file_sha256(path)
    except NotARegularFile as exc:
        raise invalid_field("source", f"the GGUF source is a {exc.kind}, not a regular file") from None
    except OSError as exc:
        raise invalid_field("source", f"the GGUF file cannot be read ({exc.strerror})") from None
