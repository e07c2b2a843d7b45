"""Loading models with transformers, and keeping them resident between jobs.

A worker loads a registered model once and keeps it while it fits in the memory budget,
evicting the least recently used models before a new one is loaded, so the worker never
holds both. How much room to make comes from an estimate of the model's footprint taken
without loading it. Loading reads only local files (`local_files_only`) and never runs
remote code.
"""

import gc
import json
import math
import os
import stat
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from app.inputs.model_sources import (
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
    file_kind,
    read_regular_file,
    regular_file_or_none,
)
from app.registry.tables import Model
from workers.errors import JobFailed
from workers.safetensors_header import HeaderBounds, read_header

TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
QUANTIZED_RUN_ERRORS = (AssertionError, RuntimeError, ValueError, NotImplementedError)
# Tensors transformers never casts to the requested dtype, by their safetensors dtype code.
SAFETENSORS_FIXED_WIDTHS = {"BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "U32": 4, "I32": 4, "U64": 8, "I64": 8}
# PEFT keeps LoRA weights in float32 whatever the base's dtype (`autocast_adapter_dtype`).
ADAPTER_WEIGHT_BYTES = 4
BUDGET_SETTING = "WORKER_MEMORY_BUDGET_MB"
# A safetensors header is JSON naming each tensor (~100 bytes each): a model with 100,000
# tensors has a ~10 MiB header. The format itself allows 100 MB.
SAFETENSORS_HEADER_MAX_BYTES = 32 << 20
MODEL_HEADER_BOUNDS = HeaderBounds(SAFETENSORS_HEADER_MAX_BYTES, "SAFETENSORS_HEADER_MAX_BYTES")
# A sharded checkpoint's index maps every tensor to its shard: ~100 bytes per tensor too.
SAFETENSORS_INDEX_MAX_BYTES = 32 << 20
# Config keys read for the parameter floor, beyond the layer count and hidden size.
VOCAB_SIZE_KEYS = ("vocab_size", "padded_vocab_size")
INTERMEDIATE_SIZE_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "ffn_hidden_size")


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


def _model_class(config: Any) -> Any:
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


def load_model(row: Model, device: str) -> LoadedModel:
    """Load a registered model and its tokenizer onto `device`, in eval mode."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    path = row.resolved_path
    dtype = getattr(torch, TORCH_DTYPES[row.dtype])
    read_model_config(Path(path))
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        is_causal_lm = _is_causal_lm(config)
        model_class = _model_class(config)
        options: dict[str, Any] = {"dtype": dtype, "local_files_only": True, "trust_remote_code": False}
        if row.quantization:
            options["quantization_config"] = _quantization_config(row.quantization, dtype)
            options["device_map"] = {"": device}
        model = model_class.from_pretrained(path, config=config, **options)
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


def _not_regular(exc: NotARegularFile) -> JobFailed:
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
        raise _not_regular(exc) from None
    except (OSError, FileTooLarge, ValueError) as exc:
        raise JobFailed(
            "model_load_failed", f"could not read the config.json of {folder}: {exc}", path=str(folder)
        ) from None
    try:
        check_config_sizes(config)
    except UnreasonableConfig as exc:
        raise JobFailed("unsupported_model", str(exc), config_key=exc.key, bound=exc.bound) from None
    return config


def _config_size(config: dict[str, Any], keys: tuple[str, ...], smallest: bool = False) -> int:
    """The first of `keys` the config sets to a positive size (the smallest or largest of a
    per-layer list), else 0. Sizes are already checked to be whole numbers."""
    for key in keys:
        value = config.get(key)
        values = [
            v
            for v in (value if isinstance(value, list) else [value])
            if isinstance(v, int) and not isinstance(v, bool) and v > 0
        ]
        if values:
            return min(values) if smallest else max(values)
    return 0


def parameter_floor(config: dict[str, Any]) -> int:
    """A parameter count the model built from `config` has at least, from its arithmetic
    alone: the input embeddings (vocabulary x embedding width) and, in each layer that holds
    its own weights, one projection of its feed-forward block (width x intermediate size) or
    else one width-sized norm. Attention, the other projections and any head are left out,
    so it stays well below the real count and cannot refuse a model that would fit; but a
    floor over the budget refuses an absurd model before anything is built."""
    hidden = _config_size(config, HIDDEN_SIZE_KEYS)
    narrower = [
        size
        for size in (_config_size(config, ("embedding_size",)), _config_size(config, ("word_embed_proj_dim",)))
        if size
    ]
    embedding = min([hidden, *narrower])  # ALBERT and OPT embed narrower, then project
    layers = _config_size(config, ("num_hidden_groups",)) or _config_size(
        config, LAYER_COUNT_KEYS
    )  # ALBERT shares layers in groups
    intermediate = _config_size(config, INTERMEDIATE_SIZE_KEYS, smallest=True)
    return _config_size(config, VOCAB_SIZE_KEYS) * embedding + layers * hidden * max(intermediate, 1)


def _safetensors_files(folder: Path) -> list[Path]:
    """The weight files transformers loads from `folder` — the shards its index names, or the
    single file — and no others (some repositories also ship a consolidated copy). The index
    is read only as a regular file within SAFETENSORS_INDEX_MAX_BYTES, and may name only
    files inside the folder."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if regular_file_or_none(index) is not None:
        document = json.loads(read_regular_file(index, SAFETENSORS_INDEX_MAX_BYTES))
        weight_map = document.get("weight_map") if isinstance(document, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
            raise ValueError(f"{SAFE_WEIGHTS_INDEX_NAME} has no weight_map of tensor names to shard files")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            parts = PurePosixPath(shard).parts
            if not parts or PurePosixPath(shard).is_absolute() or ".." in parts or "\\" in shard:
                raise ValueError(f"{SAFE_WEIGHTS_INDEX_NAME} names a shard outside the model folder: {shard[:100]!r}")
        return [folder / shard for shard in shards]
    single = folder / SAFE_WEIGHTS_NAME
    return [single] if regular_file_or_none(single) is not None else []


def _safetensors_bytes(files: list[Path], floating_width: int) -> int:
    """What the tensors in `files` take once loaded, read from their headers alone: floating
    tensors at `floating_width` bytes per number (they are cast to the requested dtype),
    integer ones as stored."""
    total = 0
    for file in files:
        for tensor in read_header(file, MODEL_HEADER_BOUNDS).tensors.values():
            total += math.prod(tensor.shape) * SAFETENSORS_FIXED_WIDTHS.get(tensor.dtype, floating_width)
    return total


def _empty_model_bytes(config: Any, dtype: Any, quantization: str | None) -> int:
    """The parameters and buffers of the model built from `config` on the meta device (no
    memory, no weights read; tied weights tied, as in a loaded model). Layers bitsandbytes quantizes — chosen by transformers' own
    rule — count at one byte per weight for 8-bit and half a byte for 4-bit, as bitsandbytes
    stores them; their scaling constants are left out, as `get_memory_footprint` leaves them."""
    import torch
    from accelerate.utils import CustomDtype, compute_module_sizes
    from torch import nn
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    with torch.device("meta"):
        model = _model_class(config).from_config(config, dtype=dtype, trust_remote_code=False)
    quantized_weights: dict[str, Any] = {}
    if quantization:
        width = torch.int8 if quantization == "8bit" else CustomDtype.INT4
        kept = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
        for name, module in model.named_modules():
            if (type(module) is nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, kept):
                quantized_weights[f"{name}.weight"] = width
    return int(compute_module_sizes(model, special_dtypes=quantized_weights)[""])


def _floor_bytes(config: dict[str, Any], width: int, quantization: str | None) -> int:
    """`parameter_floor` in bytes: at the quantized width (all of it, to stay a floor)."""
    floor = parameter_floor(config)
    if quantization == "8bit":
        return floor
    return floor // 2 if quantization == "4bit" else floor * width


def estimate_footprint(row: Model, budget_bytes: int | None = None) -> int:
    """Bytes `load_model` will take for `row`, found without loading it. Without quantization,
    from the safetensors headers of its weights: exact for what the checkpoint holds, short by
    the few buffers models compute rather than store (rotary frequencies, position ids) and
    any weights the checkpoint lacks (transformers initializes them), over by the weights an
    `AutoModel` drops from a checkpoint with a head. Quantized, or without safetensors
    weights, from the model built empty from its config — unless the config's arithmetic
    (`parameter_floor`) already passes `budget_bytes`: that floor is the answer then, and
    nothing is built."""
    import torch
    from transformers import AutoConfig

    path = Path(row.resolved_path)
    dtype = getattr(torch, TORCH_DTYPES[row.dtype])
    config = read_model_config(path)
    try:
        files = [] if row.quantization else _safetensors_files(path)
        if files:
            return _safetensors_bytes(files, dtype.itemsize)
        floor = _floor_bytes(config, dtype.itemsize, row.quantization)
        if budget_bytes is not None and floor > budget_bytes:
            return floor
        built = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        return _empty_model_bytes(built, dtype, row.quantization)
    except NotARegularFile as exc:
        raise _not_regular(exc) from None
    except (OSError, ValueError, KeyError, RuntimeError, RecursionError, FileTooLarge) as exc:
        raise JobFailed("model_load_failed", f"could not size {path}: {exc}", path=str(path)) from exc


def estimate_adapter_footprint(folder: Path) -> int:
    """Bytes attaching the PEFT adapter in `folder` adds, from its safetensors header; 0 when it
    has no weights file (attaching it then fails and says why)."""
    from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME

    weights = folder / SAFETENSORS_WEIGHTS_NAME
    try:
        if regular_file_or_none(weights) is None:
            return 0
        return _safetensors_bytes([weights], ADAPTER_WEIGHT_BYTES)
    except (OSError, ValueError, NotARegularFile) as exc:
        raise JobFailed("adapter_load_failed", f"could not read {weights}: {exc}") from exc


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


def _mib(size_bytes: int) -> str:
    return f"{size_bytes / 2**20:,.2f} MiB"


def _named(row: Model) -> str:
    return f"model {row.name!r} ({row.id}, {row.quantization or row.dtype})"


class ResidentModels:
    """An LRU cache of loaded models bounded by a memory budget. `loads` counts real loads.

    Room is made from estimates before a model loads or an adapter attaches, so the evicted
    and the new are never held together; then the real footprint replaces the estimate (and
    more is evicted if it is larger). What is estimated not to fit even alone — a base, or a
    base with its adapter — fails its job with `over_memory_budget` before anything is evicted
    or loaded; what turns out larger than the whole budget once loaded is dropped and fails
    the same way."""

    def __init__(self, budget_bytes: int, device: str) -> None:
        self.budget_bytes = budget_bytes
        self.device = device
        self.loads = 0
        self.adapter_loads = 0
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()

    # The heartbeat thread reads these while a job loads and evicts: each copies the entries
    # in one step instead of iterating the live dict.
    @property
    def used_bytes(self) -> int:
        return sum(loaded.footprint_bytes for loaded in list(self._models.values()))

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"model_id": model_id, "bytes": loaded.footprint_bytes, "adapters": sorted(loaded.adapters)}
            for model_id, loaded in list(self._models.items())
        ]

    def get(self, row: Model, adapter: tuple[str, Path] | None = None) -> LoadedModel:
        """The resident model, loaded if it is not; with `adapter` (id, PEFT folder) attached
        to it — without reloading the base — if it is not yet."""
        loaded = self._models.get(row.id)
        attaching = adapter if adapter is not None and (loaded is None or adapter[0] not in loaded.adapters) else None
        adapter_bytes = estimate_adapter_footprint(attaching[1]) if attaching else 0
        if loaded is None:
            estimate = estimate_footprint(row, self.budget_bytes)
            with_adapter = (
                f" with adapter {attaching[0]} ({_mib(estimate)} + {_mib(adapter_bytes)})" if attaching else ""
            )
            self._refuse_beyond_budget(estimate + adapter_bytes, f"{_named(row)}{with_adapter} needs about")
            self._make_room(estimate + adapter_bytes)
            loaded = load_model(row, self.device)
            self.loads += 1
            self._models[row.id] = loaded
            self._settle(loaded, f"{_named(row)} takes, once loaded,")
        else:
            self._models.move_to_end(row.id)
        if attaching:
            self._attach(loaded, *attaching, adapter_bytes)
        return loaded

    def _refuse_beyond_budget(self, needed_bytes: int, what: str) -> None:
        if needed_bytes > self.budget_bytes:
            raise JobFailed(
                "over_memory_budget",
                f"{what} {_mib(needed_bytes)}, more than this worker's whole memory budget of {_mib(self.budget_bytes)}; "
                f"raise {BUDGET_SETTING}, or register the model in a smaller dtype or quantized",
                needed_bytes=needed_bytes,
                budget_bytes=self.budget_bytes,
                setting=BUDGET_SETTING,
            )

    def _make_room(self, needed_bytes: int, keep: str | None = None) -> None:
        """Evict the least recently used models, never `keep`, until `needed_bytes` more fit."""
        for model_id in list(self._models):
            if self.used_bytes + needed_bytes <= self.budget_bytes:
                return
            if model_id != keep:
                self.evict(model_id)

    def _settle(self, loaded: LoadedModel, what: str) -> None:
        """After `loaded` grew to its real size: evict others until it fits, or evict it too
        and fail when it cannot fit even alone (its estimate was short)."""
        self._make_room(0, keep=loaded.model_id)
        if loaded.footprint_bytes > self.budget_bytes:
            self.evict(loaded.model_id)
            self._refuse_beyond_budget(loaded.footprint_bytes, what)

    def _attach(self, loaded: LoadedModel, adapter_id: str, folder: Path, adapter_bytes: int) -> None:
        described = f"model {loaded.model_id} with adapter {adapter_id} ({_mib(loaded.footprint_bytes)} + {_mib(adapter_bytes)})"
        self._refuse_beyond_budget(loaded.footprint_bytes + adapter_bytes, f"{described} needs about")
        self._make_room(adapter_bytes, keep=loaded.model_id)
        attach_adapter(loaded, adapter_id, folder)
        self.adapter_loads += 1
        self._settle(loaded, f"model {loaded.model_id} with adapter {adapter_id} takes, once attached,")

    def evict(self, model_id: str) -> None:
        self._models.pop(model_id, None)
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
