"""How much memory a model or an adapter will take once loaded, found without loading it:
from safetensors headers, from the model built empty on the meta device, or — for an absurd
config — from the config's arithmetic alone (`parameter_floor`). A GGUF model is sized from
its dequantized copy when the worker has one, else from the GGUF file's config.
"""

import json
import math
from pathlib import Path, PurePosixPath
from typing import Any

from app.inputs.model_configs import (
    HIDDEN_SIZE_KEYS,
    LAYER_COUNT_KEYS,
)
from app.inputs.user_files import (
    FileTooLarge,
    NotARegularFile,
    read_regular_file,
    regular_file_or_none,
)
from app.registry.tables import Model
from workers.errors import JobFailed
from workers.gguf_models import cache_entry, check_gguf_file, default_cache_dir, gguf_config, intact_entry
from workers.model_loading import TORCH_DTYPES, model_class, not_regular, read_model_config
from workers.safetensors_header import HeaderBounds, read_header

# Tensors transformers never casts to the requested dtype, by their safetensors dtype code.
SAFETENSORS_FIXED_WIDTHS = {"BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "U32": 4, "I32": 4, "U64": 8, "I64": 8}


# PEFT keeps LoRA weights in float32 whatever the base's dtype (`autocast_adapter_dtype`).
ADAPTER_WEIGHT_BYTES = 4


# A safetensors header is JSON naming each tensor (~100 bytes each): a model with 100,000
# tensors has a ~10 MiB header. The format itself allows 100 MB.
SAFETENSORS_HEADER_MAX_BYTES = 32 << 20


MODEL_HEADER_BOUNDS = HeaderBounds(SAFETENSORS_HEADER_MAX_BYTES, "SAFETENSORS_HEADER_MAX_BYTES")


# A sharded checkpoint's index maps every tensor to its shard: ~100 bytes per tensor too.
SAFETENSORS_INDEX_MAX_BYTES = 32 << 20


# Config keys read for the parameter floor, beyond the layer count and hidden size.
VOCAB_SIZE_KEYS = ("vocab_size", "padded_vocab_size")


INTERMEDIATE_SIZE_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "ffn_hidden_size")


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
        model = model_class(config).from_config(config, dtype=dtype, trust_remote_code=False)
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


def estimate_footprint(row: Model, budget_bytes: int | None = None, gguf_cache_dir: Path | None = None) -> int:
    """Bytes `load_model` will take for `row`, found without loading it. Without quantization,
    from the safetensors headers of its weights: exact for what the checkpoint holds, short by
    the few buffers models compute rather than store (rotary frequencies, position ids) and
    any weights the checkpoint lacks (transformers initializes them), over by the weights an
    `AutoModel` drops from a checkpoint with a head. Quantized, or without safetensors
    weights, from the model built empty from its config — unless the config's arithmetic
    (`parameter_floor`) already passes `budget_bytes`: that floor is the answer then, and
    nothing is built. A GGUF model (`gguf_cache_dir` as for `load_model`) is sized as its
    dequantized copy when there is one, else as the model built empty from the file's config."""
    import torch
    from transformers import AutoConfig

    path = Path(row.resolved_path)
    dtype = getattr(torch, TORCH_DTYPES[row.dtype])
    if row.source_kind == "gguf":
        entry = cache_entry(gguf_cache_dir or default_cache_dir(), row)
        if intact_entry(entry, row):
            path = entry
        else:
            return _gguf_footprint(path, dtype, row.quantization, budget_bytes)
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
        raise not_regular(exc) from None
    except (OSError, ValueError, KeyError, RuntimeError, RecursionError, FileTooLarge) as exc:
        raise JobFailed("model_load_failed", f"could not size {path}: {exc}", path=str(path)) from exc


def _gguf_footprint(path: Path, dtype: Any, quantization: str | None, budget_bytes: int | None) -> int:
    """The bytes of a GGUF file's model, built empty from its config (its header checked
    first), unless the config's parameter floor already passes `budget_bytes`."""
    check_gguf_file(path)
    try:
        config = gguf_config(path)
        floor = _floor_bytes(config.to_dict(), dtype.itemsize, quantization)
        if budget_bytes is not None and floor > budget_bytes:
            return floor
        return _empty_model_bytes(config, dtype, quantization)
    except (OSError, ValueError, KeyError, RuntimeError, RecursionError) as exc:
        raise JobFailed("model_load_failed", f"could not size the GGUF file {path.name}: {exc}") from exc


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
