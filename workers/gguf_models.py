"""GGUF model sources on a worker: transformers dequantizes the file into the registered dtype
once, and the result is kept as a plain Hugging Face folder (config, safetensors weights,
tokenizer) in the worker's local cache, keyed by the file's sha256 and the dtype, so every
later load of the same file costs what loading a folder costs.

The file is read as hostile input again before transformers opens it (its header by
`app/inputs/gguf.py`, its sizes within the gateway's bounds), and hashed: the cache entry is
named after the sha256 the model was registered with, so a file changed since registration
is refused rather than cached under another file's name.

An entry is written into a temporary folder beside it and renamed into place whole; its
manifest, written last, lists every file's size, and an entry whose files do not match its
manifest (a disk filled up, a file removed or cut short by hand) is removed and rebuilt. A
temporary folder a worker killed mid-write left behind is removed by the next build in the
same cache, once nothing has been written into it for STALE_SCRATCH_AGE_S.
"""

import copy
import functools
import json
import logging
import os
import secrets
import shutil
import stat
import time
from pathlib import Path
from typing import Any

from app.inputs.gguf import InvalidGguf, file_sha256, read_model_info
from app.inputs.gguf_architectures import TRANSFORMERS_GGUF_ARCHITECTURES
from app.inputs.model_configs import UnreasonableConfig, check_config_sizes
from app.inputs.model_sources import gguf_config_sizes
from app.inputs.user_files import METADATA_MAX_BYTES, FileTooLarge, NotARegularFile, read_regular_file
from app.registry.tables import Model
from app.settings import get_settings
from workers.errors import JobFailed

log = logging.getLogger("workers.gguf_models")

MANIFEST_NAME = "gguf-source.json"
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError)
SCRATCH_SUFFIX = ".partial"
# A build writes into its scratch folder without pause, from its first file to the rename
# (the GGUF file is dequantized in memory before the folder exists): a scratch folder with
# nothing written in it for this long belongs to no live process, on any machine sharing
# the cache, and is removed.
STALE_SCRATCH_AGE_S = 3600.0


def default_cache_dir() -> Path:
    """`<VAR_DIR>/cache/gguf` of this process's settings."""
    return get_settings().resolved_gguf_cache_dir


def cache_entry(cache_dir: Path, row: Model) -> Path:
    """Where the dequantized copy of a GGUF model's file, in its dtype, is kept."""
    return cache_dir / f"{row.fingerprint}-{row.dtype}"


def check_gguf_file(path: Path) -> None:
    """The file's header read again as hostile input (it may have changed since registration):
    a GGUF file of an architecture transformers loads, its sizes within the gateway's bounds."""
    try:
        info = read_model_info(path)
    except NotARegularFile as exc:
        raise JobFailed("model_file_not_regular", f"the GGUF source is a {exc.kind}, not a regular file") from None
    except InvalidGguf as exc:
        raise JobFailed("model_load_failed", f"not a usable GGUF file: {exc}", gguf_key=exc.key) from None
    except OSError as exc:
        raise JobFailed("model_load_failed", f"could not read the GGUF file: {exc.strerror}") from None
    if info.architecture not in TRANSFORMERS_GGUF_ARCHITECTURES:
        raise JobFailed(
            "unsupported_model",
            f"the GGUF file's architecture {info.architecture!r} is not one transformers loads from GGUF",
            architecture=info.architecture,
        )
    try:
        check_config_sizes(gguf_config_sizes(info))
    except UnreasonableConfig as exc:
        raise JobFailed("unsupported_model", str(exc), config_key=exc.key, bound=exc.bound) from None


def gguf_config(path: Path) -> Any:
    """transformers' config of a GGUF file (read after `check_gguf_file`), naming the model
    class with a language-model head when transformers has one for its type, as a folder's
    config does (a GGUF file names no class). transformers reads the whole file's metadata
    for it (seconds): sizing a model and then loading it share one reading of each version
    of the file, and each caller gets its own copy to change."""
    stat = path.stat()
    return copy.deepcopy(_gguf_config(str(path), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _gguf_config(path: str, size: int, mtime_ns: int) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    where = Path(path)
    config = AutoConfig.from_pretrained(where.parent, gguf_file=where.name, local_files_only=True)
    causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    config.architectures = [causal_lm] if causal_lm else None
    return config


def intact_entry(entry: Path, row: Model) -> bool:
    """Whether `entry` is a whole copy of this model: its manifest names the file's sha256 and
    the dtype, and every file it lists is a regular file of the listed size."""
    try:
        manifest = json.loads(read_regular_file(entry / MANIFEST_NAME, METADATA_MAX_BYTES))
        files = manifest["files"]
        if (manifest["sha256"], manifest["dtype"]) != (row.fingerprint, row.dtype) or not files:
            return False
        return all((entry / name).is_file() and (entry / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError, FileTooLarge, NotARegularFile):
        return False


def dequantized_folder(row: Model, dtype: Any, cache_dir: Path) -> Path:
    """The cached folder of a GGUF model in `dtype` (the torch dtype of `row.dtype`), built
    first when it is missing or damaged."""
    entry = cache_entry(cache_dir, row)
    if intact_entry(entry, row):
        return entry
    discard(entry)
    build_entry(row, dtype, entry)
    return entry


def discard(entry: Path) -> None:
    """Remove a cache entry (a damaged one: rebuilt next)."""
    shutil.rmtree(entry, ignore_errors=True)


def build_entry(row: Model, dtype: Any, entry: Path) -> None:
    """Dequantize the GGUF file into `entry`, atomically. Another worker sharing the cache
    may publish the same entry first: then its copy stays and this one is dropped."""
    path = Path(row.resolved_path)
    check_gguf_file(path)
    try:
        sha256 = file_sha256(path)
    except NotARegularFile as exc:
        raise JobFailed("model_file_not_regular", f"the GGUF source is a {exc.kind}, not a regular file") from None
    except OSError as exc:
        raise JobFailed("model_load_failed", f"could not read the GGUF file: {exc.strerror}") from None
    if sha256 != row.fingerprint:
        raise JobFailed(
            "model_changed",
            f"the GGUF file's sha256 is {sha256}, not {row.fingerprint} as when it was registered; register it again",
            sha256=sha256,
        )
    entry.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(entry.parent)
    scratch = entry.parent / f".{entry.name}.{secrets.token_hex(8)}{SCRATCH_SUFFIX}"
    try:
        _write_dequantized(path, dtype, scratch)
        files = {file.name: file.stat().st_size for file in scratch.iterdir()}
        manifest = {"sha256": sha256, "dtype": row.dtype, "source": path.name, "files": files}
        (scratch / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
        try:
            scratch.rename(entry)
        except OSError:
            if not intact_entry(entry, row):  # not a copy another worker published meanwhile
                raise
    except LOAD_ERRORS as exc:
        raise JobFailed("model_load_failed", f"could not dequantize the GGUF file {path.name}: {exc}") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def remove_stale_scratch(cache_dir: Path, older_than_s: float = STALE_SCRATCH_AGE_S) -> list[Path]:
    """Remove the scratch folders in `cache_dir` (`.<entry>.<hex>.partial`) that nothing has
    been written into for `older_than_s`: the folder and everything in it unchanged as long.
    A link, or anything not named as a scratch folder, is left alone. The removed, in order."""
    cutoff = time.time() - older_than_s
    try:
        candidates = sorted(
            path for path in cache_dir.iterdir() if path.name.startswith(".") and path.name.endswith(SCRATCH_SUFFIX)
        )
    except OSError:
        return []
    removed = []
    for scratch in candidates:
        try:
            if not stat.S_ISDIR(scratch.lstat().st_mode) or _last_written(scratch) >= cutoff:
                continue
        except OSError:  # gone meanwhile: renamed into place, or removed by another worker
            continue
        shutil.rmtree(scratch, ignore_errors=True)
        log.info("removed %s, a GGUF cache scratch folder left by a build that never finished", scratch.name)
        removed.append(scratch)
    return removed


def _last_written(folder: Path) -> float:
    """The latest modification time of `folder` and of everything in it (links not followed)."""
    latest = folder.lstat().st_mtime
    for where, folders, files in os.walk(folder):
        for name in folders + files:
            try:
                latest = max(latest, os.lstat(os.path.join(where, name)).st_mtime)
            except FileNotFoundError:
                pass
    return latest


def _write_dequantized(path: Path, dtype: Any, folder: Path) -> None:
    """Load the GGUF file with transformers (which dequantizes it), and save its weights as a
    plain model of the same config — built on the meta device, the loaded tensors assigned to
    it, since a model loaded from GGUF refuses `save_pretrained` — with its tokenizer."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = gguf_config(path)
    auto_class = AutoModelForCausalLM if config.architectures else AutoModel
    options: dict[str, Any] = {"gguf_file": path.name, "local_files_only": True, "trust_remote_code": False}
    loaded = auto_class.from_pretrained(path.parent, config=config, dtype=dtype, **options)
    with torch.device("meta"):
        plain = auto_class.from_config(config, dtype=dtype, trust_remote_code=False)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.save_pretrained(folder)
    AutoTokenizer.from_pretrained(path.parent, **options).save_pretrained(folder)
