"""Packed rows (workers/hidden_states.py): texts of different lengths sharing a row, each
attending only to its own tokens and starting its positions afresh. Every vector must equal a
direct Hugging Face forward pass on the text alone; packing must cost fewer tokens than
padding, never more."""

import itertools
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import tiny_models
from tests.workers.test_shared_prefix import TEXTS, TOLERANCE, direct, token_ids
from workers import hidden_states
from workers.hidden_states import Shortcuts, pack_rows, packed_size, packs, plan_batches, read_texts

SAVERS: dict[str, Callable[..., Path]] = {
    "llama": tiny_models.save_tiny_llama,
    "qwen2": tiny_models.save_tiny_qwen2,
    "gpt2": tiny_models.save_tiny_gpt2,
}
MORE_TEXTS = [
    *TEXTS,
    "Rome",
    "The river Nile flows north into the Mediterranean Sea.",
    "Fifty-one is larger than forty-nine.",
    "A. B. C. D. Answer:",
]


def lengths_of(rows: list[list[int]], lengths: list[int]) -> list[int]:
    return [sum(lengths[index] for index in row) for row in rows]


@pytest.mark.parametrize("key_cost", [0.0, 3e-4, 0.05])
def test_rows_hold_every_text_once_and_none_overflows_its_width(key_cost: float) -> None:
    rng = random.Random(3)
    for _ in range(50):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 300))]
        width, rows = pack_rows(lengths, key_cost)
        assert sorted(index for row in rows for index in row) == list(range(len(lengths)))
        assert max(lengths) <= width <= 2 * max(lengths)
        assert all(row and total <= width for row, total in zip(rows, lengths_of(rows, lengths), strict=True))
        # never more tokens than rows as wide as the longest text, themselves never more than padding
        assert width * len(rows) <= packed_size(lengths) <= max(lengths) * len(lengths)


def test_short_texts_fill_the_room_longer_ones_leave() -> None:
    width, rows = pack_rows([4, 3, 2, 1])
    assert width == 5
    assert sorted(sorted(row) for row in rows) == [[0, 3], [1, 2]]
    # padded, these would compute 16 tokens; as wide as the longest, 12 ([4], [3, 1], [2])
    assert packed_size([4, 3, 2, 1]) == 12


def test_the_cost_of_attention_over_wider_rows_is_weighed_against_the_padding_they_save() -> None:
    lengths = [6] * 4 + [4] * 4
    # 4 rows of 10 tokens (a 6 and a 4 each) against 8 rows of 6 (a 4 pads 2)
    assert pack_rows(lengths, key_cost=0.0)[0] == 10
    assert pack_rows(lengths, key_cost=0.1)[0] == 6


@pytest.fixture(
    scope="module",
    params=[(name, attention) for name in SAVERS for attention in ("sdpa", "eager")],
    ids=lambda param: "-".join(param),
)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, attention = request.param
    folder = SAVERS[name](tmp_path_factory.mktemp(name), layers=3)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.chat_template = tiny_models.CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, attn_implementation=attention)
    return model.eval(), tokenizer


@pytest.fixture
def packed_rows(monkeypatch: pytest.MonkeyPatch) -> list[list[list[int]]]:
    """The rows of each packed batch as `read_texts` lays them out."""
    seen: list[list[list[int]]] = []
    real = hidden_states.pad_packed

    def recording(token_ids: Any, rows: Any, *args: Any, **kwargs: Any) -> hidden_states.Batch:
        seen.append([list(row) for row in rows])
        return real(token_ids, rows, *args, **kwargs)

    monkeypatch.setattr(hidden_states, "pad_packed", recording)
    return seen


@pytest.mark.parametrize("token_position", ["last", "mean"])
@pytest.mark.parametrize("prompt_format", ["raw", "chat"])
@pytest.mark.parametrize("trim", [True, False], ids=["trimmed", "whole"])
def test_packed_vectors_equal_a_direct_forward_pass_on_each_text_alone(
    tiny: tuple[Any, Any], prompt_format: str, token_position: str, trim: bool, packed_rows: list[list[list[int]]]
) -> None:
    model, tokenizer = tiny
    assert packs(model)
    layers = [0, 1, 2, 3]
    ids = token_ids(tokenizer, prompt_format, MORE_TEXTS)
    shortcuts = Shortcuts(min_prefix=1, min_prefix_saving=0, min_trim_width=0 if trim else 1 << 62)
    got = read_texts(model, ids, layers, token_position, pad_id=0, device="cpu", shortcuts=shortcuts)
    [rows] = packed_rows
    assert any(len(row) > 1 for row in rows), "no row was shared: the test would not exercise packing"
    for index, text_ids in enumerate(ids):
        expected = direct(model, text_ids, layers, token_position)
        torch.testing.assert_close(got[index], expected, atol=TOLERANCE, rtol=TOLERANCE, msg=f"text {index}")


def test_a_model_packing_is_not_exact_for_pads_each_text_in_a_row_of_its_own(
    tmp_path: Path, packed_rows: list[list[list[int]]]
) -> None:
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(tiny_models.save_tiny_bert(tmp_path / "bert")).eval()
    assert not packs(bert)
    read_texts(bert, [[1, 5, 6, 7], [1, 5], [1, 2, 3]], [1], "last", pad_id=0, device="cpu")
    assert packed_rows == []


def test_packed_batches_are_closed_by_the_row_limit_and_the_budget_alone() -> None:
    rng = random.Random(11)
    lengths = [rng.randint(7, 34) for _ in range(2000)]
    batches = plan_batches(lengths, token_budget=16_384, max_batch_size=256, packed=True)
    assert sorted(index for batch in batches for index in batch) == list(range(len(lengths)))
    # longest first, every batch full but the last: no small batches of the longest or shortest
    assert [len(batch) for batch in batches] == [256] * 7 + [208]
    order = [index for batch in batches for index in batch]
    assert [lengths[index] for index in order] == sorted(lengths, reverse=True)
    tight = plan_batches(lengths, token_budget=2_000, max_batch_size=256, packed=True)
    assert all(packed_size([lengths[index] for index in batch]) <= 2_000 for batch in tight)
    # each batch as full as the budget allows: the next text would not have fitted
    for batch, after in itertools.pairwise(tight):
        assert packed_size([lengths[index] for index in [*batch, after[0]]]) > 2_000
    assert plan_batches([500, 10], token_budget=100, max_batch_size=8, packed=True) == [[0], [1]]


def test_a_run_of_whole_packed_batches_is_planned_into_the_same_batches_again() -> None:
    rng = random.Random(2)
    lengths = [rng.randint(3, 90) for _ in range(1500)]
    batches = plan_batches(lengths, token_budget=4_096, max_batch_size=128, packed=True)
    for start, stop in ((0, 3), (2, 5), (len(batches) - 2, len(batches))):
        run = [index for batch in batches[start:stop] for index in batch]
        replanned = plan_batches([lengths[index] for index in run], token_budget=4_096, max_batch_size=128, packed=True)
        assert [[run[index] for index in batch] for batch in replanned] == batches[start:stop]
