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


@pytest.fixture(scope="module")
def chat_loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_models.save_tiny_llama(
        tmp_path_factory.mktemp("chat-llama"), seed=3, chat_template=tiny_models.CHAT_TEMPLATE
    )
    return LoadedModel(
        "mdl_c", AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder), 0, 0, True
    )


def test_under_chat_the_chosen_letter_is_the_argmax_of_the_assistants_first_token(
    chat_loaded: LoadedModel, mmlu_rows: list[dict[str, Any]]
) -> None:
    tokenizer = chat_loaded.tokenizer
    labels = self_label(chat_loaded, mmlu_rows, device="cpu", token_budget=2048, max_batch_size=8, prompt_format="chat")
    for index, row in enumerate(mmlu_rows):
        turn = [{"role": "user", "content": format_multiple_choice(row["question"], row["choices"])}]
        ids = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=True, return_dict=True)
        with torch.inference_mode():
            logits = chat_loaded.model(torch.tensor([ids["input_ids"]])).logits[0, -1]
        # the assistant's turn starts on a new line, so a letter is its own token, with no space
        letters = tokenizer.convert_tokens_to_ids(list("ABCD"[: len(row["choices"])]))
        expected = int(torch.argmax(logits[letters]))
        assert labels.chosen[index] == expected
        assert labels.labels[index] == int(expected == row["answer"])
        np.testing.assert_allclose(
            labels.confidence[index], torch.softmax(logits[letters].double(), 0)[expected].item(), atol=1e-5
        )


def test_under_a_template_the_prompt_is_the_filled_template_and_the_letter_follows_its_last_word(
    loaded: LoadedModel, mmlu_rows: list[dict[str, Any]]
) -> None:
    template = "Question: {question}\nOptions:\n{choices}\nThe answer is"
    labels = self_label(loaded, mmlu_rows, device="cpu", token_budget=2048, max_batch_size=8, prompt_format=template)
    tokenizer = loaded.tokenizer
    for index, row in enumerate(mmlu_rows):
        lettered = "\n".join(f"{letter}. {choice}" for letter, choice in zip("ABCD", row["choices"], strict=False))
        prompt = f"Question: {row['question']}\nOptions:\n{lettered}\nThe answer is"
        with torch.inference_mode():
            logits = loaded.model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1]
        letters = [tokenizer(f"{prompt} {letter}")["input_ids"][-1] for letter in "ABCD"[: len(row["choices"])]]
        assert labels.chosen[index] == int(torch.argmax(logits[letters]))


def test_chat_on_a_tokenizer_without_a_chat_template_fails_naming_the_prompt_format(
    loaded: LoadedModel, mmlu_rows: list[dict[str, Any]]
) -> None:
    with pytest.raises(JobFailed) as failure:
        self_label(loaded, mmlu_rows[:2], device="cpu", token_budget=2048, max_batch_size=8, prompt_format="chat")
    assert failure.value.code == "no_chat_template" and failure.value.details["field"] == "prompt_format"


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
