"""Multiple-choice questions labelled by the model itself, and the model's own confidences
that probes are compared against (docs/concepts.md#labels, docs/concepts.md#baselines).

The prompt lists the choices with letters and ends with `Answer:` (under `raw`; under
`chat` that prompt is the user turn and the answer is the assistant's first token; a
template writes its own, docs/concepts.md#prompt-formats); the model's answer is the choice
whose letter has the highest logit at the prompt's end, and the label is 1 when it is the
gold one. From the softmax over the choices' letters only, the same pass keeps three
baseline confidences (`choice_baselines`). Statements get one, `p_true`: the model asked
whether the statement is true (`true_false_question`), P(True) against P(False).
"""

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app.inputs.datasets import CHOICE_LETTERS, TRUE_FALSE_ANSWERS, true_false_question
from app.inputs.prompt_formats import RAW, render
from workers.errors import JobFailed
from workers.hidden_states import pad, plan_batches
from workers.model_loading import LoadedModel
from workers.prompts import PromptStrings, prompt_strings

# the baseline confidences a multiple-choice labelling gives, by name (`choice_baselines`)
CHOICE_BASELINES = ("own_probability", "entropy", "margin")
P_TRUE = "p_true"


@dataclass(frozen=True)
class SelfLabels:
    chosen: np.ndarray  # index of the choice the model picked
    labels: np.ndarray  # 1 when that is the gold answer
    baselines: dict[str, np.ndarray]  # `choice_baselines` of every question, by name


def choice_baselines(probabilities: np.ndarray) -> dict[str, float]:
    """Three confidences in [0, 1] that the model's pick is right, from its softmax over the k
    choice letters: `own_probability`, the probability of its pick (the largest); `entropy`,
    1 − H/ln k with H = −Σ p ln p (0 ln 0 = 0), 1 when one letter takes all the mass and 0 when
    the k are equally likely; `margin`, the largest probability minus the second largest."""
    ordered = np.sort(np.asarray(probabilities, dtype=np.float64))[::-1]
    positive = ordered[ordered > 0]
    entropy = float(-(positive * np.log(positive)).sum())
    return {
        "own_probability": float(ordered[0]),
        "entropy": float(np.clip(1.0 - entropy / np.log(len(ordered)), 0.0, 1.0)),
        "margin": float(ordered[0] - ordered[1]),
    }


def letter_token_ids(tokenizer: Any, choice_count: int, prompt_format: str = RAW) -> list[int]:
    """The token each choice letter becomes when written right after a multiple-choice prompt
    under `prompt_format` (`answer_token_ids`)."""
    sample = render(prompt_format, "multiple_choice", [{"question": "Question?", "choices": ["option"] * choice_count}])
    strings = prompt_strings(tokenizer, prompt_format, sample)
    return answer_token_ids(tokenizer, strings.strings[0], strings.add_special_tokens, CHOICE_LETTERS[:choice_count])


def answer_token_ids(tokenizer: Any, prompt: str, add_special_tokens: bool, answers: Sequence[str]) -> list[int]:
    """The token each answer becomes when written right after `prompt`: among the tokens the
    prompt with the answer appended has beyond the prompt alone, the first that decodes to the
    start of the answer (the whole of it, for a letter). After a prompt ending in a word
    (`Answer:`) the answer comes after a space — large vocabularies merge the space into it,
    small ones may give it its own token; after one ending in whitespace (a chat template's
    `assistant` line) it comes alone. Two answers must start with different tokens."""
    separator = "" if prompt[-1:].isspace() else " "
    without = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    ids = []
    for answer in answers:
        with_answer = tokenizer(f"{prompt}{separator}{answer}", add_special_tokens=add_special_tokens)["input_ids"]
        first_new = next(
            (i for i, (a, b) in enumerate(zip(without, with_answer, strict=False)) if a != b), len(without)
        )
        token = next(
            (
                t
                for t in with_answer[first_new:]
                if (piece := tokenizer.decode([t]).strip()) and answer.startswith(piece)
            ),
            None,
        )
        if token is None:
            raise JobFailed("unsupported_model", f"the tokenizer gives no token for the answer {answer!r}")
        ids.append(token)
    if len(set(ids)) != len(ids):
        raise JobFailed(
            "unsupported_model", f"the tokenizer starts two of the answers {list(answers)} with the same token"
        )
    return ids


def _answer_logits(loaded: LoadedModel, token_ids: list[list[int]], device: str) -> torch.Tensor:
    """Next-token logits after each prompt. Left padding puts every prompt's last token in
    the last column, so the LM head runs on that column alone."""
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    batch = pad(token_ids, pad_id, "left", device)
    options: dict[str, Any] = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "position_ids": batch.position_ids,
    }
    if "logits_to_keep" in inspect.signature(loaded.model.forward).parameters:
        options["logits_to_keep"] = 1
    with torch.inference_mode():
        return loaded.model(**options).logits[:, -1].float().cpu()


def self_label(
    loaded: LoadedModel,
    rows: Sequence[dict[str, Any]],
    *,
    device: str,
    token_budget: int,
    max_batch_size: int,
    prompt_format: str = RAW,
    progress: Callable[[int], None] = lambda done: None,
) -> SelfLabels:
    if not loaded.is_causal_lm:
        raise JobFailed(
            "unsupported_model",
            "multiple-choice labelling needs a causal language model (it reads the answer letter's logit)",
        )
    prompts = prompt_strings(loaded.tokenizer, prompt_format, render(prompt_format, "multiple_choice", rows))
    encoded = loaded.tokenizer(prompts.strings, add_special_tokens=prompts.add_special_tokens)["input_ids"]
    token_ids = [list(ids) for ids in encoded]
    counts = {len(row["choices"]) for row in rows}
    letters = {count: letter_token_ids(loaded.tokenizer, count, prompt_format) for count in counts}
    chosen = np.zeros(len(rows), dtype=np.int64)
    baselines = {name: np.zeros(len(rows), dtype=np.float64) for name in CHOICE_BASELINES}
    done = 0
    for indices in plan_batches([len(ids) for ids in token_ids], token_budget, max_batch_size):
        logits = _answer_logits(loaded, [token_ids[i] for i in indices], device)
        for row_logits, index in zip(logits, indices, strict=True):
            choice_logits = row_logits[letters[len(rows[index]["choices"])]]
            chosen[index] = int(torch.argmax(choice_logits))
            confidences = choice_baselines(torch.softmax(choice_logits.double(), dim=0).numpy())
            for name, value in confidences.items():
                baselines[name][index] = value
        done += len(indices)
        progress(done)
    gold = np.array([row["answer"] for row in rows])
    return SelfLabels(chosen=chosen, labels=(chosen == gold).astype(np.int64), baselines=baselines)


def true_false_prompts(tokenizer: Any, statements: Sequence[str], prompt_format: str) -> PromptStrings:
    """Each statement asked as `true_false_question(statement)`, rendered under
    `prompt_format` as a text is: as it is (`raw`), as the user turn with the generation
    prompt (`chat`), or filling a template's `{text}`."""
    questions = [true_false_question(statement) for statement in statements]
    return prompt_strings(tokenizer, prompt_format, render(prompt_format, "text", questions))


def p_true(
    loaded: LoadedModel,
    statements: Sequence[str],
    *,
    device: str,
    token_budget: int,
    max_batch_size: int,
    prompt_format: str = RAW,
    progress: Callable[[int], None] = lambda done: None,
) -> np.ndarray:
    """The model's P(True) for each statement asked as a true-or-false question
    (`true_false_prompts`): P(True) / (P(True) + P(False)) from the next-token logits at the
    prompt's end, the answers' tokens found as `answer_token_ids` finds them (as fine-tuning
    on statements does). A causal language model only (it reads the answers' logits)."""
    if not loaded.is_causal_lm:
        raise JobFailed("unsupported_model", "P(True) needs a causal language model (it reads the answers' logits)")
    prompts = true_false_prompts(loaded.tokenizer, statements, prompt_format)
    false_id, true_id = answer_token_ids(
        loaded.tokenizer, prompts.strings[0], prompts.add_special_tokens, TRUE_FALSE_ANSWERS
    )
    encoded = loaded.tokenizer(prompts.strings, add_special_tokens=prompts.add_special_tokens)["input_ids"]
    token_ids = [list(ids) for ids in encoded]
    confidence = np.zeros(len(token_ids), dtype=np.float64)
    done = 0
    for indices in plan_batches([len(ids) for ids in token_ids], token_budget, max_batch_size):
        logits = _answer_logits(loaded, [token_ids[i] for i in indices], device)
        answers = torch.softmax(logits[:, [false_id, true_id]].double(), dim=1)
        confidence[indices] = answers[:, 1].numpy()
        done += len(indices)
        progress(done)
    return confidence
