"""The LoRA training loop: examples whose loss covers only the completion, a loss equal to
transformers' own, a schedule equal to transformers', and a run that resumed from a
checkpoint ending exactly where an uninterrupted one does."""

from pathlib import Path
from typing import Any

import pytest
import torch

from app.inputs.datasets import format_multiple_choice, true_false_question
from tests import tiny_models
from workers.finetuning import (
    Example,
    LoraTraining,
    Schedule,
    chat_examples,
    completion_loss,
    held_out,
    learning_rate_at,
    multiple_choice_examples,
    statement_examples,
    step_examples,
    total_steps,
)
from workers.labelling import letter_token_ids


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.save_tiny_llama(
        tmp_path_factory.mktemp("llama"), seed=4, chat_template=tiny_models.CHAT_TEMPLATE
    )


@pytest.fixture(scope="module")
def tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _model(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


QUESTIONS: list[dict[str, Any]] = [
    {"question": f"Which number is {n}?", "choices": [str(n), str(n + 1), str(n + 2)], "answer": n % 3}
    for n in range(24)
]


def test_a_multiple_choice_example_is_its_labelling_prompt_completed_by_the_gold_letter(tokenizer: Any) -> None:
    built = multiple_choice_examples(tokenizer, QUESTIONS[:3], "raw", 512)
    for example, row in zip(built.examples, QUESTIONS[:3], strict=True):
        prompt = tokenizer(format_multiple_choice(row["question"], row["choices"]))["input_ids"]
        gold = letter_token_ids(tokenizer, 3)[row["answer"]]
        assert list(example.token_ids) == [*prompt, gold]
        assert example.targets == (len(prompt),)


def test_a_statement_example_is_completed_by_the_first_token_of_true_or_false(tokenizer: Any) -> None:
    rows: list[dict[str, Any]] = [
        {"text": "Paris is in France.", "label": 1},
        {"text": "Paris is in Peru.", "label": 0},
    ]
    built = statement_examples(tokenizer, rows, "raw", 512)
    for example, row in zip(built.examples, rows, strict=True):
        prompt = tokenizer(true_false_question(row["text"]))["input_ids"]
        assert list(example.token_ids[: len(prompt)]) == prompt
        (target,) = example.targets
        answer = tokenizer.decode([example.token_ids[target]]).strip()
        assert answer and ("True" if row["label"] else "False").startswith(answer)


def test_a_chat_example_trains_on_its_assistant_turns_only(tokenizer: Any) -> None:
    messages = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green."},
    ]
    (example,) = chat_examples(tokenizer, [{"messages": messages}], 512).examples
    # the tokens before the first assistant turn are the prompt exactly as inference reads it
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert list(example.token_ids[: len(prompt_ids)]) == prompt_ids
    assert example.targets[0] == len(prompt_ids)
    trained = tokenizer.decode([example.token_ids[i] for i in example.targets])
    assert "Blue." in trained and "Green." in trained
    assert "colour" not in trained and "Another" not in trained


def test_examples_longer_than_max_length_are_left_out_and_counted(tokenizer: Any) -> None:
    lengths = [len(e.token_ids) for e in multiple_choice_examples(tokenizer, QUESTIONS[:6], "raw", 10_000).examples]
    cut = sorted(lengths)[2]
    built = multiple_choice_examples(tokenizer, QUESTIONS[:6], "raw", cut)
    assert len(built.examples) == sum(length <= cut for length in lengths)
    assert built.left_out == sum(length > cut for length in lengths)


def test_the_completion_loss_equals_transformers_loss_with_the_prompt_masked(folder: Path, tokenizer: Any) -> None:
    model = _model(folder).eval()
    examples = multiple_choice_examples(tokenizer, QUESTIONS[:5], "raw", 512).examples
    chat = chat_examples(
        tokenizer,
        [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]}],
        512,
    ).examples
    batch = [*examples, *chat]
    with torch.no_grad():
        summed, count = completion_loss(model, batch, tokenizer.pad_token_id or 0, "cpu")
        expected_sum, expected_count = 0.0, 0
        for example in batch:  # one at a time, no padding: transformers' own shifted loss
            labels = torch.full((1, len(example.token_ids)), -100)
            labels[0, list(example.targets)] = torch.tensor([example.token_ids[t] for t in example.targets])
            output = model(input_ids=torch.tensor([example.token_ids]), labels=labels)
            expected_sum += float(output.loss) * len(example.targets)
            expected_count += len(example.targets)
    assert count == expected_count
    assert float(summed) == pytest.approx(expected_sum, rel=1e-5)


def test_the_learning_rate_follows_transformers_linear_schedule_with_warmup() -> None:
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    for kind, maker in (("linear", get_linear_schedule_with_warmup), ("constant", get_constant_schedule_with_warmup)):
        schedule = Schedule(
            steps=20, batch_size=1, accumulation=1, learning_rate=0.01, lr_schedule=kind, warmup_steps=4, seed=0
        )
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
        arguments = {"num_training_steps": 20} if kind == "linear" else {}
        scheduler = maker(optimizer, num_warmup_steps=4, **arguments)
        for step in range(20):
            assert learning_rate_at(step, schedule) == pytest.approx(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()


def test_every_epoch_shows_each_training_example_once_in_a_seeded_order() -> None:
    schedule = Schedule(
        steps=6, batch_size=2, accumulation=2, learning_rate=0.1, lr_schedule="constant", warmup_steps=0, seed=5
    )
    seen = [i for step in range(6) for part in step_examples(step, 8, schedule) for i in part]
    assert sorted(seen[:8]) == list(range(8)) and sorted(seen[8:16]) == list(range(8))
    assert seen[:8] != seen[8:16]  # a new order each epoch
    assert [len(part) for part in step_examples(0, 8, schedule)] == [2, 2]
    assert total_steps({"steps": None, "epochs": 2.5, "batch_size": 2, "gradient_accumulation_steps": 2}, 8) == 5
    train, validation = held_out(10, 0.2, 3)
    assert len(validation) == 2 and sorted(train + validation) == list(range(10))


def _training(folder: Path, examples: list[Example], seed: int = 0) -> LoraTraining:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(
        _model(folder),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    schedule = Schedule(
        steps=8, batch_size=4, accumulation=2, learning_rate=5e-3, lr_schedule="linear", warmup_steps=2, seed=seed
    )
    return LoraTraining(
        model=model, train=examples[:20], validation=examples[20:], schedule=schedule, device="cpu", pad_id=0
    )


def test_training_lowers_the_loss_and_a_resumed_run_ends_where_an_uninterrupted_one_does(
    folder: Path, tokenizer: Any
) -> None:
    examples = multiple_choice_examples(tokenizer, QUESTIONS, "raw", 512).examples
    whole = _training(folder, examples)
    before = whole.validation_loss()
    losses = [whole.step(step).loss for step in range(8)]
    after = whole.validation_loss()
    assert before is not None and after is not None and after < before
    assert losses[-1] < losses[0]

    first = _training(folder, examples)
    for step in range(3):
        first.step(step)
    saved = {name: tensor.clone() for name, tensor in first.state_tensors().items()}
    second = _training(folder, examples, seed=0)
    second.restore(saved)
    for step in range(3, 8):
        second.step(step)
    for (name, expected), actual in zip(
        whole.trainable_parameters().items(), second.trainable_parameters().values(), strict=True
    ):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6, msg=name)
