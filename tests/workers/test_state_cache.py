"""Hidden states for the content cache: truncation, out-of-memory splitting, cache spaces."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests import tiny_models
from workers import hidden_states, state_cache
from workers.model_loading import LoadedModel


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_models.save_tiny_llama(tmp_path_factory.mktemp("llama"))
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return LoadedModel("mdl_test", model, AutoTokenizer.from_pretrained(folder), 0, 0, True)


def test_texts_over_max_length_are_truncated_and_counted(loaded: LoadedModel) -> None:
    texts = ["short", "a much longer text that the tokenizer splits into many tokens"]
    full = [len(ids) for ids in loaded.tokenizer(texts)["input_ids"]]
    tokenized = state_cache.tokenize(loaded.tokenizer, texts, max_length=full[0] + 1)
    assert tokenized.truncated == [False, True]
    assert [len(ids) for ids in tokenized.token_ids] == [full[0], full[0] + 1]
    assert tokenized.token_ids[1][0] == loaded.tokenizer.bos_token_id


def test_an_out_of_memory_batch_is_split_and_retried(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    # one length, so that all twelve form one batch first
    texts = ["The city of Paris is in France."] * 12
    token_ids = state_cache.tokenize(loaded.tokenizer, texts, None).token_ids
    options: dict[str, Any] = {"device": "cpu", "token_budget": 10_000, "max_batch_size": 64}
    expected = state_cache.compute(loaded, token_ids, [1, 2], "last", **options)

    real_read_texts = hidden_states.read_texts
    batch_sizes: list[int] = []

    def no_room_for_more_than_three(model: Any, texts: Any, layers: Any, token_position: str, **options: Any) -> Any:
        batch_sizes.append(len(texts))
        if len(texts) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated: this machine has no GPU)")
        return real_read_texts(model, texts, layers, token_position, **options)

    monkeypatch.setattr(state_cache, "read_texts", no_room_for_more_than_three)
    got = state_cache.compute(loaded, token_ids, [1, 2], "last", **options)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert batch_sizes[0] == 12 and max(batch_sizes[1:]) <= 6


def test_a_single_text_that_does_not_fit_fails_the_job_clearly(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.errors import JobFailed

    def never_fits(*_: Any, **__: Any) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(state_cache, "read_texts", never_fits)
    with pytest.raises(JobFailed, match="lower max_length") as failure:
        state_cache.compute(loaded, [[1, 5, 6]], [1], "last", device="cpu", token_budget=100, max_batch_size=4)
    assert failure.value.code == "out_of_memory"


def test_the_cache_space_changes_with_everything_the_vectors_depend_on(tmp_path: Path) -> None:
    from app.registry.tables import Model

    base = {"source": "/m", "revision": None, "fingerprint": "f", "quantization": None, "dtype": "float32"}
    spaces = {
        state_cache.cache_space(Model(**base), None, "last", None),
        state_cache.cache_space(Model(**base | {"dtype": "bfloat16"}), None, "last", None),
        state_cache.cache_space(Model(**base | {"quantization": "8bit"}), None, "last", None),
        state_cache.cache_space(Model(**base | {"fingerprint": "g"}), None, "last", None),
        state_cache.cache_space(Model(**base), "adapter-sha", "last", None),
        state_cache.cache_space(Model(**base), None, "mean", None),
        state_cache.cache_space(Model(**base), None, "last", 32),
    }
    assert len(spaces) == 7
