"""SmolLM2-135M-Instruct, a real instruction-tuned decoder, labels multiple-choice questions
itself as a direct computation says: the prompt alone through the model loaded by
transformers from its GGUF file, each answer letter scored as the continuation ` A`, ` B`, …
after the raw prompt, or as the assistant's first token `A`, `B`, … after its chat template."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.inputs.datasets import CHOICE_LETTERS, format_multiple_choice
from tests.conftest import ROOT, SHARED_DATA, require
from workers.labelling import self_label
from workers.model_loading import LoadedModel

QUESTIONS = 24
# Below this gap between the two best letters' log-probabilities, float32 rounding in a padded
# batch may order them either way.
TIE_GAP = 1e-4


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path, smollm2_gguf_model: Any) -> LoadedModel:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return LoadedModel("mdl_smollm2", smollm2_gguf_model, tokenizer, 0, 0, True)


def first_rows(path: Path) -> list[dict[str, Any]]:
    require(path.is_file(), f"{path} is not here")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:QUESTIONS]]


def letter_log_probabilities(loaded: LoadedModel, row: dict[str, Any], prompt_format: str) -> np.ndarray:
    """log P(letter | prompt) for each answer letter, from one forward pass of the prompt alone:
    ` A` after the raw prompt's `Answer:`; `A` after the chat template's `assistant` line.
    Each letter must be a single token for this to be the whole continuation's probability,
    which the test checks."""
    question = format_multiple_choice(row["question"], row["choices"])
    if prompt_format == "chat":
        turn = [{"role": "user", "content": question}]
        prompt = loaded.tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        special, separator = False, ""
    else:
        prompt, special, separator = question, True, " "
    prompt_ids = loaded.tokenizer(prompt, add_special_tokens=special)["input_ids"]
    with torch.inference_mode():
        log_probs = torch.log_softmax(loaded.model(torch.tensor([prompt_ids])).logits[0, -1].double(), dim=-1)
    scores = []
    for letter in CHOICE_LETTERS[: len(row["choices"])]:
        ids = loaded.tokenizer(f"{prompt}{separator}{letter}", add_special_tokens=special)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids and len(ids) == len(prompt_ids) + 1
        scores.append(float(log_probs[ids[-1]]))
    return np.array(scores)


@pytest.mark.slow
@pytest.mark.parametrize("prompt_format", ["raw", "chat"])
@pytest.mark.parametrize(
    "questions", [SHARED_DATA / "mmlu" / "mmlu_test_sample.jsonl", ROOT / "data" / "city_questions.jsonl"]
)
def test_smollm2_self_labels_equal_a_direct_computation_of_each_answer_letter(
    smollm2: LoadedModel, questions: Path, prompt_format: str
) -> None:
    rows = first_rows(questions)
    labels = self_label(smollm2, rows, device="cpu", token_budget=4096, max_batch_size=16, prompt_format=prompt_format)
    for index, row in enumerate(rows):
        scores = letter_log_probabilities(smollm2, row, prompt_format)
        best, runner_up = np.sort(scores)[::-1][:2]
        if best - runner_up > TIE_GAP:
            assert labels.chosen[index] == int(np.argmax(scores)), row["question"]
        assert labels.labels[index] == int(labels.chosen[index] == row["answer"])
        over_letters = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
        np.testing.assert_allclose(
            labels.baselines["own_probability"][index], over_letters[labels.chosen[index]], rtol=1e-3, atol=1e-4
        )
