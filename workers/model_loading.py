"""Loading a registered model with transformers, and attaching PEFT adapters to it.

Loading reads only local files (`local_files_only`), never runs remote code, and checks the
folder first: no special files, a `config.json` within the gateway's bounds. A GGUF source
loads from its dequantized copy in the worker's cache (`workers/gguf_models.py`).
"""

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.inputs.model_configs import (
    UnreasonableConfig,
    check_config_sizes,
    parse_config,
)
from app.inputs.user_files import (
    METADATA_MAX_BYTES,
    FileTooLarge,
    NotARegularFile,
    file_kind,
    read_regular_file,
)
from app.registry.tables import Model
from workers.errors import JobFailed
from workers.gguf_models import default_cache_dir, dequantized_folder, discard

TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


QUANTIZED_RUN_ERRORS = (AssertionError, RuntimeError, ValueError, NotImplementedError)


@dataclass
class LoadedModel:
    model_id: str
    model: Any  # a transformers PreTrainedModel; a PeftModel around it once an adapter is attached
    tokenizer: Any  # a transformers tokenizer
    footprint_bytes: int
    parameter_count: int
    is_causal_lm: bool
    adapters: set[str] = field(default_factory=set)


@contextmanager
def active_adapter(loaded: LoadedModel, adapter_id: str | None) -> Iterator[None]:
    """Run the base alone (adapters disabled, not unloaded) or with one attached adapter."""
    if not loaded.adapters:
        if adapter_id is not None:
            raise ValueError(f"adapter {adapter_id} is not attached")
        yield
        return
    if adapter_id is None:
        with loaded.model.disable_adapter():
            yield
        return
    loaded.model.set_adapter(adapter_id)
    yield


def _is_causal_lm(config: Any) -> bool:
    return any(name.endswith(CAUSAL_LM_SUFFIXES) for name in (getattr(config, "architectures", None) or []))


def model_class(config: Any) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if _is_causal_lm(config) else AutoModel


def _quantization_config(quantization: str, dtype: Any) -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise JobFailed(
            "quantization_unavailable", f"{quantization} quantization needs bitsandbytes, which this worker lacks"
        ) from exc
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


@contextmanager
def explained_quantization_errors(quantization: str | None, device: str) -> Iterator[None]:
    """bitsandbytes refuses some shapes and devices only when a quantized layer first runs,
    with a bare assertion; say what failed and why instead of an internal error. There is no
    fallback to full precision: a quantized model either runs quantized or fails."""
    try:
        yield
    except QUANTIZED_RUN_ERRORS as exc:
        if not quantization or type(exc).__name__ == "OutOfMemoryError":
            raise
        hint = ""
        if "block_n" in str(exc):
            hint = " (bitsandbytes' 4-bit CPU kernels need every quantized layer's output size to be a multiple of 32)"
        raise JobFailed(
            "quantization_unsupported",
            f"bitsandbytes cannot run this model {quantization} on {device}: {exc or type(exc).__name__}{hint}",
            device=device,
        ) from exc


def load_model(row: Model, device: str, gguf_cache_dir: Path | None = None) -> LoadedModel:
    """Load a registered model and its tokenizer onto `device`, in eval mode. A GGUF model
    loads from its copy in `gguf_cache_dir` (default `<VAR_DIR>/cache/gguf`), made first if
    there is none; a copy that does not load is rebuilt once."""
    import torch

    dtype = getattr(torch, TORCH_DTYPES[row.dtype])
    if row.source_kind != "gguf":
        return _load_folder(row, Path(row.resolved_path), dtype, device)
    folder = dequantized_folder(row, dtype, gguf_cache_dir or default_cache_dir())
    try:
        return _load_folder(row, folder, dtype, device)
    except JobFailed as exc:
        if exc.code != "model_load_failed":
            raise
        discard(folder)
        return _load_folder(row, dequantized_folder(row, dtype, gguf_cache_dir or default_cache_dir()), dtype, device)


def load_tokenizer(row: Model, gguf_cache_dir: Path | None = None) -> Any:
    """Only the registered model's tokenizer, from the folder `load_model` would load (a GGUF
    model's dequantized copy, made first if there is none): what a job needs that tokenizes
    for training done elsewhere."""
    import torch
    from transformers import AutoTokenizer

    if row.source_kind == "gguf":
        dtype = getattr(torch, TORCH_DTYPES[row.dtype])
        folder = dequantized_folder(row, dtype, gguf_cache_dir or default_cache_dir())
    else:
        folder = Path(row.resolved_path)
    refuse_special_files(folder)
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise JobFailed(
            "model_load_failed", f"could not load the tokenizer of {folder}: {exc}", path=str(folder)
        ) from exc


def _load_folder(row: Model, folder: Path, dtype: Any, device: str) -> LoadedModel:
    from transformers import AutoConfig, AutoTokenizer

    path = str(folder)
    read_model_config(folder)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        is_causal_lm = _is_causal_lm(config)
        auto_class = model_class(config)
        options: dict[str, Any] = {"dtype": dtype, "local_files_only": True, "trust_remote_code": False}
        if row.quantization:
            options["quantization_config"] = _quantization_config(row.quantization, dtype)
            options["device_map"] = {"": device}
        model = auto_class.from_pretrained(path, config=config, **options)
        if not row.quantization:
            model.to(device)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise JobFailed("model_load_failed", f"could not load {path}: {exc}", path=path) from exc
    return LoadedModel(
        model_id=row.id,
        model=model,
        tokenizer=tokenizer,
        footprint_bytes=int(model.get_memory_footprint()),
        parameter_count=sum(parameter.numel() for parameter in model.parameters()),
        is_causal_lm=is_causal_lm,
    )


def refuse_special_files(folder: Path) -> None:
    """transformers opens a model folder's files with a plain `open()`, which blocks forever
    on a FIFO and never ends on a device; so before anything reads the folder, each of its
    entries (links followed) must be a regular file or a folder. Entries are stat'ed, never
    opened. A file swapped in after this check is not caught here; the files this module
    reads itself are checked again on the open descriptor."""
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise JobFailed("model_load_failed", f"could not list {folder}: {exc.strerror}", path=str(folder)) from None
    for entry in entries:
        try:
            mode = os.stat(entry.path).st_mode
        except OSError:  # a dangling link: loading says what is missing
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise JobFailed(
                "model_file_not_regular",
                f"{entry.name!r} in the model folder is a {file_kind(mode)}, not a regular file",
                file=entry.name,
            )


def not_regular(exc: NotARegularFile) -> JobFailed:
    return JobFailed("model_file_not_regular", f"{exc} in the model folder", file=exc.path.name)


def read_model_config(folder: Path) -> dict[str, Any]:
    """The folder's `config.json`, read only as a regular file of at most METADATA_MAX_BYTES,
    its sizes checked against the gateway's bounds again (the folder may have changed since
    registration), after `refuse_special_files`. An unreasonable config fails the job with
    `unsupported_model` before transformers builds anything from it."""
    refuse_special_files(folder)
    try:
        config = parse_config(read_regular_file(folder / "config.json", METADATA_MAX_BYTES))
    except NotARegularFile as exc:
        raise not_regular(exc) from None
    except (OSError, FileTooLarge, ValueError) as exc:
        raise JobFailed(
            "model_load_failed", f"could not read the config.json of {folder}: {exc}", path=str(folder)
        ) from None
    try:
        check_config_sizes(config)
    except UnreasonableConfig as exc:
        raise JobFailed("unsupported_model", str(exc), config_key=exc.key, bound=exc.bound) from None
    return config


def attach_adapter(loaded: LoadedModel, adapter_id: str, folder: Path) -> None:
    """Attach the PEFT adapter in `folder` to the loaded base, beside any already attached."""
    from peft import PeftModel

    try:
        if loaded.adapters:
            loaded.model.load_adapter(str(folder), adapter_name=adapter_id, is_trainable=False)
        else:
            loaded.model = PeftModel.from_pretrained(
                loaded.model, str(folder), adapter_name=adapter_id, is_trainable=False
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise JobFailed(
            "adapter_load_failed", f"could not attach adapter {adapter_id}: {exc}", adapter_id=adapter_id
        ) from exc
    loaded.adapters.add(adapter_id)
    loaded.footprint_bytes = int(loaded.model.get_memory_footprint())
