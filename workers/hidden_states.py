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
- Packed rows: texts of different lengths share a row (`pack_rows`), each attending only to
  its own tokens (and the shared prefix) through a block-diagonal causal mask, its position
  ids starting afresh; a batch computes almost no padding whatever its lengths.
"""

import bisect
import collections
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
    """Token ids in rows, `attention_mask` marking real tokens (1) and pads (0). Without
    `segments` each row is one text; with it (packed rows) each token's text, an index into
    the batch's texts (-1 for pads), and `text_rows`/`text_last` each text's row and the
    column of its last token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor | None = None
    text_rows: torch.Tensor | None = None
    text_last: torch.Tensor | None = None


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


def _pack_groups(counts: Sequence[tuple[int, int]], width: int) -> list[tuple[tuple[int, ...], int]]:
    """Best-fit decreasing over (length, how many texts) pairs, longest first: each text goes
    into the row with the least room left that still holds it, else a new row. Rows that
    received the same lengths travel together, so the work grows with the distinct lengths,
    not with the texts. Out: (the lengths in a row, how many such rows)."""
    rooms: dict[int, list[list[Any]]] = {}  # room left → groups of identical rows [lengths, count]
    present: list[int] = []  # the keys of `rooms`, ascending

    def add(room: int, lengths: tuple[int, ...], count: int) -> None:
        if room not in rooms:
            rooms[room] = []
            bisect.insort(present, room)
        rooms[room].append([lengths, count])

    for length, count in counts:
        while count:
            at = bisect.bisect_left(present, length)
            if at == len(present):  # no row holds it: new rows, each as full as this length allows
                per_row = width // length
                if count // per_row:
                    add(width - per_row * length, (length,) * per_row, count // per_row)
                if count % per_row:
                    add(width - count % per_row * length, (length,) * (count % per_row), 1)
                break
            room = present[at]
            group = rooms[room][-1]
            taken = min(group[1], count)
            group[1] -= taken
            if not group[1]:
                rooms[room].pop()
                if not rooms[room]:
                    del rooms[room]
                    present.pop(at)
            add(room - length, (*group[0], length), taken)
            count -= taken
    return [(lengths, count) for groups in rooms.values() for lengths, count in groups]


def _length_counts(lengths: Sequence[int]) -> list[tuple[int, int]]:
    return sorted(collections.Counter(lengths).items(), reverse=True)


def packed_size(lengths: Sequence[int]) -> int:
    """Tokens a batch of these lengths computes packed into rows as wide as the longest
    (pads included): what `pack_rows` never exceeds, whatever width it picks."""
    width = max(lengths)
    return width * sum(count for _, count in _pack_groups(_length_counts(lengths), width))


def pack_rows(lengths: Sequence[int], key_cost: float = 0.0) -> tuple[int, list[list[int]]]:
    """(width, rows): the indices of `lengths` laid out in rows of `width` tokens, texts
    sharing a row where they fit (best-fit decreasing). The width is the cheapest from the
    longest length to twice it, counting `key_cost` (one query-key pair of attention, which
    every row computes over its whole width, relative to one token through a block's
    weights) and never computing more tokens than rows as wide as the longest text."""
    counts = _length_counts(lengths)
    longest = counts[0][0]
    narrowest = longest * sum(count for _, count in _pack_groups(counts, longest))
    best: tuple[float, int, list[tuple[tuple[int, ...], int]]] | None = None
    for width in sorted({longest + (longest * step) // 32 for step in range(33)}):
        groups = _pack_groups(counts, width)
        tokens = width * sum(count for _, count in groups)
        cost = tokens * (1 + key_cost * width)
        if tokens <= narrowest and (best is None or cost < best[0]):
            best = (cost, width, groups)
    assert best is not None  # the longest width is always a candidate
    _, width, groups = best
    indices: dict[int, collections.deque[int]] = collections.defaultdict(collections.deque)
    for index in sorted(range(len(lengths)), key=lambda index: lengths[index], reverse=True):
        indices[lengths[index]].append(index)
    rows = [[indices[length].popleft() for length in row] for row, count in groups for _ in range(count)]
    return width, rows


def pad_packed(
    token_ids: Sequence[Sequence[int]],
    rows: Sequence[Sequence[int]],
    width: int,
    pad_id: int,
    device: str,
    start: int = 0,
) -> Batch:
    """Texts laid out as `rows` (indices into `token_ids`) of `width` tokens, pads at each
    row's end; position ids count each text's tokens from `start` afresh."""
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    text_rows = torch.empty(len(token_ids), dtype=torch.long)
    text_last = torch.empty(len(token_ids), dtype=torch.long)
    for row, texts in enumerate(rows):
        column = 0
        for text in texts:
            ids = token_ids[text]
            span = slice(column, column + len(ids))
            input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
            position_ids[row, span] = torch.arange(start, start + len(ids))
            segments[row, span] = text
            column += len(ids)
            text_rows[text], text_last[text] = row, column - 1
    return Batch(
        _to_device(input_ids, device),
        _to_device((segments >= 0).long(), device),
        _to_device(position_ids, device),
        _to_device(segments, device),
        _to_device(text_rows, device),
        _to_device(text_last, device),
    )


def _packed_mask(batch: Batch, prefix_length: int, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The 4D mask of packed rows, (rows, 1, tokens, prefix + tokens): each token sees the
    prefix and the earlier tokens of its own text (a pad, the earlier pads of its row), as a
    boolean for SDPA, as 0 or the dtype's minimum to add to the scores for eager attention."""
    assert batch.segments is not None
    segments = batch.segments
    columns = torch.arange(segments.shape[1], device=segments.device)
    allowed = (segments[:, :, None] == segments[:, None, :]) & (columns[None, :, None] >= columns[None, None, :])
    if prefix_length:
        seen = torch.ones((*allowed.shape[:2], prefix_length), dtype=torch.bool, device=segments.device)
        allowed = torch.cat([seen, allowed], dim=2)
    if implementation == "sdpa":
        return allowed[:, None]
    zero = torch.zeros((), dtype=dtype, device=segments.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


def pool_packed(
    states: torch.Tensor,
    batch: Batch,
    token_position: TokenPosition,
    prefix_sum: torch.Tensor | None = None,
    prefix_length: int = 0,
) -> torch.Tensor:
    """`pool` for packed rows: (rows, tokens, hidden) → (texts, hidden), each text over its
    own tokens (`batch.segments`)."""
    assert batch.segments is not None and batch.text_rows is not None and batch.text_last is not None
    states = states.float()
    if token_position == "last":
        return states[batch.text_rows, batch.text_last]
    texts = batch.text_rows.shape[0]
    segments = batch.segments.reshape(-1)
    real = segments >= 0
    total = torch.zeros((texts, states.shape[-1]), dtype=states.dtype, device=states.device)
    total.index_add_(0, segments[real], states.reshape(-1, states.shape[-1])[real])
    count = torch.bincount(segments[real], minlength=texts).to(states.dtype).unsqueeze(1)
    if prefix_sum is not None:
        total, count = total + prefix_sum, count + prefix_length
    return total / count


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
    """(texts, heads, 1, head_dim) queries over (texts, kv_heads, keys, head_dim) keys, each
    query seeing the keys `key_mask` (texts, keys) marks (all at or before it: it is the
    text's last token); (texts, heads × head_dim) out."""
    repeats = query.shape[1] // keys.shape[1]
    if repeats > 1:
        keys, values = keys.repeat_interleave(repeats, dim=1), values.repeat_interleave(repeats, dim=1)
    # one query per text: plain matrix products (softmax in float32, as eager attention does)
    # beat a fused kernel's setup here
    scores = torch.matmul(query, keys.transpose(2, 3)) * scale
    scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    return torch.matmul(weights, values).transpose(1, 2).reshape(query.shape[0], -1)


@dataclass(frozen=True)
class _LastTokens:
    """Where each text's last token is, and what it attends to: its row (None: text i is
    row i), its column, and the keys it sees, (texts, cached + tokens) boolean."""

    rows: torch.Tensor | None
    columns: torch.Tensor
    keys: torch.Tensor

    @classmethod
    def of(cls, batch: Batch, prefix_length: int) -> "_LastTokens":
        if batch.segments is None:
            keys = batch.attention_mask.bool()
            return cls(None, last_real(batch.attention_mask), _after_prefix(keys, prefix_length))
        assert batch.text_rows is not None and batch.text_last is not None
        texts = torch.arange(batch.text_rows.shape[0], device=batch.segments.device)
        own = batch.segments[batch.text_rows] == texts[:, None]
        return cls(batch.text_rows, batch.text_last, _after_prefix(own, prefix_length))

    def row_of_each(self, rows: int, device: torch.device) -> torch.Tensor:
        return self.rows if self.rows is not None else torch.arange(rows, device=device)


def _after_prefix(keys: torch.Tensor, prefix_length: int) -> torch.Tensor:
    """(texts, tokens) key flags with a seen prefix of `prefix_length` keys in front."""
    if not prefix_length:
        return keys
    return torch.cat([torch.ones((keys.shape[0], prefix_length), dtype=torch.bool, device=keys.device), keys], dim=1)


def _block_at_last(block: Any, reached: _ReachedTrimmedBlock, last: _LastTokens) -> torch.Tensor:
    """The block's output at each text's last token, (texts, hidden): keys and values for
    every token (appended to the block's cache layer, if any), everything else at the last
    tokens only."""
    arguments = _signature(type(block)).bind(block, *reached.args_, **reached.kwargs).arguments
    hidden = arguments["hidden_states"]
    cache = arguments.get("past_key_values")
    batch, tokens, _ = hidden.shape
    rows = last.row_of_each(batch, hidden.device)
    texts = rows.shape[0]
    residual = hidden[rows, last.columns]

    def per_text(tensor: torch.Tensor) -> torch.Tensor:  # (rows, …) → (texts, …)
        return tensor if last.rows is None else tensor[last.rows]

    if type(block).__name__ in GPT2_STYLE_BLOCKS:
        attention: Any = block.attn
        query, keys, values = attention.c_attn(block.ln_1(hidden)).split(attention.split_size, dim=2)
        query = query[rows, last.columns].view(texts, 1, -1, attention.head_dim).transpose(1, 2)
        keys = keys.view(batch, tokens, -1, attention.head_dim).transpose(1, 2)
        values = values.view(batch, tokens, -1, attention.head_dim).transpose(1, 2)
        if cache is not None:
            keys, values = cache.update(keys, values, attention.layer_idx)
        attended = _attend_at_last(query, per_text(keys), per_text(values), last.keys, attention.scaling)
        hidden_last = residual + attention.c_proj(attended)
        return hidden_last + block.mlp(block.ln_2(hidden_last))
    attention = block.self_attn
    head_dim = attention.head_dim
    normed = block.input_layernorm(hidden)
    keys = attention.k_proj(normed).view(batch, tokens, -1, head_dim).transpose(1, 2)
    values = attention.v_proj(normed).view(batch, tokens, -1, head_dim).transpose(1, 2)
    query = attention.q_proj(normed[rows, last.columns]).view(texts, 1, -1, head_dim).transpose(1, 2)
    cos, sin = (part.expand(batch, -1, -1) for part in arguments["position_embeddings"])
    rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb
    query, _ = rotate(query, query, cos[rows, last.columns].unsqueeze(1), sin[rows, last.columns].unsqueeze(1))
    _, keys = rotate(keys, keys, cos, sin)
    if cache is not None:
        keys, values = cache.update(keys, values, attention.layer_idx)
    attended = _attend_at_last(query, per_text(keys), per_text(values), last.keys, attention.scaling)
    hidden_last = residual + attention.o_proj(attended)
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
    prefix_length = prefix.length if prefix is not None else 0
    if batch.segments is not None:
        embeddings = body.get_input_embeddings().weight
        attention_mask = _packed_mask(batch, prefix_length, body.config._attn_implementation, embeddings.dtype)
    else:
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
            trimmed = _block_at_last(blocks[deepest - 1], reached, _LastTokens.of(batch, prefix_length))
        missing = [
            layer for layer in layers if layer not in captured and not (layer == deepest and trimmed is not None)
        ]
        if missing:
            raise JobFailed("unsupported_model", f"the model never produced layers {missing}")

        def pooled(layer: int) -> torch.Tensor:
            if layer == deepest and trimmed is not None:
                return trimmed.float()
            prefix_sum = prefix.sums[layer] if prefix is not None else None
            if batch.segments is not None:
                return pool_packed(captured[layer], batch, token_position, prefix_sum, prefix_length)
            return pool(captured[layer], batch.attention_mask, token_position, prefix_sum, prefix_length)

        return torch.stack([pooled(layer) for layer in layers], dim=1)


@dataclass(frozen=True)
class Shortcuts:
    """When the shortcuts pay (each adds work of its own: a forward pass of the prefix and
    a copy of its cache; a few gathers): a prefix is shared when it is at least `min_prefix`
    tokens long and saves at least `min_prefix_saving` tokens (its length × (rows − 1)); the
    deepest block is trimmed when the batch (after any prefix) is at least `min_trim_width`
    tokens wide; with `pack`, texts share rows (`pack_rows`)."""

    min_prefix: int = 8
    min_prefix_saving: int = 256
    min_trim_width: int = 8
    pack: bool = True


DEFAULT_SHORTCUTS = Shortcuts()
NO_SHORTCUTS = Shortcuts(min_prefix=1 << 62, min_prefix_saving=1 << 62, min_trim_width=1 << 62, pack=False)


def packs(model: Any, shortcuts: Shortcuts = DEFAULT_SHORTCUTS) -> bool:
    """Whether `read_texts` packs texts into shared rows for this model: batches for it are
    planned with `plan_batches(..., packed=True)`."""
    return shortcuts.pack and trimmable(model)


def key_cost(model: Any) -> float:
    """One query-key pair of attention (4 × hidden FLOPs) relative to one token through a
    block's weights (2 FLOPs a weight, the first block's linear layers counted)."""
    from transformers.pytorch_utils import Conv1D

    block = find_blocks(model)[0]
    weights = sum(module.weight.numel() for module in block.modules() if isinstance(module, torch.nn.Linear | Conv1D))
    hidden = int(backbone(model).config.hidden_size)  # GPT-2's n_embd, by its attribute map
    return 2 * hidden / weights if weights else 0.0


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
    the shortcuts that pay for this batch (a shared prefix, the trimmed deepest block, packed
    rows) on a `trimmable` model: the same vectors as `read_layers` on the whole texts, each
    padded in a row of its own."""
    known = trimmable(model)
    usable = max(layers) > 0 and known
    prefix_length = shared_prefix_length(token_ids) if usable and len(token_ids) > 1 else 0
    if prefix_length < shortcuts.min_prefix or prefix_length * (len(token_ids) - 1) < shortcuts.min_prefix_saving:
        prefix_length = 0
    rest = [ids[prefix_length:] for ids in token_ids]
    trim = usable and token_position == "last" and max(len(ids) for ids in rest) >= shortcuts.min_trim_width
    if shortcuts.pack and known:  # `packs`, its answer on trimmable already in hand
        width, rows = pack_rows([len(ids) for ids in rest], key_cost(model))
        batch = pad_packed(rest, rows, width, pad_id, device, start=prefix_length)
    else:
        batch = pad(rest, pad_id, padding_side, device, start=prefix_length)
    rows_count = batch.input_ids.shape[0]
    prefix = run_prefix(model, token_ids[0][:prefix_length], layers, rows_count, device) if prefix_length else None
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
    *,
    packed: bool = False,
) -> list[list[int]]:
    """Indices grouped longest first, each batch's padded size (rows × longest) within the
    token budget, and at most `max_padding` of its padded size or `free_padding` tokens
    (whichever is more) padding: similar lengths share a batch, a batch that would compute
    more padding is closed instead, and the few longest or shortest texts join their
    neighbours rather than run as a small batch of their own. With `packed` (texts sharing
    rows, `read_texts` on a model that `packs`), padding hardly arises: a batch is closed
    only by the row limit (`max_batch_size` texts) and the budget, on its `packed_size`."""
    order = sorted(range(len(lengths)), key=lambda index: lengths[index], reverse=True)
    if packed:
        return _plan_packed(lengths, order, token_budget, max_batch_size)
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


def _plan_packed(
    lengths: Sequence[int], order: Sequence[int], token_budget: int, max_batch_size: int
) -> list[list[int]]:
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # rows of one text each bound the packed size from above: pack only near the budget
        if current and (
            len(current) >= max_batch_size
            or (
                lengths[current[0]] * (len(current) + 1) > token_budget
                and packed_size([lengths[held] for held in current] + [lengths[index]]) > token_budget
            )
        ):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches
