"""Prompts as token ids, under a request's prompt format (docs/concepts.md#prompt-formats).

`app.inputs.prompt_formats.render` turns rows into texts; here those texts become what the
tokenizer reads. For `raw` and templates that is the text itself with the tokenizer's special
tokens. For `chat` it is the tokenizer's chat template around the text as the user turn,
with the generation prompt, tokenized without adding special tokens again — exactly what
`apply_chat_template(..., tokenize=True)` does, as one batched tokenizer call.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app.inputs.prompt_formats import CHAT
from workers.errors import JobFailed


@dataclass(frozen=True)
class PromptStrings:
    strings: list[str]
    add_special_tokens: bool  # False for chat: the template writes its special tokens itself


def prompt_strings(tokenizer: Any, prompt_format: str, texts: Sequence[str]) -> PromptStrings:
    if prompt_format != CHAT:
        return PromptStrings(list(texts), add_special_tokens=True)
    if not getattr(tokenizer, "chat_template", None):
        raise JobFailed(
            "no_chat_template",
            "prompt_format `chat` needs the model's chat template, and its tokenizer has none",
            field="prompt_format",
        )
    strings = [
        tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        for text in texts
    ]
    return PromptStrings(strings, add_special_tokens=False)
