"""Probe evaluations: `POST /v1/probes/{id}/evaluations` scores a trained probe on another
labelled dataset (or another variant of its model) as a job; `/v1/evaluations/{id}` and its
report as JSON, SVG, PNG and HTML, as a probe's own report is served."""

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import HTMLResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import jobs
from app.api.deps import ArtifactsDep, RedisDep, SessionDep, SessionsDep, SettingsDep
from app.api.render_cache import cached_render
from app.errors import ServiceError, not_found
from app.inputs.prompt_formats import prompt_format_note
from app.job_kinds import ProbeEvaluationParameters
from app.registry.database import keyset_page
from app.registry.evaluations import get_probe, new_evaluation
from app.registry.tables import Job, Probe, ProbeEvaluation
from app.schemas.common import ERROR_RESPONSES
from app.schemas.evaluations import (
    EvaluationAccepted,
    EvaluationCreate,
    EvaluationOut,
    EvaluationPage,
    EvaluationReportOut,
)
from app.schemas.jobs import JobOut
from app.storage import ArtifactStore

router = APIRouter(tags=["evaluations"], responses=ERROR_RESPONSES)


@router.post("/v1/probes/{probe_id}/evaluations", status_code=202)
def evaluate_probe(
    probe_id: str,
    body: EvaluationCreate,
    response: Response,
    settings: SettingsDep,
    sessions: SessionsDep,
    connection: RedisDep,
) -> EvaluationAccepted:
    """Queue an evaluation of a trained probe on a labelled dataset: labels (given, or the
    evaluated model's own answers for multiple choice), its states at the probe's layer
    (through the cache), and the calibration report a probe's test split gets. On the
    probe's own dataset, variant and prompt format, only its run's test split is scored."""

    def prepare(session: Session, job_id: str) -> jobs.Submission[ProbeEvaluation]:
        evaluation = new_evaluation(session, probe_id, body, job_id)
        return jobs.Submission(ProbeEvaluationParameters(evaluation_id=evaluation.id), evaluation.model_id, evaluation)

    job, evaluation = jobs.submit(sessions, connection, settings, "probe_evaluation", prepare)
    response.headers["Location"] = f"/v1/evaluations/{evaluation.id}"
    return EvaluationAccepted(job=JobOut.of(job), evaluation=EvaluationOut.of(evaluation, job.status))


def _status(session: Session, evaluation: ProbeEvaluation) -> str:
    job = session.get(Job, evaluation.job_id)
    return job.status if job else "failed"


@router.get("/v1/probes/{probe_id}/evaluations")
def list_probe_evaluations(
    probe_id: str,
    session: SessionDep,
    settings: SettingsDep,
    cursor: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> EvaluationPage:
    """The probe's evaluations, oldest first."""
    get_probe(session, probe_id)
    query = select(ProbeEvaluation).where(ProbeEvaluation.probe_id == probe_id)
    items, next_cursor = keyset_page(session, query, ProbeEvaluation.id, cursor, min(limit, settings.page_size_max))
    return EvaluationPage(
        items=[EvaluationOut.of(item, _status(session, item)) for item in items], next_cursor=next_cursor
    )


def _evaluation(session: Session, evaluation_id: str) -> ProbeEvaluation:
    evaluation = session.get(ProbeEvaluation, evaluation_id)
    if evaluation is None:
        raise not_found("evaluation", evaluation_id)
    return evaluation


@router.get("/v1/evaluations/{evaluation_id}")
def show_evaluation(evaluation_id: str, session: SessionDep) -> EvaluationOut:
    evaluation = _evaluation(session, evaluation_id)
    return EvaluationOut.of(evaluation, _status(session, evaluation))


def _finished(session: Session, evaluation_id: str) -> tuple[ProbeEvaluation, str]:
    """The evaluation and its report folder: a 409 while its job has not written it."""
    evaluation = _evaluation(session, evaluation_id)
    if evaluation.artifact is None:
        status = _status(session, evaluation)
        raise ServiceError(
            409, "not_ready", f"evaluation {evaluation.id} is {status}; its report is not there yet", job_status=status
        )
    return evaluation, evaluation.artifact


def _stored_report(artifacts: ArtifactStore, folder: str) -> dict[str, Any]:
    return json.loads(artifacts.read_bytes(f"{folder}/report.json"))


def _curves(
    report: dict[str, Any], probe: Probe | None, evaluation: ProbeEvaluation
) -> list[tuple[str, dict[str, Any]]]:
    from app.calibration.rendering import baseline_title

    name = f"probe (layer {probe.layer}, {probe.method})" if probe else f"probe {evaluation.probe_id}"
    curves = [(name, report["probe"])]
    if report.get("uncalibrated"):
        recalibration = probe.recalibration if probe else "its"
        curves.append((f"probe before {recalibration} recalibration", report["uncalibrated"]))
    curves += [(baseline_title(name), baseline) for name, baseline in report.get("baselines", {}).items()]
    return curves


# A stored report is served as written: keys it lacks stay absent rather than null.
@router.get("/v1/evaluations/{evaluation_id}/report", response_model_exclude_unset=True)
def evaluation_report(evaluation_id: str, session: SessionDep, artifacts: ArtifactsDep) -> EvaluationReportOut:
    """The evaluation and its calibration `report` on the rows it scored: every metric with
    its estimator and interval, and the reliability bins; for multiple choice, the same for
    the evaluated model's own probability of its answer (`baseline`)."""
    evaluation, folder = _finished(session, evaluation_id)
    report = _stored_report(artifacts, folder)
    optional = {key: report[key] for key in ("uncalibrated", "baselines", "versus_baselines") if key in report}
    return EvaluationReportOut(
        evaluation=EvaluationOut.of(evaluation, _status(session, evaluation)),
        report=report["probe"],
        baseline=report["baseline"],
        **optional,
    )


@router.get(
    "/v1/evaluations/{evaluation_id}/report.svg",
    response_class=Response,
    responses={200: {"content": {"image/svg+xml": {}}}},
)
def evaluation_svg(evaluation_id: str, session: SessionDep, artifacts: ArtifactsDep) -> Response:
    from app.calibration.rendering import render_svg

    evaluation, folder = _finished(session, evaluation_id)
    probe = session.get(Probe, evaluation.probe_id)
    svg = cached_render(
        artifacts,
        folder,
        "report.svg",
        lambda: render_svg(_curves(_stored_report(artifacts, folder), probe, evaluation)).encode(),
    )
    return Response(svg, media_type="image/svg+xml")


@router.get(
    "/v1/evaluations/{evaluation_id}/report.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def evaluation_png(evaluation_id: str, session: SessionDep, artifacts: ArtifactsDep) -> Response:
    from app.calibration.rendering import render_png

    evaluation, folder = _finished(session, evaluation_id)
    probe = session.get(Probe, evaluation.probe_id)
    png = cached_render(
        artifacts,
        folder,
        "report.png",
        lambda: render_png(_curves(_stored_report(artifacts, folder), probe, evaluation)),
    )
    return Response(png, media_type="image/png")


@router.get("/v1/evaluations/{evaluation_id}/report.html", response_class=HTMLResponse)
def evaluation_html(evaluation_id: str, session: SessionDep, artifacts: ArtifactsDep) -> HTMLResponse:
    from app.calibration.rendering import baseline_title, render_html

    evaluation, folder = _finished(session, evaluation_id)
    probe = session.get(Probe, evaluation.probe_id)

    def render() -> bytes:
        trained_on = (
            f"trained on dataset {probe.dataset_id}"
            + (f" with adapter {probe.adapter_id}" if probe.adapter_id else "")
            + f" under {prompt_format_note(probe.prompt_format)}"
            if probe
            else "its probe was deleted"
        )
        notes = [
            f"probe {evaluation.probe_id} ({trained_on})",
            f"scored on dataset {evaluation.dataset_id}, model {evaluation.model_id}"
            + (f" with adapter {evaluation.adapter_id}" if evaluation.adapter_id else " (base)"),
            prompt_format_note(evaluation.prompt_format),
            "the test split of the probe's run" if evaluation.rows == "test" else f"all {evaluation.n} rows",
        ]
        title = f"Evaluation {evaluation.id} of probe {evaluation.probe_id}"
        report = _stored_report(artifacts, folder)
        versus = [(baseline_title(name), by_metric) for name, by_metric in report.get("versus_baselines", {}).items()]
        return render_html(title, _curves(report, probe, evaluation), versus=versus, notes=notes).encode()

    return HTMLResponse(cached_render(artifacts, folder, "report.html", render))
