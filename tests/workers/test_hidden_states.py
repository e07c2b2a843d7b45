"""Hidden-state exactness (docs/concepts.md#hidden-states): every vector equals a direct Hugging Face forward pass on the text alone."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import tiny_models
from workers.hidden_states import find_blocks, pad, plan_batches, read_layers

TEXTS = [
    "The city of Paris is in France.",
    "Tokyo",
    "Fifty-one is larger than forty-nine, which is larger than ten.",
    "A. B. C. D. Answer:",
]
TOLERANCE = 1e-5  # float32; padded batches reorder a few sums


def _unnormed_reference(model: Any) -> Any:
    """A copy of the model whose last `hidden_states` entry is the raw output of the last
    block: Llama and Qwen2 (`model.norm`) and GPT-2 (`transformer.ln_f`) norm it; BERT does not."""
    for owner, name in ((getattr(model, "model", None), "norm"), (getattr(model, "transformer", None), "ln_f")):
        if owner is not None and hasattr(owner, name):
            setattr(owner, name, torch.nn.Identity())
    return model


ARCHITECTURES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "llama": (tiny_models.save_tiny_llama, "AutoModelForCausalLM"),
    "qwen2": (tiny_models.save_tiny_qwen2, "AutoModelForCausalLM"),
    "gpt2": (tiny_models.save_tiny_gpt2, "AutoModelForCausalLM"),
    "bert": (tiny_models.save_tiny_bert, "AutoModel"),
}


def load(folder: Path, auto_class: str) -> tuple[Any, Any]:
    import transformers

    model = getattr(transformers, auto_class).from_pretrained(folder, local_files_only=True).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


@pytest.fixture(scope="module", params=[*ARCHITECTURES, "minilm"])
def architecture(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, str]:
    if request.param == "minilm":
        return "minilm", tiny_models.minilm_folder(), "AutoModel"
    save, auto_class = ARCHITECTURES[request.param]
    return request.param, save(tmp_path_factory.mktemp(request.param)), auto_class


def reference_vectors(folder: Path, auto_class: str, text: str, layers: list[int], token_position: str) -> torch.Tensor:
    model, tokenizer = load(folder, auto_class)
    model = _unnormed_reference(model)
    with torch.inference_mode():
        encoded = tokenizer(text, return_tensors="pt")
        hidden_states = model(**encoded, output_hidden_states=True).hidden_states
    rows = [hidden_states[layer][0] for layer in layers]
    return torch.stack([row[-1] if token_position == "last" else row.mean(dim=0) for row in rows])


@pytest.mark.parametrize("token_position", ["last", "mean"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batched_vectors_equal_a_direct_forward_pass_on_each_text_alone(
    architecture: tuple[str, Path, str], token_position: str, padding_side: str
) -> None:
    name, folder, auto_class = architecture
    model, tokenizer = load(folder, auto_class)
    layers = list(range(len(find_blocks(model)) + 1))
    token_ids = [tokenizer(text)["input_ids"] for text in TEXTS]
    batch = pad(token_ids, tokenizer.pad_token_id or 0, padding_side, "cpu")
    got = read_layers(model, batch, layers, token_position)
    assert got.shape == (len(TEXTS), len(layers), model.config.hidden_size)
    for row, text in enumerate(TEXTS):
        expected = reference_vectors(folder, auto_class, text, layers, token_position)
        torch.testing.assert_close(got[row], expected, atol=TOLERANCE, rtol=TOLERANCE, msg=f"{name}: {text!r}")


def test_the_last_layer_is_taken_before_the_final_norm(tmp_path: Path) -> None:
    folder = tiny_models.save_tiny_llama(tmp_path / "llama")
    model, tokenizer = load(folder, "AutoModelForCausalLM")
    ids = tokenizer(TEXTS[0])["input_ids"]
    got = read_layers(model, pad([ids], 0, "right", "cpu"), [2], "last")[0, 0]
    with torch.inference_mode():
        normed_last = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
    assert not torch.allclose(got, normed_last, atol=1e-3)
    torch.testing.assert_close(model.model.norm(got), normed_last, atol=TOLERANCE, rtol=TOLERANCE)


def test_only_the_blocks_up_to_the_deepest_requested_layer_run(tmp_path: Path) -> None:
    folder = tiny_models.save_tiny_llama(tmp_path / "llama", layers=4)
    model, tokenizer = load(folder, "AutoModelForCausalLM")
    ran: list[str] = []
    for index, block in enumerate(model.model.layers):
        block.register_forward_hook(lambda *_, index=index: ran.append(f"block {index}"))
    model.model.norm.register_forward_hook(lambda *_: ran.append("final norm"))
    model.lm_head.register_forward_hook(lambda *_: ran.append("lm head"))
    read_layers(model, pad([tokenizer(TEXTS[0])["input_ids"]], 0, "right", "cpu"), [0, 2], "last")
    assert ran == ["block 0", "block 1"]
    ran.clear()
    read_layers(model, pad([tokenizer(TEXTS[0])["input_ids"]], 0, "right", "cpu"), [4], "mean")
    assert ran == ["block 0", "block 1", "block 2", "block 3"]  # nor the final norm, nor the LM head


def test_layer_zero_alone_runs_no_block(tmp_path: Path) -> None:
    folder = tiny_models.save_tiny_gpt2(tmp_path / "gpt2")
    model, tokenizer = load(folder, "AutoModelForCausalLM")
    ran: list[int] = []
    for index, block in enumerate(model.transformer.h):
        block.register_forward_hook(lambda *_, index=index: ran.append(index))
    read_layers(model, pad([tokenizer(TEXTS[0])["input_ids"]], 0, "right", "cpu"), [0], "last")
    assert ran == []


def padding_waste(lengths: list[int], batches: list[list[int]]) -> int:
    return sum(max(lengths[i] for i in batch) * len(batch) for batch in batches) - sum(lengths)


def test_batches_group_similar_lengths_within_the_token_budget() -> None:
    import random

    lengths = [random.Random(seed).randint(3, 60) for seed in range(400)]
    batches = plan_batches(lengths, token_budget=512, max_batch_size=64)
    assert sorted(index for batch in batches for index in batch) == list(range(len(lengths)))
    assert all(max(lengths[i] for i in batch) * len(batch) <= 512 for batch in batches)
    in_order = [list(range(start, min(start + 16, len(lengths)))) for start in range(0, len(lengths), 16)]
    assert padding_waste(lengths, batches) < 0.1 * padding_waste(lengths, in_order)


def test_no_batch_computes_more_padding_than_its_cap_even_on_a_long_tail_of_lengths() -> None:
    import random

    rng = random.Random(5)
    # most texts short, a long tail of longer ones: one token budget would batch the tail together
    lengths = [rng.randint(12, 20) for _ in range(900)] + [rng.randint(21, 200) for _ in range(100)]
    for cap in (0.0, 0.05, 0.1, 0.3):
        batches = plan_batches(lengths, token_budget=16_384, max_batch_size=256, max_padding=cap, free_padding=0)
        assert sorted(index for batch in batches for index in batch) == list(range(len(lengths)))
        for batch in batches:
            padded = max(lengths[i] for i in batch) * len(batch)
            assert padded - sum(lengths[i] for i in batch) <= cap * padded + 1e-9
        # by default a batch may also pad 64 tokens, whatever its size
        for batch in plan_batches(lengths, token_budget=16_384, max_batch_size=256, max_padding=cap):
            padded = max(lengths[i] for i in batch) * len(batch)
            assert padded - sum(lengths[i] for i in batch) <= max(cap * padded, 64)
    # with no cap worth the name, the same texts waste far more
    loose = plan_batches(lengths, token_budget=16_384, max_batch_size=256, max_padding=1.0)
    capped = plan_batches(lengths, token_budget=16_384, max_batch_size=256, max_padding=0.1)
    assert padding_waste(lengths, capped) < 0.5 * padding_waste(lengths, loose)


def test_the_few_longest_and_shortest_texts_join_a_batch_instead_of_running_alone() -> None:
    # 3 texts of 24 tokens, 520 of 20, 2 of 5 and 3 of 4: capped at 5% padding alone, the
    # longest run with one text of 20 and the shortest as batches of 2 and 3 rows
    lengths = [24] * 3 + [20] * 520 + [5] * 2 + [4] * 3
    strict = plan_batches(lengths, token_budget=16_384, max_batch_size=256, free_padding=0)
    assert [len(batch) for batch in strict] == [4, 256, 256, 7, 2, 3]
    batches = plan_batches(lengths, token_budget=16_384, max_batch_size=256)
    assert sorted(index for batch in batches for index in batch) == list(range(len(lengths)))
    assert [len(batch) for batch in batches] == [19, 256, 253]
    # the longest pad 16 texts of 20 by 4 tokens; the shortest pad 15 tokens to 20 twice and 16 thrice
    assert [lengths[i] for i in batches[0]] == [24] * 3 + [20] * 16
    assert [lengths[i] for i in batches[-1][-5:]] == [5, 5, 4, 4, 4]
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    assert padded - sum(lengths) == 16 * 4 + 15 * 2 + 16 * 3


def test_a_batch_never_exceeds_the_row_limit() -> None:
    assert [len(batch) for batch in plan_batches([3] * 10, token_budget=10_000, max_batch_size=4)] == [4, 4, 2]


def test_a_text_longer_than_the_budget_still_gets_its_own_batch() -> None:
    assert plan_batches([500, 10], token_budget=100, max_batch_size=8) == [[0], [1]]
