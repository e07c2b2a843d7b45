"""How the runner ends jobs: success, a known failure, a bug, an unknown kind, parameters
that do not fit the kind."""

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from rq.timeouts import JobTimeoutException
from sqlalchemy import update

from app.job_kinds import PARAMETERS
from app.registry.tables import Job
from app.settings import Settings
from tests.api.test_jobs import run_queued_jobs
from tests.api.test_models import register
from workers import runner, runtime
from workers.errors import JobFailed


def test_a_known_failure_is_recorded_with_its_code_and_details(
    api: Any, settings: Settings, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(context: runner.JobContext) -> dict[str, Any]:
        raise JobFailed("bad_input", "layer 99 is out of range", layer=99)

    monkeypatch.setitem(runner.HANDLERS, "model_check", refuse)
    job_id = register(api, tiny_llama).json()["check_job_id"]
    run_queued_jobs(settings)
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed"
    assert job["error"] == {"code": "bad_input", "message": "layer 99 is out of range", "details": {"layer": 99}}


def test_a_bug_fails_its_job_and_the_worker_goes_on_to_the_next(
    api: Any, settings: Settings, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def crash_first(context: runner.JobContext) -> dict[str, Any]:
        calls.append(context.job_id)
        if len(calls) == 1:
            raise ZeroDivisionError("division by zero")
        return {"ok": True}

    monkeypatch.setitem(runner.HANDLERS, "model_check", crash_first)
    first = register(api, tiny_llama).json()["check_job_id"]
    second = register(api, tiny_llama, dtype="bfloat16").json()["check_job_id"]
    run_queued_jobs(settings)
    crashed, fine = api.get(f"/v1/jobs/{first}").json(), api.get(f"/v1/jobs/{second}").json()
    assert crashed["status"] == "failed"
    assert crashed["error"]["code"] == "internal" and "ZeroDivisionError" in crashed["error"]["message"]
    assert fine["status"] == "succeeded" and fine["result"] == {"ok": True}


def test_a_job_of_unknown_kind_fails_clearly(
    api: Any, settings: Settings, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(runner.HANDLERS, "model_check")
    job_id = register(api, tiny_llama).json()["check_job_id"]
    run_queued_jobs(settings)
    error = api.get(f"/v1/jobs/{job_id}").json()["error"]
    assert error["code"] == "unknown_kind" and "model_check" in error["message"]


def test_an_unreachable_artifact_store_fails_the_job_as_unavailable(
    api: Any, settings: Settings, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.storage import StoreUnavailable

    def store_gone(context: runner.JobContext) -> dict[str, Any]:
        raise StoreUnavailable("the artifact store is unreachable: bucket confprobe does not exist")

    monkeypatch.setitem(runner.HANDLERS, "model_check", store_gone)
    job_id = register(api, tiny_llama).json()["check_job_id"]
    run_queued_jobs(settings)
    error = api.get(f"/v1/jobs/{job_id}").json()["error"]
    assert (
        error["code"] == "unavailable"
        and error["details"] == {"backend": "artifact store"}
        and "bucket confprobe" in error["message"]
    )


def test_a_job_that_runs_out_of_disk_fails_as_store_full(
    api: Any, settings: Settings, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def write_to_a_full_disk(context: runner.JobContext) -> dict[str, Any]:
        with open("/dev/full", "wb") as full:  # a real device that answers every write with ENOSPC
            full.write(b"x" * 65536)
            full.flush()
        return {}

    monkeypatch.setitem(runner.HANDLERS, "model_check", write_to_a_full_disk)
    job_id = register(api, tiny_llama).json()["check_job_id"]
    run_queued_jobs(settings)
    error = api.get(f"/v1/jobs/{job_id}").json()["error"]
    assert (error["code"], error["details"]) == ("store_full", {"backend": "disk"})


def test_a_time_limit_reached_inside_a_database_statement_fails_the_job_as_timeout(
    api: Any, settings: Settings, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def alarm_inside_a_statement(context: runner.JobContext) -> dict[str, Any]:
        # RQ's alarm going off while SQLAlchemy runs a statement reaches the runner wrapped
        alarm = JobTimeoutException("Task exceeded maximum timeout value (2 seconds)")
        raise sqlalchemy.exc.StatementError(
            f"({type(alarm).__module__}.{type(alarm).__name__}) {alarm}", "UPDATE jobs", None, alarm
        )

    monkeypatch.setitem(runner.HANDLERS, "model_check", alarm_inside_a_statement)
    job_id = register(api, tiny_llama).json()["check_job_id"]
    run_queued_jobs(settings)
    error = api.get(f"/v1/jobs/{job_id}").json()["error"]
    assert (error["code"], error["details"]) == ("timeout", {"limit_s": settings.job_timeout_s})


def test_an_unexpected_os_error_is_recorded_without_the_servers_paths(
    api: Any, settings: Settings, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def open_what_is_not_there(context: runner.JobContext) -> dict[str, Any]:
        (tmp_path / "server-side-secret-folder" / "file").read_bytes()
        return {}

    monkeypatch.setitem(runner.HANDLERS, "model_check", open_what_is_not_there)
    job_id = register(api, tiny_llama).json()["check_job_id"]
    run_queued_jobs(settings)
    error = api.get(f"/v1/jobs/{job_id}").json()["error"]
    assert error == {"code": "internal", "message": "FileNotFoundError: No such file or directory", "details": {}}


def test_a_job_whose_parameters_do_not_fit_its_kind_fails_as_invalid_parameters_before_its_handler_runs(
    api: Any, settings: Settings, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[str] = []

    def check(context: runner.JobContext) -> dict[str, Any]:
        ran.append(context.job_id)
        return {}

    monkeypatch.setitem(runner.HANDLERS, "model_check", check)
    job_id = register(api, tiny_llama).json()["check_job_id"]
    with runtime.build_runtime(settings).sessions() as session, session.begin():
        session.execute(update(Job).where(Job.id == job_id).values(params={"model": "mdl_renamed"}))
    run_queued_jobs(settings)
    error = api.get(f"/v1/jobs/{job_id}").json()["error"]
    assert error["code"] == "invalid_parameters" and "model_id" in error["message"]
    assert [field["field"] for field in error["details"]["fields"]] == ["model_id"]
    assert ran == []


def test_every_kind_of_job_the_worker_runs_has_a_parameter_model() -> None:
    assert set(runner.HANDLERS) == set(PARAMETERS)
