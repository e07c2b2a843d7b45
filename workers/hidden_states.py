"""Reading hidden states out of a transformers model, exactly as docs/concepts.md#hidden-states defines them.

- Layer 0 is the input of the first block (the embedding output); layer i is the output of
  block i, *before* any final norm — also for the last block, where Hugging Face's own
  `hidden_states[-1]` is already normed for Llama, Qwen2 and GPT-2 (not for BERT, whose
  blocks end in their own LayerNorm).
- The forward pass stops right after the deepest requested block (a hook raises), so later
  blocks, the final norm and the LM head never run.
- `last` is the last real (non-pad) token, `mean` the mean over real tokens; position ids
  are derived from the attention mask, so padding on either side gives the same vectors.

Two shortcuts give the same vectors with less computing (`read_texts` decides per batch; both
only for the causal decoders whose blocks this module knows, `trimmable`):

- Shared prefix: when every text of a batch starts with the same tokens (a chat template's
  system turn, a template's preamble), those tokens run once, as a batch of one, into a
  key/value cache that is then repeated for every row; the rest of each text runs after it,
  its position ids continuing from the prefix and its attention mask covering both. `mean`
  adds the prefix's own states (kept from its pass) to the rest's.
- Trimmed deepest block: with `last`, the deepest requested block computes keys and values
  for every token (attention needs them) but its query, attention output, output projection
  and MLP only at each text's last real token.
"""

import functools
import inspect
import logging
import os
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from workers.errors import JobFailed

TokenPosition = str  # "last" | "mean"

log = logging.getLogger("workers.hidden_states")


class _StopForward(Exception):
    """Raised by the hook on the deepest requested block: nothing after it needs to run."""


class _ReachedTrimmedBlock(Exception):
    """Raised before the deepest requested block runs, with its arguments, when that block is
    to run at the last real tokens only."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.args_ = args
        self.kwargs = kwargs


def num_blocks(model: Any) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise JobFailed("unsupported_model", f"cannot tell how many blocks {type(model).__name__} has")


def find_blocks(model: Any) -> torch.nn.ModuleList:
    """The model's stack of blocks: the outermost ModuleList with one entry per layer
    (`model.layers`, `transformer.h`, `encoder.layer`, …). Lists of experts sit inside
    blocks, so they are never the outermost."""
    count = num_blocks(model)
    stacks = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == count
    ]
    if not stacks:
        raise JobFailed("unsupported_model", f"found no list of {count} blocks in {type(model).__name__}")
    return min(stacks, key=lambda item: item[0].count("."))[1]


def block_linear_names(model: Any) -> list[str]:
    """The last part of the name of every linear layer inside the model's blocks (`q_proj`,
    `down_proj`; GPT-2's `Conv1D` layers count as linear): what LoRA may target, and by
    default does. The LM head and embeddings sit outside the blocks."""
    from transformers.pytorch_utils import Conv1D

    names = {
        name.rsplit(".", 1)[-1]
        for block in find_blocks(model)
        for name, module in block.named_modules()
        if isinstance(module, torch.nn.Linear | Conv1D) and name
    }
    return sorted(names)


def backbone(model: Any) -> Any:
    """The model without its head: the LM head never runs during extraction. A PEFT model is
    unwrapped first; its LoRA layers sit inside the base's modules and still run."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    base = getattr(model, "base_model", model)
    return base if isinstance(base, torch.nn.Module) else model


def inductor_compiler() -> str | None:
    """The C++ compiler TorchInductor calls to build its kernels ($CXX, else g++), where it is
    on the PATH; None where compiled blocks cannot run."""
    return shutil.which(os.environ.get("CXX") or "g++")


_COMPILED_FORWARDS: dict[type, Any] = {}
# why compiling failed in this process (the first failure), after which blocks run eagerly
_COMPILE_FAILURE: list[str] = []


def compile_failure() -> str | None:
    """Why TorchInductor failed to compile blocks in this process, if it did: from then on
    this process runs its blocks eagerly."""
    return _COMPILE_FAILURE[0] if _COMPILE_FAILURE else None


def _record_compile_failure(exc: Exception) -> None:
    reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    _COMPILE_FAILURE.append(reason)
    log.warning(
        "compiling blocks failed (%s): this process runs its blocks eagerly from now on, with the same "
        "vectors; a damaged TorchInductor cache is one cause (delete $TORCHINDUCTOR_CACHE_DIR, by default "
        "/tmp/torchinductor_<user>)",
        reason,
    )


def _compiled_forward(block_class: type[torch.nn.Module]) -> Any:
    """`block_class.forward` compiled by `torch.compile` (TorchInductor), once a process and
    shared by every block of the class: a block's weights are inputs of the compiled graph,
    not constants, and the batch's shape is dynamic, so the blocks of one model (and of
    another of the same architecture) reuse one compilation."""
    compiled = _COMPILED_FORWARDS.get(block_class)
    if compiled is None:
        compiled = _COMPILED_FORWARDS[block_class] = torch.compile(block_class.forward, dynamic=True)
    return compiled


@contextmanager
def compiled_blocks(blocks: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Run `blocks` through their class's compiled forward until the context ends: fused
    element-wise work (norms, rotary embeddings, activations, residual sums) around the same
    matrix products. Hooks still run (they wrap `forward`); a block whose instance already
    carries its own `forward` (accelerate's dispatch hooks, for one) stays as it is."""
    swapped: list[torch.nn.Module] = []
    try:
        for block in blocks:
            if "forward" not in vars(block):
                block.forward = functools.partial(_compiled_forward(type(block)), block)
                swapped.append(block)
        yield
    finally:
        for block in swapped:
            del block.forward


@contextmanager
def capturing(
    blocks: torch.nn.ModuleList, layers: Sequence[int], trim: bool = False
) -> Iterator[dict[int, torch.Tensor]]:
    """Hooks that store each requested layer's (batch, tokens, hidden) states and stop the
    forward pass after the deepest one; with `trim` (deepest layer above 0), before the
    deepest block instead, raising `_ReachedTrimmedBlock` with that block's arguments."""
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)
    handles = []

    def before_trimmed_block(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise _ReachedTrimmedBlock(args, kwargs)

    def before_first_block(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured[0] = args[0] if args else kwargs["hidden_states"]
        if deepest == 0:
            raise _StopForward

    def after_block(layer: int) -> Any:
        def hook(_module: Any, _args: Any, _kwargs: Any, output: Any) -> None:
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if layer == deepest:
                raise _StopForward

        return hook

    if 0 in layers:
        handles.append(blocks[0].register_forward_pre_hook(before_first_block, with_kwargs=True))
    for layer in sorted(set(layers) - {0}):
        if trim and layer == deepest:
            handles.append(blocks[layer - 1].register_forward_pre_hook(before_trimmed_block, with_kwargs=True))
        else:
            handles.append(blocks[layer - 1].register_forward_hook(after_block(layer), with_kwargs=True))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def last_real(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's index of its last real (non-pad) token, whichever side the padding is on."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask * positions).argmax(dim=1)


def pool(
    states: torch.Tensor,
    attention_mask: torch.Tensor,
    token_position: TokenPosition,
    prefix_sum: torch.Tensor | None = None,
    prefix_length: int = 0,
) -> torch.Tensor:
    """(batch, tokens, hidden) → (batch, hidden), over real tokens only, in float32. The mean
    also counts a shared prefix's `prefix_length` tokens, whose states sum to `prefix_sum`
    (hidden,); `last` is always within `states`."""
    states = states.float()
    if token_position == "last":
        return states[torch.arange(states.shape[0], device=states.device), last_real(attention_mask)]
    weights = attention_mask.to(states.dtype).unsqueeze(-1)
    total, count = (states * weights).sum(dim=1), weights.sum(dim=1)
    if prefix_sum is not None:
        total, count = total + prefix_sum, count + prefix_length
    return total / count


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor


def _to_device(tensor: torch.Tensor, device: str) -> torch.Tensor:
    """On a GPU, through pinned memory and without waiting: the copy overlaps the kernels
    already queued (the batch before)."""
    if device.startswith("cuda"):
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def pad(token_ids: Sequence[Sequence[int]], pad_id: int, padding_side: str, device: str, start: int = 0) -> Batch:
    """Token ids padded to the longest; position ids count real tokens from `start` (the
    length of a prefix that is already in a key/value cache), pads sitting at the nearest."""
    width = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        span = slice(width - len(ids), width) if padding_side == "left" else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, span] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0) + start
    return Batch(_to_device(input_ids, device), _to_device(attention_mask, device), _to_device(position_ids, device))


@functools.cache
def _forward_signature(module_class: Any) -> inspect.Signature:
    return inspect.signature(module_class.forward)


def _signature(module_class: Any) -> inspect.Signature:
    """The signature of a module class's `forward`, `self` included (read once per class)."""
    return _forward_signature(module_class)


def _accepts(module: Any, argument: str) -> bool:
    return argument in _signature(type(module)).parameters


LLAMA_STYLE_BLOCKS = frozenset({"LlamaDecoderLayer", "Qwen2DecoderLayer"})
GPT2_STYLE_BLOCKS = frozenset({"GPT2Block"})


def trimmable(model: Any) -> bool:
    """Whether the shortcuts (shared prefix, trimmed deepest block) are exact for this model:
    a causal decoder whose blocks are all Llama-, Qwen2- or GPT-2-style ones (by class),
    attending through SDPA or eager attention over every earlier token (no sliding window,
    no cross-attention). Any other model runs whole."""
    config = backbone(model).config
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    if getattr(config, "sliding_window", None) is not None or getattr(config, "add_cross_attention", False):
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return False
    if config._attn_implementation == "eager" and getattr(config, "reorder_and_upcast_attn", False):
        return False
    names = {type(block).__name__ for block in find_blocks(model)}
    return names <= LLAMA_STYLE_BLOCKS | GPT2_STYLE_BLOCKS


def _attend_at_last(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """(batch, heads, 1, head_dim) queries over (batch, kv_heads, keys, head_dim) keys, each
    query seeing its row's real keys (all at or before it: it is the row's last real token);
    (batch, heads × head_dim) out."""
    repeats = query.shape[1] // keys.shape[1]
    if repeats > 1:
        keys, values = keys.repeat_interleave(repeats, dim=1), values.repeat_interleave(repeats, dim=1)
    # one query per row: plain matrix products (softmax in float32, as eager attention does)
    # beat a fused kernel's setup here
    scores = torch.matmul(query, keys.transpose(2, 3)) * scale
    scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    return torch.matmul(weights, values).transpose(1, 2).reshape(query.shape[0], -1)


def _block_at_last(
    block: Any, reached: _ReachedTrimmedBlock, key_mask: torch.Tensor, last: torch.Tensor
) -> torch.Tensor:
    """The block's output at each row's last real token, (batch, hidden): keys and values for
    every token (appended to the block's cache layer, if any), everything else at `last` only.
    `key_mask` (batch, cached + tokens) marks real keys."""
    arguments = _signature(type(block)).bind(block, *reached.args_, **reached.kwargs).arguments
    hidden = arguments["hidden_states"]
    cache = arguments.get("past_key_values")
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    batch, tokens, _ = hidden.shape
    residual = hidden[rows, last]
    if type(block).__name__ in GPT2_STYLE_BLOCKS:
        attention: Any = block.attn
        query, keys, values = attention.c_attn(block.ln_1(hidden)).split(attention.split_size, dim=2)
        query = query[rows, last].view(batch, 1, -1, attention.head_dim).transpose(1, 2)
        keys = keys.view(batch, tokens, -1, attention.head_dim).transpose(1, 2)
        values = values.view(batch, tokens, -1, attention.head_dim).transpose(1, 2)
        if cache is not None:
            keys, values = cache.update(keys, values, attention.layer_idx)
        out = attention.c_proj(_attend_at_last(query, keys, values, key_mask, attention.scaling))
        hidden_last = residual + out
        return hidden_last + block.mlp(block.ln_2(hidden_last))
    attention = block.self_attn
    head_dim = attention.head_dim
    normed = block.input_layernorm(hidden)
    keys = attention.k_proj(normed).view(batch, tokens, -1, head_dim).transpose(1, 2)
    values = attention.v_proj(normed).view(batch, tokens, -1, head_dim).transpose(1, 2)
    query = attention.q_proj(normed[rows, last]).view(batch, 1, -1, head_dim).transpose(1, 2)
    cos, sin = (part.expand(batch, -1, -1) for part in arguments["position_embeddings"])
    rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb
    query, _ = rotate(query, query, cos[rows, last].unsqueeze(1), sin[rows, last].unsqueeze(1))
    _, keys = rotate(keys, keys, cos, sin)
    if cache is not None:
        keys, values = cache.update(keys, values, attention.layer_idx)
    hidden_last = residual + attention.o_proj(_attend_at_last(query, keys, values, key_mask, attention.scaling))
    return hidden_last + block.mlp(block.post_attention_layernorm(hidden_last))


@dataclass(frozen=True)
class SharedPrefix:
    """The first `length` tokens of every text of a batch, computed once: their keys and
    values in a `transformers` `DynamicCache` (repeated for each row), and each requested
    layer's states summed over them (hidden,), float32, for `mean`."""

    length: int
    cache: Any
    sums: dict[int, torch.Tensor]


def run_prefix(model: Any, prefix_ids: Sequence[int], layers: Sequence[int], rows: int, device: str) -> SharedPrefix:
    """The shared prefix as a batch of one, up to and including the deepest requested block
    (whose keys and values the texts' last tokens attend to), its cache repeated `rows` times."""
    from transformers import DynamicCache

    blocks, body = find_blocks(model), backbone(model)
    cache = DynamicCache()
    batch = pad([prefix_ids], 0, "right", device)
    with torch.inference_mode(), capturing(blocks, layers) as captured:
        try:
            body(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                past_key_values=cache,
                use_cache=True,
            )
        except _StopForward:
            pass
        cache.batch_repeat_interleave(rows)
        sums = {layer: captured[layer][0].float().sum(dim=0) for layer in layers}
    return SharedPrefix(length=len(prefix_ids), cache=cache, sums=sums)


def read_layers(
    model: Any,
    batch: Batch,
    layers: Sequence[int],
    token_position: TokenPosition,
    *,
    trim: bool = False,
    prefix: SharedPrefix | None = None,
    compiled: bool = False,
) -> torch.Tensor:
    """Pooled hidden states of one padded batch: (batch, len(layers), hidden), float32. With
    `prefix`, the batch holds each text's tokens after that prefix (position ids starting at
    its length); with `trim` (`last` only, a `trimmable` model), the deepest block runs at
    the last real tokens only; with `compiled`, the blocks run compiled (`compiled_blocks`),
    unless compiling has failed in this process: then, and for the batch that failed, they
    run eagerly (`compile_failure` says why)."""
    # with a prefix, each block writes its layer of the cache (an index the compiled graph
    # would be specialised on, once a block): those batches run eagerly
    if compiled and prefix is None and not _COMPILE_FAILURE:
        try:
            return _read_layers(model, batch, layers, token_position, trim=trim, prefix=None, compiled=True)
        except torch._dynamo.exc.BackendCompilerFailed as exc:  # the C++ compiler's error, among others
            _record_compile_failure(exc)
    return _read_layers(model, batch, layers, token_position, trim=trim, prefix=prefix, compiled=False)


def _read_layers(
    model: Any,
    batch: Batch,
    layers: Sequence[int],
    token_position: TokenPosition,
    *,
    trim: bool,
    prefix: SharedPrefix | None,
    compiled: bool,
) -> torch.Tensor:
    blocks = find_blocks(model)
    body = backbone(model)
    deepest = max(layers)
    trim = trim and deepest > 0 and token_position == "last"
    attention_mask = batch.attention_mask
    if prefix is not None:
        ones = torch.ones((attention_mask.shape[0], prefix.length), dtype=attention_mask.dtype)
        attention_mask = torch.cat([ones.to(attention_mask.device), attention_mask], dim=1)
    inputs: dict[str, Any] = {"input_ids": batch.input_ids, "attention_mask": attention_mask}
    if _accepts(body, "position_ids"):
        inputs["position_ids"] = batch.position_ids
    if prefix is not None:
        inputs["past_key_values"], inputs["use_cache"] = prefix.cache, True
    elif _accepts(body, "use_cache"):
        inputs["use_cache"] = False
    trimmed: torch.Tensor | None = None
    compiling = compiled_blocks(blocks[: deepest - 1 if trim else deepest]) if compiled else nullcontext()
    with torch.inference_mode(), compiling, capturing(blocks, layers, trim=trim) as captured:
        try:
            body(**inputs)
        except _StopForward:
            pass
        except _ReachedTrimmedBlock as reached:
            trimmed = _block_at_last(blocks[deepest - 1], reached, attention_mask, last_real(batch.attention_mask))
        missing = [
            layer for layer in layers if layer not in captured and not (layer == deepest and trimmed is not None)
        ]
        if missing:
            raise JobFailed("unsupported_model", f"the model never produced layers {missing}")
        pooled = [
            trimmed.float()
            if layer == deepest and trimmed is not None
            else pool(
                captured[layer],
                batch.attention_mask,
                token_position,
                prefix.sums[layer] if prefix is not None else None,
                prefix.length if prefix is not None else 0,
            )
            for layer in layers
        ]
        return torch.stack(pooled, dim=1)


@dataclass(frozen=True)
class Shortcuts:
    """When the shortcuts pay (each adds work of its own: a forward pass of the prefix and
    a copy of its cache; a few gathers): a prefix is shared when it is at least `min_prefix`
    tokens long and saves at least `min_prefix_saving` tokens (its length × (rows − 1)); the
    deepest block is trimmed when the batch (after any prefix) is at least `min_trim_width`
    tokens wide."""

    min_prefix: int = 8
    min_prefix_saving: int = 256
    min_trim_width: int = 8


DEFAULT_SHORTCUTS = Shortcuts()
NO_SHORTCUTS = Shortcuts(min_prefix=1 << 62, min_prefix_saving=1 << 62, min_trim_width=1 << 62)


def shared_prefix_length(token_ids: Sequence[Sequence[int]]) -> int:
    """How many first tokens every text has in common, leaving each at least one of its own
    (whose state `last` reads)."""
    common = os.path.commonprefix([list(ids) for ids in token_ids])
    return min(len(common), min(len(ids) for ids in token_ids) - 1)


def read_texts(
    model: Any,
    token_ids: Sequence[Sequence[int]],
    layers: Sequence[int],
    token_position: TokenPosition,
    *,
    pad_id: int,
    device: str,
    padding_side: str = "right",
    shortcuts: Shortcuts = DEFAULT_SHORTCUTS,
    compiled: bool = False,
) -> torch.Tensor:
    """Pooled hidden states of one batch of texts, (texts, len(layers), hidden) float32, with
    the shortcuts that pay for this batch (a shared prefix, the trimmed deepest block) on a
    `trimmable` model: the same vectors as `read_layers` on the whole texts."""
    usable = max(layers) > 0 and trimmable(model)
    prefix_length = shared_prefix_length(token_ids) if usable and len(token_ids) > 1 else 0
    if prefix_length < shortcuts.min_prefix or prefix_length * (len(token_ids) - 1) < shortcuts.min_prefix_saving:
        prefix_length = 0
    rest = [ids[prefix_length:] for ids in token_ids]
    trim = usable and token_position == "last" and max(len(ids) for ids in rest) >= shortcuts.min_trim_width
    prefix = run_prefix(model, token_ids[0][:prefix_length], layers, len(token_ids), device) if prefix_length else None
    batch = pad(rest, pad_id, padding_side, device, start=prefix_length)
    return read_layers(model, batch, layers, token_position, trim=trim, prefix=prefix, compiled=compiled)


DEFAULT_MAX_PADDING = 0.05
# A batch has a fixed cost besides its tokens (every block's weights streamed through the
# cache once, products too small to keep the cores busy): about 50 ms on SmolLM2 on two
# cores, the time of ~70 tokens. Padding of fewer tokens than that costs less than a batch
# of its own.
DEFAULT_FREE_PADDING = 64


def plan_batches(
    lengths: Sequence[int],
    token_budget: int,
    max_batch_size: int,
    max_padding: float = DEFAULT_MAX_PADDING,
    free_padding: int = DEFAULT_FREE_PADDING,
) -> list[list[int]]:
    """Indices grouped longest first, each batch's padded size (rows × longest) within the
    token budget, and at most `max_padding` of its padded size or `free_padding` tokens
    (whichever is more) padding: similar lengths share a batch, a batch that would compute
    more padding is closed instead, and the few longest or shortest texts join their
    neighbours rather than run as a small batch of their own."""
    order = sorted(range(len(lengths)), key=lambda index: lengths[index], reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    real_tokens = 0
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]
        padded = longest * (len(current) + 1)
        if current and (
            padded > token_budget
            or len(current) >= max_batch_size
            or padded - real_tokens - lengths[index] > max(max_padding * padded, free_padding)
        ):
            batches.append(current)
            current, real_tokens = [], 0
        current.append(index)
        real_tokens += lengths[index]
    if current:
        batches.append(current)
    return batches
