"""An experiment's dataset file is parsed as an upload is: a malformed one fails the job with
the code, message and details the upload endpoint would answer, prefixed by the file's name;
a file of chat conversations, which have no labels to probe, fails it too."""

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from app.job_kinds import ExperimentParameters
from workers.errors import JobFailed
from workers.experiment import _dataset


def dataset_failure(path: Path) -> JobFailed:
    runtime = SimpleNamespace(settings=SimpleNamespace(max_dataset_bytes=1 << 20))
    params = ExperimentParameters(experiment_id="exp_1", layers=[1], adapter=None, dataset=None, dataset_path=str(path))
    context: Any = SimpleNamespace(params=params, runtime=runtime)
    with pytest.raises(JobFailed) as failure:
        _dataset(context)
    return failure.value


def test_a_malformed_row_fails_the_job_naming_the_file_its_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"text": "a", "label": 1}\n{"text": "b", "label": "yes"}\n')
    failure = dataset_failure(path)
    assert failure.code == "invalid_row"
    assert failure.message == 'rows.jsonl: line 2: label must be 0 or 1 (or true/false), not "yes"'
    assert failure.details == {"line": 2, "field": "label"}


def test_a_chat_file_fails_the_job_naming_the_file_before_it_is_registered(tmp_path: Path) -> None:
    path = tmp_path / "chats.jsonl"
    path.write_bytes(
        b'{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}\n'
    )
    failure = dataset_failure(path)  # the runtime has no registry: registering would fail otherwise
    assert failure.code == "invalid_dataset"
    assert failure.message == (
        "chats.jsonl holds chat conversations, which have no labels to probe; chat datasets are for fine-tuning"
    )
    assert failure.details == {"field": "probe.dataset"}


def test_a_file_that_is_not_utf8_fails_the_job_naming_the_file_and_its_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_bytes("statement,label\nThe café is open.,1\n".encode("latin-1"))
    failure = dataset_failure(path)
    assert failure.code == "invalid_field"
    assert failure.message == "rows.csv: file: not UTF-8 text (byte 0xe9 on line 2)"
    assert failure.details == {"field": "file", "line": 2}
