"""LoRA fine-tuning as a plain training loop (docs/concepts.md#fine-tunes): training examples
from the service's datasets, a schedule that is a pure function of the step, and state that
a later attempt resumes from exactly.

**Examples.** Each example is a token sequence and the positions whose tokens the loss covers
(the completion; each is predicted from the position before it):

- multiple choice: the prompt the self-labelling reads (`workers/labelling.py`, under the
  prompt format), completed by the gold answer letter's token — the very token labelling
  reads, so a fine-tune moves exactly what the probes' labels measure;
- statements: `true_false_question(statement)` under the prompt format, completed by the
  first token of `True` or `False` (`TRUE_FALSE_ANSWERS`);
- chat: the conversation under the tokenizer's chat template; the tokens of every assistant
  turn (with the template's end-of-turn tokens) are the completion. Turns are tokenized one
  segment at a time, the prompt up to each assistant turn as inference would see it.

Examples longer than `max_length` are left out and counted, never cut (a cut would lose the
completion).

**One step** is one AdamW update over `batch_size × gradient_accumulation_steps` examples;
its loss is the mean cross-entropy over the completion tokens of all of them (so
accumulation gives the gradient of one large batch), the gradient clipped to
`max_grad_norm`. The LM head runs only at the positions that predict completion tokens
(`logits_to_keep`), not over the whole vocabulary at every position.

**Determinism and resuming.** The examples of step `s` come from a permutation of the
training examples seeded by `(seed, epoch)`, the learning rate is a function of `s`
(`learning_rate_at`, the schedule of transformers' `get_linear_schedule_with_warmup`), and
the random state (dropout) is seeded by `(seed, s, pass)` before each pass. A checkpoint is
the LoRA weights and AdamW's moments: restored, the run goes on exactly as if it had never
stopped (on the same device and thread count).
"""

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from app.inputs.datasets import TRUE_FALSE_ANSWERS, true_false_question
from app.inputs.prompt_formats import render
from workers.errors import JobFailed
from workers.hidden_states import pad
from workers.labelling import answer_token_ids, letter_token_ids
from workers.prompts import prompt_strings

IGNORED = -100


@dataclass(frozen=True)
class Example:
    token_ids: tuple[int, ...]
    targets: tuple[int, ...]  # positions (≥ 1) whose token the loss covers


@dataclass(frozen=True)
class Examples:
    examples: list[Example]
    left_out: int  # longer than max_length


def _completed(prompts: list[list[int]], completions: Sequence[Sequence[int]], max_length: int) -> Examples:
    examples, left_out = [], 0
    for prompt, completion in zip(prompts, completions, strict=True):
        ids = (*prompt, *completion)
        if len(ids) > max_length:
            left_out += 1
            continue
        examples.append(Example(ids, tuple(range(len(prompt), len(ids)))))
    return Examples(examples, left_out)


def _prompt_ids(tokenizer: Any, prompt_format: str, texts: list[str]) -> tuple[list[list[int]], str, bool]:
    strings = prompt_strings(tokenizer, prompt_format, texts)
    encoded = tokenizer(strings.strings, add_special_tokens=strings.add_special_tokens)["input_ids"]
    return [list(ids) for ids in encoded], strings.strings[0], strings.add_special_tokens


def multiple_choice_examples(
    tokenizer: Any, rows: Sequence[dict[str, Any]], prompt_format: str, max_length: int
) -> Examples:
    prompts, _, _ = _prompt_ids(tokenizer, prompt_format, render(prompt_format, "multiple_choice", rows))
    letters = {count: letter_token_ids(tokenizer, count, prompt_format) for count in {len(r["choices"]) for r in rows}}
    completions = [[letters[len(row["choices"])][row["answer"]]] for row in rows]
    return _completed(prompts, completions, max_length)


def statement_examples(tokenizer: Any, rows: Sequence[dict[str, Any]], prompt_format: str, max_length: int) -> Examples:
    questions = [true_false_question(row["text"]) for row in rows]
    prompts, first, special = _prompt_ids(tokenizer, prompt_format, render(prompt_format, "text", questions))
    answers = answer_token_ids(tokenizer, first, special, TRUE_FALSE_ANSWERS)
    return _completed(prompts, [[answers[row["label"]]] for row in rows], max_length)


def chat_examples(tokenizer: Any, rows: Sequence[dict[str, Any]], max_length: int) -> Examples:
    if not getattr(tokenizer, "chat_template", None):
        raise JobFailed(
            "no_chat_template", "a chat dataset needs the model's chat template, and its tokenizer has none"
        )
    examples, left_out = [], 0
    for row in rows:
        ids, targets = _conversation(tokenizer, row["messages"])
        if len(ids) > max_length:
            left_out += 1
            continue
        examples.append(Example(tuple(ids), tuple(targets)))
    return Examples(examples, left_out)


def _conversation(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """The conversation's tokens and the positions of its assistant turns' tokens: the text
    the template renders is split where each assistant turn starts (the rendering of the turns
    before it with the generation prompt) and ends (the rendering up to it)."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    cuts: list[tuple[int, bool]] = []  # (end of a segment in `full`, whether it is an assistant turn)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        end = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (full.startswith(start) and full.startswith(end) and len(start) <= len(end)):
            raise JobFailed(
                "unsupported_chat_template",
                "the model's chat template does not render a conversation as the renderings of its beginnings "
                "followed by more text, so its assistant turns cannot be told apart for the loss",
            )
        cuts += [(len(start), False), (len(end), True)]
    ids: list[int] = []
    targets: list[int] = []
    begin = 0
    for end, is_assistant in cuts:
        if end <= begin:
            continue
        piece = tokenizer(full[begin:end], add_special_tokens=False)["input_ids"]
        if is_assistant:
            targets.extend(range(max(len(ids), 1), len(ids) + len(piece)))
        ids.extend(piece)
        begin = end
    return ids, targets


def training_examples(
    tokenizer: Any, dataset_kind: str, rows: Sequence[dict[str, Any]], prompt_format: str, max_length: int
) -> Examples:
    if dataset_kind == "multiple_choice":
        return multiple_choice_examples(tokenizer, rows, prompt_format, max_length)
    if dataset_kind == "statements":
        return statement_examples(tokenizer, rows, prompt_format, max_length)
    if dataset_kind == "chat":
        return chat_examples(tokenizer, rows, max_length)
    raise JobFailed("invalid_dataset", f"a {dataset_kind} dataset cannot be fine-tuned on")


# --- the schedule ----------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    steps: int
    batch_size: int
    accumulation: int
    learning_rate: float
    lr_schedule: str
    warmup_steps: int
    seed: int

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.accumulation


def total_steps(training: dict[str, Any], train_examples: int) -> int:
    """`steps` as given, or enough for `epochs` (default 1) passes: ceil(epochs × examples /
    examples per step)."""
    if training.get("steps") is not None:
        return int(training["steps"])
    per_step = training["batch_size"] * training["gradient_accumulation_steps"]
    return max(1, math.ceil((training.get("epochs") or 1.0) * train_examples / per_step))


def learning_rate_at(step: int, schedule: Schedule) -> float:
    """The rate of step `step` (0-based): rising linearly over the warm-up from 0, then
    constant or falling linearly towards 0 at `steps`, as `get_linear_schedule_with_warmup`
    (or `get_constant_schedule_with_warmup`) gives it."""
    if step < schedule.warmup_steps:
        return schedule.learning_rate * step / schedule.warmup_steps
    if schedule.lr_schedule == "constant":
        return schedule.learning_rate
    return schedule.learning_rate * max(0.0, (schedule.steps - step) / max(1, schedule.steps - schedule.warmup_steps))


def step_examples(step: int, count: int, schedule: Schedule) -> list[list[int]]:
    """The indices of the training examples of step `step`, as its passes: the stream of
    examples is one seeded permutation per epoch, read in order."""
    first = step * schedule.examples_per_step
    stream = [
        _permutation(count, schedule.seed, k // count)[k % count]
        for k in range(first, first + schedule.examples_per_step)
    ]
    return [stream[i : i + schedule.batch_size] for i in range(0, len(stream), schedule.batch_size)]


_permutations: dict[tuple[int, int, int], np.ndarray] = {}


def _permutation(count: int, seed: int, epoch: int) -> np.ndarray:
    key = (count, seed, epoch)
    if key not in _permutations:
        if len(_permutations) > 64:
            _permutations.clear()
        _permutations[key] = np.random.default_rng([seed, epoch]).permutation(count)
    return _permutations[key]


def held_out(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, validation) indices: a seeded shuffle, the first `fraction` held out."""
    order = np.random.default_rng([seed, 2**31]).permutation(count)
    cut = int(count * fraction)
    return sorted(order[cut:].tolist()), sorted(order[:cut].tolist())


# --- the loss --------------------------------------------------------------------------


def _keeps_logits(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def completion_loss(model: Any, examples: Sequence[Example], pad_id: int, device: str) -> tuple[torch.Tensor, int]:
    """The summed cross-entropy of the examples' completion tokens, and how many there are.
    Rows are right-padded (padding after the text, so every real position attends only to
    real ones), positions come from the attention mask, and the LM head runs only on the
    columns that predict a completion token somewhere in the batch."""
    batch = pad([list(example.token_ids) for example in examples], pad_id, "right", device)
    width = batch.input_ids.shape[1]
    predicts = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, example in enumerate(examples):
        predicts[row, [target - 1 for target in example.targets]] = True
    predicts = predicts.to(device)
    columns = predicts.any(dim=0).nonzero().squeeze(1)
    options: dict[str, Any] = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "position_ids": batch.position_ids,
    }
    if _keeps_logits(model):
        options["logits_to_keep"] = columns
        logits = model(**options).logits
    else:
        logits = model(**options).logits[:, columns]
    labels = batch.input_ids[:, columns + 1]
    chosen = predicts[:, columns]
    loss = torch.nn.functional.cross_entropy(logits[chosen].float(), labels[chosen], reduction="sum")
    return loss, int(chosen.sum())


# --- training --------------------------------------------------------------------------


@dataclass
class StepResult:
    step: int  # 1-based: the number of updates done
    loss: float
    learning_rate: float
    tokens: int


@dataclass
class LoraTraining:
    """A PEFT model with trainable LoRA weights, its AdamW, and the examples and schedule."""

    model: Any
    train: list[Example]
    validation: list[Example]
    schedule: Schedule
    device: str
    pad_id: int
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.AdamW(
            self.trainable_parameters().values(), lr=self.schedule.learning_rate, weight_decay=self.weight_decay
        )

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {name: parameter for name, parameter in self.model.named_parameters() if parameter.requires_grad}

    def step(self, step: int) -> StepResult:
        """Update `step` (0-based)."""
        passes = [[self.train[i] for i in indices] for indices in step_examples(step, len(self.train), self.schedule)]
        tokens = sum(len(example.targets) for examples in passes for example in examples)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for number, examples in enumerate(passes):
            torch.manual_seed(_pass_seed(self.schedule.seed, step, number))
            loss, _ = completion_loss(self.model, examples, self.pad_id, self.device)
            (loss / tokens).backward()
            total += float(loss.detach())
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(self.trainable_parameters().values()), self.max_grad_norm)
        rate = learning_rate_at(step, self.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        self.optimizer.step()
        return StepResult(step=step + 1, loss=total / tokens, learning_rate=rate, tokens=tokens)

    def validation_loss(self) -> float | None:
        """Mean cross-entropy over the validation examples' completion tokens (no dropout)."""
        if not self.validation:
            return None
        self.model.eval()
        total, tokens = 0.0, 0
        order = sorted(range(len(self.validation)), key=lambda i: len(self.validation[i].token_ids))
        with torch.inference_mode():
            for start in range(0, len(order), self.schedule.batch_size):
                examples = [self.validation[i] for i in order[start : start + self.schedule.batch_size]]
                loss, count = completion_loss(self.model, examples, self.pad_id, self.device)
                total += float(loss)
                tokens += count
        return total / tokens

    # --- checkpoints -------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The LoRA weights and AdamW's state, by position in the trainable parameters."""
        tensors: dict[str, torch.Tensor] = {}
        for index, (_, parameter) in enumerate(self.trainable_parameters().items()):
            tensors[f"weight.{index}"] = parameter.detach().cpu().contiguous()
            state = self.optimizer.state.get(parameter)
            if state:
                tensors[f"exp_avg.{index}"] = state["exp_avg"].cpu().contiguous()
                tensors[f"exp_avg_sq.{index}"] = state["exp_avg_sq"].cpu().contiguous()
                tensors[f"step.{index}"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1).cpu()
        return tensors

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        parameters = list(self.trainable_parameters().values())
        if sum(1 for key in tensors if key.startswith("weight.")) != len(parameters):
            raise JobFailed("checkpoint_mismatch", "the checkpoint holds another set of LoRA weights than this run's")
        with torch.no_grad():
            for index, parameter in enumerate(parameters):
                parameter.copy_(tensors[f"weight.{index}"])
                if f"exp_avg.{index}" in tensors:
                    self.optimizer.state[parameter] = {
                        "step": tensors[f"step.{index}"].reshape(()).clone(),
                        "exp_avg": tensors[f"exp_avg.{index}"].to(parameter.device).clone(),
                        "exp_avg_sq": tensors[f"exp_avg_sq.{index}"].to(parameter.device).clone(),
                    }


def _pass_seed(seed: int, step: int, number: int) -> int:
    return int(np.random.SeedSequence([seed, step, number]).generate_state(1)[0])
