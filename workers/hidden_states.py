"""Reading hidden states out of a transformers model, exactly as docs/concepts.md#hidden-states defines them.

- Layer 0 is the input of the first block (the embedding output); layer i is the output of
  block i, *before* any final norm — also for the last block, where Hugging Face's own
  `hidden_states[-1]` is already normed for Llama, Qwen2 and GPT-2 (not for BERT, whose
  blocks end in their own LayerNorm).
- The forward pass stops right after the deepest requested block (a hook raises), so later
  blocks, the final norm and the LM head never run.
- `last` is the last real (non-pad) token, `mean` the mean over real tokens; position ids
  are derived from the attention mask, so padding on either side gives the same vectors.
"""

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from workers.errors import JobFailed

TokenPosition = str  # "last" | "mean"


class _StopForward(Exception):
    """Raised by the hook on the deepest requested block: nothing after it needs to run."""


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


@contextmanager
def capturing(blocks: torch.nn.ModuleList, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Hooks that store each requested layer's (batch, tokens, hidden) states and stop the
    forward pass after the deepest one."""
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)
    handles = []

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
        handles.append(blocks[layer - 1].register_forward_hook(after_block(layer), with_kwargs=True))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def pool(states: torch.Tensor, attention_mask: torch.Tensor, token_position: TokenPosition) -> torch.Tensor:
    """(batch, tokens, hidden) → (batch, hidden), over real tokens only, in float32."""
    states = states.float()
    if token_position == "last":
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last_real = (attention_mask * positions).argmax(dim=1)
        return states[torch.arange(states.shape[0], device=states.device), last_real]
    weights = attention_mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(dim=1) / weights.sum(dim=1)


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor


def pad(token_ids: Sequence[Sequence[int]], pad_id: int, padding_side: str, device: str) -> Batch:
    width = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        span = slice(width - len(ids), width) if padding_side == "left" else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, span] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return Batch(input_ids.to(device), attention_mask.to(device), position_ids.to(device))


def _accepts(module: Any, argument: str) -> bool:
    return argument in inspect.signature(module.forward).parameters


def read_layers(model: Any, batch: Batch, layers: Sequence[int], token_position: TokenPosition) -> torch.Tensor:
    """Pooled hidden states of one padded batch: (batch, len(layers), hidden), float32."""
    blocks = find_blocks(model)
    body = backbone(model)
    inputs: dict[str, Any] = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if _accepts(body, "position_ids"):
        inputs["position_ids"] = batch.position_ids
    if _accepts(body, "use_cache"):
        inputs["use_cache"] = False
    with torch.inference_mode(), capturing(blocks, layers) as captured:
        try:
            body(**inputs)
        except _StopForward:
            pass
    missing = [layer for layer in layers if layer not in captured]
    if missing:
        raise JobFailed("unsupported_model", f"the model never produced layers {missing}")
    return torch.stack([pool(captured[layer], batch.attention_mask, token_position) for layer in layers], dim=1)


DEFAULT_MAX_PADDING = 0.1


def plan_batches(
    lengths: Sequence[int], token_budget: int, max_batch_size: int, max_padding: float = DEFAULT_MAX_PADDING
) -> list[list[int]]:
    """Indices grouped longest first, each batch's padded size (rows × longest) within the
    token budget, and at most `max_padding` of its padded size padding: similar lengths share
    a batch, and a batch that would compute more padding than that is closed instead."""
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
            or padded - real_tokens - lengths[index] > max_padding * padded
        ):
            batches.append(current)
            current, real_tokens = [], 0
        current.append(index)
        real_tokens += lengths[index]
    if current:
        batches.append(current)
    return batches
