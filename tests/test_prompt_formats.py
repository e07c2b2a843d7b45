"""Prompt formats as the gateway checks them and the workers render them: `raw`, `chat`, and
templates with named fields."""

from typing import Any

import pytest

from app.inputs.datasets import format_multiple_choice
from app.inputs.prompt_formats import DataKind, InvalidPromptFormat, check_prompt_format, render, rendered_rows

QUESTION: dict[str, Any] = {"question": "Where is Lyon?", "choices": ["France", "Peru"], "answer": 0}


@pytest.mark.parametrize("prompt_format", ["raw", "chat"])
def test_raw_and_chat_fit_any_data(prompt_format: str) -> None:
    for kind in ("text", "multiple_choice", None):
        assert check_prompt_format(prompt_format, kind) == prompt_format


def test_a_statement_template_fills_text_and_keeps_doubled_braces_as_braces() -> None:
    template = "Claim {{quoted}}: {text}\nTrue or false?"
    assert check_prompt_format(template, "text") == template
    assert render(template, "text", ["Lyon is in France."]) == ["Claim {quoted}: Lyon is in France.\nTrue or false?"]


def test_a_multiple_choice_template_fills_the_question_and_the_lettered_choices() -> None:
    template = "Q: {question}\n{choices}\nThe answer is"
    assert render(template, "multiple_choice", [QUESTION]) == ["Q: Where is Lyon?\nA. France\nB. Peru\nThe answer is"]


def test_raw_and_chat_read_a_question_as_the_lettered_prompt_ending_in_answer() -> None:
    expected = format_multiple_choice(QUESTION["question"], QUESTION["choices"])
    assert render("raw", "multiple_choice", [QUESTION]) == render("chat", "multiple_choice", [QUESTION]) == [expected]
    assert expected.endswith("\nB. Peru\nAnswer:")


def test_stored_rows_are_rendered_by_their_dataset_kind() -> None:
    assert rendered_rows([{"text": "a", "label": 1}], "statements", "<{text}>") == ["<a>"]
    assert rendered_rows([QUESTION], "multiple_choice", "{question} {choices}") == ["Where is Lyon? A. France\nB. Peru"]


@pytest.mark.parametrize(
    ("template", "kind", "message"),
    [
        ("Q: {query}", "text", "unknown field {query}"),
        ("{question}\n{choices}", "text", "unknown field {choices}"),
        ("{text}", "multiple_choice", "unknown field {text}"),
        ("{question}\nAnswer:", "multiple_choice", "does not name {choices}"),
        ("{text} {question} {choices}", None, "two kinds of data"),
        ("{text} {choices}", None, "two kinds of data"),
        ("Say something", "text", "names no field"),
        ("{} is true", "text", "positional field"),
        ("{0} is true", "text", "positional field"),
        ("{text.upper}", "text", "attribute or index"),
        ("{text[0]}", "text", "attribute or index"),
        ("{text!r}", "text", "conversion or format spec"),
        ("{text:>40}", "text", "conversion or format spec"),
        ("{text", "text", "not a valid template"),
        ("text}", "text", "not a valid template"),
        ("{text}" + "x" * 4_000, "text", "at most 4000"),
    ],
)
def test_a_template_that_cannot_format_the_data_is_refused_saying_why(
    template: str, kind: DataKind | None, message: str
) -> None:
    with pytest.raises(InvalidPromptFormat, match=message.replace("{", r"\{").replace("}", r"\}")):
        check_prompt_format(template, kind)


def test_a_template_of_either_kind_fits_data_not_known_yet() -> None:
    assert check_prompt_format("{text}?", None) == "{text}?"
    assert check_prompt_format("{question} {choices}", None) == "{question} {choices}"
