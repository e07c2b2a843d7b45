"""Options several `confprobe` commands share, and the comma-separated lists they take."""

from typing import Any

import click


class IntegerList(click.ParamType):
    """`8,16,-1` → [8, 16, -1]."""

    name = "integers"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[int]:
        if isinstance(value, list):
            return value
        try:
            return [int(part) for part in str(value).split(",") if part.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)


def comma_separated(value: str) -> list[str]:
    """`a, b,,c` → ["a", "b", "c"]: blanks around and between commas are forgiven."""
    return [part.strip() for part in value.split(",") if part.strip()]


no_wait_option = click.option(
    "--no-wait", is_flag=True, help="Answer once the job is queued instead of following it with a progress bar."
)
LAYERS = IntegerList()

prompt_format_option = click.option(
    "--prompt-format",
    metavar="FORMAT",
    help="raw (as the texts are), chat (the model's chat template), or a template naming {text} "
    "({question} and {choices} for multiple choice) [default: raw].",
)
