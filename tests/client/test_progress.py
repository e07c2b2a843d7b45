"""The progress bar `wait` draws on stderr: a job's stage and counts, and a fine-tune step's
loss, learning rate and validation loss beside them."""

from datetime import UTC, datetime
from typing import Any

import pytest

from confprobe_client.progress import JobProgressBar
from confprobe_client.types import Job


def running_job(stage: str, done: int, total: int | None, details: dict[str, Any] | None) -> Job:
    return Job.model_validate(
        {
            "id": "job_0123456789",
            "kind": "finetune",
            "status": "running",
            "progress": {"stage": stage, "done": done, "total": total, "details": details},
            "result": None,
            "error": None,
            "cancel_requested": False,
            "worker": "w1",
            "model_id": "mdl_0123456789",
            "created_at": datetime.now(UTC),
            "started_at": datetime.now(UTC),
            "finished_at": None,
        }
    )


def draw(*states: Job) -> None:
    """A bar that follows a job through these states, on stderr."""
    bar = JobProgressBar()
    for job in states:
        bar.show(job)
    bar.close()


def last_line(err: str) -> str:
    """What the bar shows last: tqdm redraws its line after a carriage return."""
    return err.replace("\r", "\n").strip().splitlines()[-1]


def test_a_finetune_step_shows_its_loss_and_learning_rate_beside_the_counts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    draw(running_job("training", 12, 40, {"loss": 1.23449, "learning_rate": 1e-4, "tokens": 48}))
    line = last_line(capsys.readouterr().err)
    assert "job_0123456789 finetune: training" in line and "12/40" in line
    assert line.endswith(", loss 1.234 lr 1.0e-04]")  # the step's token count would only crowd it


def test_a_step_with_a_validation_loss_shows_it_too(capsys: pytest.CaptureFixture[str]) -> None:
    draw(running_job("training", 20, 40, {"loss": 0.9, "learning_rate": 5e-5, "validation_loss": 1.0456}))
    assert last_line(capsys.readouterr().err).endswith(", loss 0.900 lr 5.0e-05 val loss 1.046]")


def test_a_stage_without_details_shows_its_counts_only_and_drops_the_last_stages_figures(
    capsys: pytest.CaptureFixture[str],
) -> None:
    draw(running_job("training", 40, 40, {"loss": 0.5, "learning_rate": 1e-4}), running_job("saving", 1, 3, None))
    line = last_line(capsys.readouterr().err)
    assert "finetune: saving" in line and "1/3" in line and "loss" not in line
