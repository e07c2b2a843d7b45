"""The model labels multiple-choice questions itself, and gives the baseline confidences
probes are compared with; checked against a direct forward pass."""

import json
from typing import Any

import numpy as np
import pytest
import scipy.stats
import torch

from app.inputs.datasets import format_multiple_choice
from tests import tiny_models
from tests.conftest import SHARED_DATA, require
from workers.errors import JobFailed
from workers.labelling import choice_baselines, letter_token_ids, p_true, self_label
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
    done: list[int] = []
    labels = self_label(loaded, mmlu_rows, device="cpu", token_budget=2048, max_batch_size=8, progress=done.append)
    assert done == sorted(done) and done[-1] == len(mmlu_rows)  # progress after every batch
    for index, row in enumerate(mmlu_rows):
        prompt = format_multiple_choice(row["question"], row["choices"])
        with torch.inference_mode():
            logits = loaded.model(**loaded.tokenizer(prompt, return_tensors="pt")).logits[0, -1]
        letters = letter_token_ids(loaded.tokenizer, len(row["choices"]))
        expected = int(torch.argmax(logits[letters]))
        assert labels.chosen[index] == expected
        assert labels.labels[index] == int(expected == row["answer"])
        np.testing.assert_allclose(
            labels.baselines["own_probability"][index],
            torch.softmax(logits[letters].double(), 0)[expected].item(),
            atol=1e-5,
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
            labels.baselines["own_probability"][index],
            torch.softmax(logits[letters].double(), 0)[expected].item(),
            atol=1e-5,
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
    assert np.all(labels.baselines["own_probability"] <= 1) and np.all(
        labels.baselines["own_probability"] >= 1 / choices - 1e-9
    )


def test_each_letter_gets_its_own_token(loaded: LoadedModel) -> None:
    ids = letter_token_ids(loaded.tokenizer, 4)
    assert len(set(ids)) == 4
    decoded = [loaded.tokenizer.decode([token]).strip() for token in ids]
    assert decoded == ["A", "B", "C", "D"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    from transformers import AutoModel, AutoTokenizer

    folder = tiny_models.save_tiny_bert(tmp_path_factory.mktemp("bert") / "bert")
    return LoadedModel("mdl_b", AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), 0, 0, False)


def test_an_encoder_cannot_label_multiple_choice(encoder: LoadedModel) -> None:
    with pytest.raises(JobFailed, match="causal language model"):
        self_label(
            encoder,
            [{"question": "q", "choices": ["a", "b"], "answer": 0}],
            device="cpu",
            token_budget=100,
            max_batch_size=4,
        )


def test_choice_baselines_are_the_top_probability_one_minus_normalised_entropy_and_the_top_two_margin() -> None:
    baselines = choice_baselines(np.array([0.2, 0.5, 0.3]))
    assert baselines["own_probability"] == pytest.approx(0.5)
    assert baselines["margin"] == pytest.approx(0.2)
    assert baselines["entropy"] == pytest.approx(1 - scipy.stats.entropy([0.2, 0.5, 0.3]) / np.log(3))
    assert choice_baselines(np.array([0.0, 1.0, 0.0, 0.0])) == {"own_probability": 1.0, "entropy": 1.0, "margin": 1.0}
    uniform = choice_baselines(np.full(4, 0.25))
    assert uniform["entropy"] == pytest.approx(0.0) and uniform["margin"] == 0.0


def test_entropy_and_margin_come_from_the_letters_softmax_of_a_direct_forward_pass(
    loaded: LoadedModel, mmlu_rows: list[dict[str, Any]]
) -> None:
    rows = mmlu_rows[:3]
    labels = self_label(loaded, rows, device="cpu", token_budget=2048, max_batch_size=8)
    for index, row in enumerate(rows):
        prompt = format_multiple_choice(row["question"], row["choices"])
        with torch.inference_mode():
            logits = loaded.model(**loaded.tokenizer(prompt, return_tensors="pt")).logits[0, -1]
        letters = [loaded.tokenizer(f"{prompt} {letter}")["input_ids"][-1] for letter in "ABCD"[: len(row["choices"])]]
        probabilities = sorted(torch.softmax(logits[letters].double(), 0).tolist(), reverse=True)
        expected_entropy = 1 - scipy.stats.entropy(probabilities) / np.log(len(letters))
        assert labels.baselines["entropy"][index] == pytest.approx(expected_entropy, abs=1e-6)
        assert labels.baselines["margin"][index] == pytest.approx(probabilities[0] - probabilities[1], abs=1e-6)


STATEMENTS = [
    "The city of Paris is in France.",
    "The city of Tokyo is in France.",
    "Fifty-one is larger than forty-nine.",
]


def test_p_true_renormalises_the_next_token_probabilities_of_true_and_false_after_the_question(
    loaded: LoadedModel,
) -> None:
    done: list[int] = []
    confidences = p_true(loaded, STATEMENTS, device="cpu", token_budget=2048, max_batch_size=2, progress=done.append)
    assert done == sorted(done) and done[-1] == len(STATEMENTS) and len(done) == -(-len(STATEMENTS) // 2)
    tokenizer = loaded.tokenizer
    for statement, confidence in zip(STATEMENTS, confidences, strict=True):
        prompt = f"{statement}\nIs this statement true or false?\nAnswer:"
        with torch.inference_mode():
            logits = loaded.model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1].double()
        # after `Answer:` each answer comes after a space, which this tokenizer joins to its first letter
        true, false = tokenizer.convert_tokens_to_ids(["▁T", "▁F"])
        probabilities = torch.softmax(logits, 0)
        assert confidence == pytest.approx((probabilities[true] / (probabilities[true] + probabilities[false])).item())


def test_under_chat_p_true_reads_the_assistants_first_token_and_under_a_template_the_question_fills_text(
    chat_loaded: LoadedModel,
) -> None:
    tokenizer = chat_loaded.tokenizer
    chat = p_true(chat_loaded, STATEMENTS[:2], device="cpu", token_budget=2048, max_batch_size=8, prompt_format="chat")
    template = p_true(
        chat_loaded, STATEMENTS[:2], device="cpu", token_budget=2048, max_batch_size=8, prompt_format="Quiz.\n{text}"
    )
    for index, statement in enumerate(STATEMENTS[:2]):
        question = f"{statement}\nIs this statement true or false?\nAnswer:"
        turn = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=True, return_dict=True)
        with torch.inference_mode():
            chat_logits = chat_loaded.model(torch.tensor([ids["input_ids"]])).logits[0, -1].double()
            template_logits = chat_loaded.model(**tokenizer(f"Quiz.\n{question}", return_tensors="pt")).logits[0, -1]
        true, false = tokenizer.convert_tokens_to_ids(["T", "F"])  # the assistant's turn starts on a new line
        assert chat[index] == pytest.approx(torch.sigmoid(chat_logits[true] - chat_logits[false]).item())
        true, false = tokenizer.convert_tokens_to_ids(["▁T", "▁F"])
        expected = torch.sigmoid(template_logits.double()[true] - template_logits.double()[false]).item()
        assert template[index] == pytest.approx(expected)


def test_p_true_needs_a_causal_language_model(encoder: LoadedModel) -> None:
    with pytest.raises(JobFailed, match="causal language model"):
        p_true(encoder, STATEMENTS, device="cpu", token_budget=100, max_batch_size=4)


def fake_context(loaded: LoadedModel) -> Any:
    """What `labels_for` reads of a job: a runtime whose resident model is `loaded`."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    runtime = SimpleNamespace(
        resident=lambda model, adapter: loaded,
        running=lambda loaded, model, adapter: nullcontext(),
        models=SimpleNamespace(device="cpu"),
        settings=SimpleNamespace(extraction_token_budget=2048, extraction_max_batch_size=8),
    )
    return SimpleNamespace(runtime=runtime, progress=lambda *args, **options: None)


def test_statements_get_p_true_from_a_causal_lm_and_no_baselines_from_an_encoder(
    loaded: LoadedModel, encoder: LoadedModel
) -> None:
    from types import SimpleNamespace

    from workers.training import labels_for

    rows = [{"text": text, "label": index % 2} for index, text in enumerate(STATEMENTS)]
    model: Any = SimpleNamespace(id="mdl_t")
    statements: Any = SimpleNamespace(kind="statements")
    causal = labels_for(fake_context(loaded), model, None, statements, rows, "raw")
    assert list(causal.baselines) == ["p_true"] and causal.baseline is None
    np.testing.assert_allclose(
        causal.baselines["p_true"], p_true(loaded, STATEMENTS, device="cpu", token_budget=2048, max_batch_size=8)
    )
    assert causal.y.tolist() == [0, 1, 0]
    assert labels_for(fake_context(encoder), model, None, statements, rows, "raw").baselines == {}
