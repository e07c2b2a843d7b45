"""A progress bar on stderr that follows a job's `progress` {stage, done, total, details}."""

import sys
from typing import Any

from tqdm import tqdm

from confprobe_client.types import Job

# The figures of a progress point the bar shows, in this order, each with its label and
# format: a fine-tune's steps have them. Others (a step's token count) would only crowd it.
SHOWN_DETAILS: list[tuple[str, str, str]] = [
    ("loss", "loss", ".3f"),
    ("learning_rate", "lr", ".1e"),
    ("validation_loss", "val loss", ".3f"),
    ("final_loss", "final loss", ".3f"),
]


def details_text(details: dict[str, Any] | None) -> str:
    """`loss 1.234 lr 1.0e-04 val loss 1.301`: the figures of a progress point the bar
    shows, or "" when it has none of them."""
    shown = []
    for key, label, spec in SHOWN_DETAILS:
        value = (details or {}).get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            shown.append(f"{label} {value:{spec}}")
    return " ".join(shown)


class JobProgressBar:
    """Drawn at the job's first state; stages change its description, and its total when
    a stage counts in other units (model loading, then batches). A point's figures (a
    fine-tune step's loss and learning rate) follow the counts."""

    def __init__(self) -> None:
        self._bar: tqdm | None = None

    def show(self, job: Job) -> None:
        if self._bar is None:
            self._bar = tqdm(total=job.progress.total, file=sys.stderr, unit="step", dynamic_ncols=True, leave=True)
        self._bar.total = job.progress.total
        self._bar.n = job.progress.done
        self._bar.set_description(f"{job.id} {job.kind}: {job.progress.stage or job.status}", refresh=False)
        self._bar.set_postfix_str(details_text(job.progress.details), refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
