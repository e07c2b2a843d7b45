"""Texts a model is given to read, inline in a request or as a dataset's rows: one rule for
when such a text is empty."""

from collections.abc import Sequence

from app.errors import invalid_field


def is_empty_text(text: str) -> bool:
    """Nothing but whitespace: nothing for the model to read."""
    return not text.strip()


def refuse_empty_texts(texts: Sequence[str]) -> None:
    """A 422 naming the first empty text of a request's `texts`."""
    for index, text in enumerate(texts):
        if is_empty_text(text):
            raise invalid_field(f"texts[{index}]", "is empty", index=index)
