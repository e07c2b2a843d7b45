"""The GGUF architectures (`general.architecture`, in llama.cpp's names) transformers 5.23
loads, copied because the gateway never imports transformers; tests compare them with
transformers' own lists and with what it does."""

# transformers' newer GGUF reader (`transformers.integrations.gguf.GGUF_CONFIG_ARCHS`) takes these,
TRANSFORMERS_GGUF_NEW_READER_ARCHITECTURES = frozenset({"lfm2", "qwen35", "qwen35moe"})
# and its legacy reader (`GGUF_SUPPORTED_ARCHITECTURES` of
# `transformers.modeling_gguf_pytorch_utils`) the others it lists, less its `general` and
# `tokenizer` sections, which are not architectures, and `deci`, which names no model type
# transformers 5.23 has;
TRANSFORMERS_GGUF_LEGACY_ARCHITECTURES = frozenset(
    {
        "bloom",
        "falcon",
        "gemma2",
        "gemma3",
        "gemma4",
        "gpt2",
        "gpt_oss",
        "lfm2",
        "llama",
        "mamba",
        "minimax_m2",
        "mistral",
        "nemotron",
        "phi3",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "stablelm",
        "starcoder2",
        "t5",
        "umt5",
    }
)
# which first renames these llama.cpp names to its own.
TRANSFORMERS_GGUF_RENAMES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
    "t5encoder": "t5",
}
TRANSFORMERS_GGUF_ARCHITECTURES = (
    TRANSFORMERS_GGUF_NEW_READER_ARCHITECTURES
    | TRANSFORMERS_GGUF_LEGACY_ARCHITECTURES
    | frozenset(TRANSFORMERS_GGUF_RENAMES)
)


def transformers_loads(architecture: str) -> bool:
    """Whether transformers 5.23 loads GGUF files of this llama.cpp architecture."""
    return architecture in TRANSFORMERS_GGUF_ARCHITECTURES


def transformers_model_type(architecture: str) -> str:
    """transformers' `model_type` for a llama.cpp architecture it loads."""
    return TRANSFORMERS_GGUF_RENAMES.get(architecture, architecture)
