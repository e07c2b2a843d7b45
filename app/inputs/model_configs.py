"""A model's `config.json` as plain JSON, and the bounds on its sizes: the gateway checks them
when a model is registered and the worker again before it builds anything, so an absurd
config is refused before it can make a worker allocate without limit."""

import json
from typing import Any

# Config keys that name the same thing across architectures (Llama/BERT, GPT-2, T5-style).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model")

# Bounds on a config's sizes: well above every published model (the largest have ~130
# layers, width ~25k, vocabularies ~260k, contexts ~10M), far below what would make a
# worker build a model it cannot hold. A key may hold a whole number, a list of them (one
# per layer) or null.
MAX_LAYERS = 1_024
MAX_HIDDEN_SIZE = 65_536
MAX_INTERMEDIATE_SIZE = 262_144
MAX_ATTENTION_HEADS = 1_024
MAX_VOCAB_SIZE = 1_048_576
MAX_POSITION_EMBEDDINGS = 16_777_216
MAX_EXPERTS = 1_024
# Layers times experts per layer: the number of expert blocks a model builds (DeepSeek-V3
# has 61 x 256).
MAX_EXPERT_BLOCKS = 65_536

CONFIG_SIZE_BOUNDS: dict[str, tuple[int, str]] = {
    **dict.fromkeys(
        (
            "num_hidden_layers",
            "n_layer",
            "n_layers",
            "num_layers",
            "num_decoder_layers",
            "num_encoder_layers",
            "encoder_layers",
            "decoder_layers",
        ),
        (MAX_LAYERS, "MAX_LAYERS"),
    ),
    **dict.fromkeys(
        (
            "hidden_size",
            "n_embd",
            "d_model",
            "embedding_size",
            "word_embed_proj_dim",
            "head_dim",
            "d_kv",
            "kv_channels",
            "kv_lora_rank",
            "q_lora_rank",
            "qk_rope_head_dim",
            "qk_nope_head_dim",
            "v_head_dim",
        ),
        (MAX_HIDDEN_SIZE, "MAX_HIDDEN_SIZE"),
    ),
    **dict.fromkeys(
        (
            "intermediate_size",
            "n_inner",
            "ffn_dim",
            "d_ff",
            "ffn_hidden_size",
            "encoder_ffn_dim",
            "decoder_ffn_dim",
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
            "intermediate_size_mlp",
        ),
        (MAX_INTERMEDIATE_SIZE, "MAX_INTERMEDIATE_SIZE"),
    ),
    **dict.fromkeys(
        (
            "num_attention_heads",
            "n_head",
            "num_heads",
            "num_key_value_heads",
            "num_kv_heads",
            "n_head_kv",
            "multi_query_group_num",
            "encoder_attention_heads",
            "decoder_attention_heads",
        ),
        (MAX_ATTENTION_HEADS, "MAX_ATTENTION_HEADS"),
    ),
    **dict.fromkeys(("vocab_size", "padded_vocab_size", "type_vocab_size"), (MAX_VOCAB_SIZE, "MAX_VOCAB_SIZE")),
    **dict.fromkeys(
        ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length", "max_seq_len"),
        (MAX_POSITION_EMBEDDINGS, "MAX_POSITION_EMBEDDINGS"),
    ),
    **dict.fromkeys(
        (
            "num_experts",
            "num_local_experts",
            "n_routed_experts",
            "n_shared_experts",
            "moe_num_experts",
            "num_experts_per_tok",
        ),
        (MAX_EXPERTS, "MAX_EXPERTS"),
    ),
}
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


class UnreasonableConfig(ValueError):
    """A config value outside what this service accepts; `key` is its dotted path."""

    def __init__(self, key: str, message: str, bound: int | None = None) -> None:
        super().__init__(f"config.json: {key} {message}")
        self.key = key
        self.bound = bound


def _whole_numbers(value: Any) -> list[int] | None:
    """The non-negative whole numbers a size key holds (one, or one per layer), or None
    when it holds anything else. Null holds none."""
    values = value if isinstance(value, list) else [] if value is None else [value]
    if all(isinstance(item, int) and not isinstance(item, bool) and item >= 0 for item in values):
        return values
    return None


def _largest(config: dict[str, Any], keys: tuple[str, ...]) -> int:
    return max((max(_whole_numbers(config.get(key)) or [0], default=0) for key in keys), default=0)


def check_config_sizes(config: dict[str, Any]) -> None:
    """Raise `UnreasonableConfig` naming the first size key (at any depth: multimodal models
    nest a `text_config`) that is not a non-negative whole number or passes its bound. The
    walk is a loop, not recursion, so a deeply nested config cannot exhaust the stack."""
    pending: list[tuple[str, dict[str, Any]]] = [("", config)]
    while pending:
        prefix, section = pending.pop()
        for key, value in section.items():
            path = f"{prefix}{key}"
            if key not in CONFIG_SIZE_BOUNDS:
                if isinstance(value, dict):
                    pending.append((f"{path}.", value))
                continue
            bound, name = CONFIG_SIZE_BOUNDS[key]
            numbers = _whole_numbers(value)
            if numbers is None:
                shown = json.dumps(value)[:40]
                raise UnreasonableConfig(path, f"must be a non-negative whole number (or a list of them), not {shown}")
            if numbers and max(numbers) > bound:
                raise UnreasonableConfig(
                    path, f"is {max(numbers)}, over this service's bound of {bound:,} ({name})", bound
                )
        layers, experts = _largest(section, LAYER_COUNT_KEYS), _largest(section, EXPERT_COUNT_KEYS)
        if layers * experts > MAX_EXPERT_BLOCKS:
            raise UnreasonableConfig(
                f"{prefix}num_experts",
                f"times the layer count is {layers * experts:,} expert blocks, over this service's bound of {MAX_EXPERT_BLOCKS:,} (MAX_EXPERT_BLOCKS)",
                MAX_EXPERT_BLOCKS,
            )


def parse_config(raw: bytes) -> dict[str, Any]:
    """A config.json's bytes as a JSON object, or `ValueError` saying why not (bad UTF-8 or
    JSON, nesting too deep to parse, a number too long to convert, not an object)."""
    try:
        config = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"config.json is not valid JSON: {str(exc)[:200]}") from exc
    if not isinstance(config, dict):
        raise ValueError("config.json is not a JSON object")
    return config
