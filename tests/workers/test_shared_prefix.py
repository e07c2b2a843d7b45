"""The extraction shortcuts (workers/hidden_states.py): a prefix every text of a batch shares,
computed once, and the deepest block run at the last real tokens only. Each vector must equal
a direct Hugging Face forward pass on the text alone, under every prompt format."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from app.inputs.prompt_formats import render
from tests import tiny_models
from workers import hidden_states
from workers.hidden_states import NO_SHORTCUTS, Shortcuts, read_texts, shared_prefix_length, trimmable
from workers.prompts import prompt_strings

TEXTS = [
    "The city of Paris is in France.",
    "The city of Tokyo is in Japan.",
    "The city of Rome is in Italy, which is in Europe.",
    "Tokyo",
]
TEMPLATE = "Consider the following claim carefully: {text}\nTrue or false?"
PROMPT_FORMATS = ["raw", "chat", TEMPLATE]
TOLERANCE = 1e-5  # float32, as tests/workers/test_hidden_states.py
ALWAYS = Shortcuts(min_prefix=1, min_prefix_saving=0, min_trim_width=0)

SAVERS: dict[str, Callable[..., Path]] = {
    "llama": tiny_models.save_tiny_llama,
    "qwen2": tiny_models.save_tiny_qwen2,
    "gpt2": tiny_models.save_tiny_gpt2,
}


@pytest.fixture(scope="module", params=list(SAVERS))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = SAVERS[request.param](tmp_path_factory.mktemp(request.param), layers=3)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.chat_template = tiny_models.CHAT_TEMPLATE
    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval(), tokenizer


def token_ids(tokenizer: Any, prompt_format: str, texts: list[str]) -> list[list[int]]:
    prompts = prompt_strings(tokenizer, prompt_format, render(prompt_format, "text", texts))
    return [list(ids) for ids in tokenizer(prompts.strings, add_special_tokens=prompts.add_special_tokens)["input_ids"]]


def direct(model: Any, ids: list[int], layers: list[int], token_position: str) -> torch.Tensor:
    """The text alone through the whole model; the last block's output taken before the
    final norm (swapped out for the pass) as the layer convention says."""
    owner, name = (model.model, "norm") if hasattr(model, "model") else (model.transformer, "ln_f")
    norm = getattr(owner, name)
    setattr(owner, name, torch.nn.Identity())
    try:
        with torch.inference_mode():
            states = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    finally:
        setattr(owner, name, norm)
    rows = [states[layer][0].float() for layer in layers]
    return torch.stack([row[-1] if token_position == "last" else row.mean(dim=0) for row in rows])


@pytest.fixture
def shortcuts_taken(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Records each shortcut as it runs: ("prefix", its length), ("trim", rows)."""
    taken: list[tuple[str, int]] = []
    run_prefix, block_at_last = hidden_states.run_prefix, hidden_states._block_at_last

    def recording_prefix(model: Any, prefix_ids: Any, *args: Any) -> Any:
        taken.append(("prefix", len(prefix_ids)))
        return run_prefix(model, prefix_ids, *args)

    def recording_trim(block: Any, reached: Any, last: Any) -> torch.Tensor:
        taken.append(("trim", len(last.columns)))
        return block_at_last(block, reached, last)

    monkeypatch.setattr(hidden_states, "run_prefix", recording_prefix)
    monkeypatch.setattr(hidden_states, "_block_at_last", recording_trim)
    return taken


@pytest.mark.parametrize("token_position", ["last", "mean"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("prompt_format", PROMPT_FORMATS, ids=["raw", "chat", "template"])
def test_shortcut_vectors_equal_a_direct_forward_pass_on_each_text_alone(
    tiny: tuple[Any, Any],
    prompt_format: str,
    padding_side: str,
    token_position: str,
    shortcuts_taken: list[tuple[str, int]],
) -> None:
    model, tokenizer = tiny
    layers = [0, 1, 2, 3]
    ids = token_ids(tokenizer, prompt_format, TEXTS[:3])
    prefix = shared_prefix_length(ids)
    assert prefix >= (2 if prompt_format == "raw" else 5)  # "<s> The city of", the template's opening
    got = read_texts(
        model, ids, layers, token_position, pad_id=0, device="cpu", padding_side=padding_side, shortcuts=ALWAYS
    )
    assert ("prefix", prefix) in shortcuts_taken
    assert (("trim", 3) in shortcuts_taken) == (token_position == "last")
    for row, text_ids in enumerate(ids):
        expected = direct(model, text_ids, layers, token_position)
        torch.testing.assert_close(got[row], expected, atol=TOLERANCE, rtol=TOLERANCE, msg=f"text {row}")


def test_a_text_that_is_all_prefix_keeps_its_last_token_out_of_the_prefix(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    ids = token_ids(tokenizer, "raw", ["The city of Paris is in France.", "The city of Paris is in France. Yes."])
    assert shared_prefix_length(ids) == len(ids[0]) - 1
    got = read_texts(model, ids, [1, 3], "last", pad_id=0, device="cpu", shortcuts=ALWAYS)
    for row, text_ids in enumerate(ids):
        torch.testing.assert_close(got[row], direct(model, text_ids, [1, 3], "last"), atol=TOLERANCE, rtol=TOLERANCE)


def test_shortcuts_that_would_not_pay_are_not_taken(
    tiny: tuple[Any, Any], shortcuts_taken: list[tuple[str, int]]
) -> None:
    model, tokenizer = tiny
    read_texts(model, [[1, 5, 6, 7], [1, 5, 6, 8, 9]], [2], "last", pad_id=0, device="cpu")
    assert shortcuts_taken == []
    # a 5-token prefix shared by 3 texts saves 10 tokens: below the default's 256
    read_texts(model, token_ids(tokenizer, TEMPLATE, TEXTS[:3]), [2], "mean", pad_id=0, device="cpu")
    assert shortcuts_taken == []
    many = token_ids(tokenizer, TEMPLATE, [f"{text} {n}" for n in range(40) for text in TEXTS[:2]])
    read_texts(model, many, [2], "last", pad_id=0, device="cpu")
    assert [kind for kind, _ in shortcuts_taken] == ["prefix", "trim"]


def test_models_the_shortcuts_do_not_know_run_whole(tmp_path: Path, shortcuts_taken: list[tuple[str, int]]) -> None:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    bert_folder = tiny_models.save_tiny_bert(tmp_path / "bert")
    bert = AutoModel.from_pretrained(bert_folder).eval()
    sliding = Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=128,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=0,
        )
    ).eval()
    llama_folder = tiny_models.save_tiny_llama(tmp_path / "llama")
    flash_like = AutoModelForCausalLM.from_pretrained(llama_folder).eval()
    flash_like.config._attn_implementation = "flex_attention"
    assert not trimmable(bert) and not trimmable(sliding) and not trimmable(flash_like)
    ids = token_ids(AutoTokenizer.from_pretrained(bert_folder), TEMPLATE, TEXTS[:3])
    for model in (bert, sliding):
        whole = read_texts(model, ids, [1, 2], "last", pad_id=0, device="cpu", shortcuts=NO_SHORTCUTS)
        got = read_texts(model, ids, [1, 2], "last", pad_id=0, device="cpu", shortcuts=ALWAYS)
        torch.testing.assert_close(got, whole, atol=0.0, rtol=0.0)
    assert shortcuts_taken == []


@pytest.mark.slow
@pytest.mark.parametrize("token_position", ["last", "mean"])
@pytest.mark.parametrize("prompt_format", PROMPT_FORMATS, ids=["raw", "chat", "template"])
def test_smollm2_vectors_with_shortcuts_equal_a_direct_forward_pass(
    smollm2_gguf_model: Any,
    smollm2_gguf: Path,
    prompt_format: str,
    token_position: str,
    shortcuts_taken: list[tuple[str, int]],
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    layers = [0, 8, 16]
    ids = token_ids(tokenizer, prompt_format, TEXTS)
    got = read_texts(smollm2_gguf_model, ids, layers, token_position, pad_id=0, device="cpu", shortcuts=ALWAYS)
    if prompt_format != "raw":  # SmolLM2's tokenizer adds no <s>: raw texts share no first token
        assert shortcuts_taken[0] == ("prefix", shared_prefix_length(ids)) and shared_prefix_length(ids) > 5
    for row, text_ids in enumerate(ids):
        expected = direct(smollm2_gguf_model, text_ids, layers, token_position)
        scale = float(expected.abs().max())
        torch.testing.assert_close(got[row], expected, atol=1e-4 * scale, rtol=1e-4, msg=f"text {row}")
