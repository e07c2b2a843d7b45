"""The model labels multiple-choice questions itself; checked against a direct forward pass."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.inputs.datasets import format_multiple_choice
from tests import tiny_models
from tests.conftest import SHARED_DATA, require
from workers.errors import JobFailed
from workers.labelling import letter_token_ids, self_label
from workers.model_loading import LoadedModel


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_models.save_tiny_llama(tmp_path_factory.mktemp("llama"), seed=3)
    return LoadedModel(
        "mdl_t", AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder), 0, 0, True
    )


@pytest.fixture(scope="module")
def mmlu_rows() -> list[dict[str, Any]]:
    path = SHARED_DATA / "mmlu" / "mmlu_test_sample.jsonl"
    require(path.is_file(), f"{path} is not here")
    return [json.loads(line) for line in path.read_text().splitlines()[:40]]


def test_the_chosen_letter_is_the_argmax_of_a_direct_forward_pass(
    loaded: LoadedModel, mmlu_rows: list[dict[str, Any]]
) -> None:
    labels = self_label(loaded, mmlu_rows, device="cpu", token_budget=2048, max_batch_size=8)
    for index, row in enumerate(mmlu_rows):
        prompt = format_multiple_choice(row["question"], row["choices"])
        with torch.inference_mode():
            logits = loaded.model(**loaded.tokenizer(prompt, return_tensors="pt")).logits[0, -1]
        letters = letter_token_ids(loaded.tokenizer, len(row["choices"]))
        expected = int(torch.argmax(logits[letters]))
        assert labels.chosen[index] == expected
        assert labels.labels[index] == int(expected == row["answer"])
        np.testing.assert_allclose(
            labels.confidence[index], torch.softmax(logits[letters].double(), 0)[expected].item(), atol=1e-5
        )


def test_confidence_is_a_probability_no_smaller_than_uniform(
    loaded: LoadedModel, mmlu_rows: list[dict[str, Any]]
) -> None:
    labels = self_label(loaded, mmlu_rows, device="cpu", token_budget=2048, max_batch_size=8)
    choices = np.array([len(row["choices"]) for row in mmlu_rows])
    assert np.all(labels.confidence <= 1) and np.all(labels.confidence >= 1 / choices - 1e-9)


def test_each_letter_gets_its_own_token(loaded: LoadedModel) -> None:
    ids = letter_token_ids(loaded.tokenizer, 4)
    assert len(set(ids)) == 4
    decoded = [loaded.tokenizer.decode([token]).strip() for token in ids]
    assert decoded == ["A", "B", "C", "D"]


def test_an_encoder_cannot_label_multiple_choice(tmp_path: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    folder = tiny_models.save_tiny_bert(tmp_path / "bert")
    encoder = LoadedModel(
        "mdl_b", AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), 0, 0, False
    )
    with pytest.raises(JobFailed, match="causal language model"):
        self_label(
            encoder,
            [{"question": "q", "choices": ["a", "b"], "answer": 0}],
            device="cpu",
            token_budget=100,
            max_batch_size=4,
        )
