"""`/v1/probes`: train probes as a job, read their held-out metrics and calibration
reports, export them with their cards, and score new texts with them."""

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import HTMLResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import jobs
from app.api.deps import ArtifactsDep, Force, RedisDep, SessionDep, SessionsDep, SettingsDep
from app.api.render_cache import cached_render
from app.deletions import DELETE_RESPONSES, delete_resource
from app.errors import ServiceError, invalid_field, not_found
from app.inputs.prompt_formats import InvalidPromptFormat, check_prompt_format, prompt_format_note
from app.inputs.texts import refuse_empty_texts
from app.job_kinds import ProbeScoringParameters, ProbeTrainingParameters
from app.registry.database import keyset_page
from app.registry.models import checked_prompt_format, get_model
from app.registry.probe_cards import probe_card, probe_export
from app.registry.probes import new_probe_run, run_view
from app.registry.tables import Job, Model, Probe, ProbeRun
from app.schemas.common import ERROR_RESPONSES
from app.schemas.jobs import JobAccepted, JobOut
from app.schemas.probes import (
    ProbeAccepted,
    ProbeCard,
    ProbeCreate,
    ProbeOut,
    ProbePage,
    ProbeReportOut,
    ProbeRunOut,
    ScoreOut,
    ScoreRequest,
)
from app.storage import ArtifactStore

router = APIRouter(tags=["probes"], responses=ERROR_RESPONSES)


@router.post("/v1/probes", status_code=202)
def train_probes(
    body: ProbeCreate, response: Response, settings: SettingsDep, sessions: SessionsDep, connection: RedisDep
) -> ProbeAccepted:
    """Queue training: labels (given, or the model's own for multiple choice), hidden states
    at each layer, one probe per layer and method, the best marked on validation, and a
    calibration report on the held-out test split."""

    def prepare(session: Session, job_id: str) -> jobs.Submission[ProbeRun]:
        run = new_probe_run(session, body, job_id)
        return jobs.Submission(ProbeTrainingParameters(run_id=run.id), run.model_id, run)

    job, run = jobs.submit(sessions, connection, settings, "probe_training", prepare)
    response.headers["Location"] = f"/v1/probe-runs/{run.id}"
    return ProbeAccepted(job=JobOut.of(job), run=run_view(run, job.status, []))


@router.get("/v1/probe-runs/{run_id}")
def show_probe_run(run_id: str, session: SessionDep) -> ProbeRunOut:
    run = session.get(ProbeRun, run_id)
    if run is None:
        raise not_found("probe run", run_id)
    job = session.get(Job, run.job_id)
    probes = list(session.scalars(select(Probe).where(Probe.run_id == run_id).order_by(Probe.layer, Probe.method)))
    return run_view(run, job.status if job else "failed", probes)


@router.get("/v1/probes")
def list_probes(
    session: SessionDep,
    settings: SettingsDep,
    model: Annotated[str | None, Query(max_length=40)] = None,
    dataset: Annotated[str | None, Query(max_length=40)] = None,
    best: bool | None = None,
    cursor: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> ProbePage:
    query = select(Probe)
    if model:
        query = query.where(Probe.model_id == model)
    if dataset:
        query = query.where(Probe.dataset_id == dataset)
    if best is not None:
        query = query.where(Probe.is_best == best)
    probes, next_cursor = keyset_page(session, query, Probe.id, cursor, min(limit, settings.page_size_max))
    return ProbePage(items=[ProbeOut.of(probe) for probe in probes], next_cursor=next_cursor)


def _probe(session: Session, probe_id: str) -> Probe:
    probe = session.get(Probe, probe_id)
    if probe is None:
        raise not_found("probe", probe_id)
    return probe


@router.get("/v1/probes/{probe_id}")
def show_probe(probe_id: str, session: SessionDep) -> ProbeOut:
    return ProbeOut.of(_probe(session, probe_id))


@router.delete("/v1/probes/{probe_id}", status_code=204, responses=DELETE_RESPONSES)
def delete_probe(
    probe_id: str,
    sessions: SessionsDep,
    artifacts: ArtifactsDep,
    connection: RedisDep,
    settings: SettingsDep,
    force: Force = False,
) -> Response:
    """Delete the probe, its folder (weights, predictions, report) and its evaluations. A run
    that keeps other probes loses its best one if this was it (`best_probe_id` null); a run
    whose last probe this was is deleted with it. Refused while its run is still training, or
    an evaluation or a scoring of it is unfinished."""
    delete_resource(sessions, artifacts, connection, settings, "probes", probe_id, force)
    return Response(status_code=204)


def _report(artifacts: ArtifactStore, probe: Probe) -> dict[str, Any]:
    return json.loads(artifacts.read_bytes(f"{probe.artifact}/report.json"))


def _labelled_reports(report: dict[str, Any], probe: Probe) -> list[tuple[str, dict[str, Any]]]:
    """The probe's report, then each baseline's (a report written before baselines had names
    has at most `baseline`, the own probability)."""
    from app.calibration.rendering import baseline_title

    curves = [(f"probe (layer {probe.layer}, {probe.method})", report["probe"])]
    if report.get("uncalibrated"):
        curves.append((f"probe before {probe.recalibration} recalibration", report["uncalibrated"]))
    if "baselines" in report:
        curves += [(baseline_title(name), baseline) for name, baseline in report["baselines"].items()]
    elif report.get("baseline"):
        curves.append((baseline_title("own_probability"), report["baseline"]))
    return curves


# A stored report is served as written: keys it lacks stay absent rather than null.
@router.get("/v1/probes/{probe_id}/report", response_model_exclude_unset=True)
def probe_report(probe_id: str, session: SessionDep, artifacts: ArtifactsDep) -> ProbeReportOut:
    """The probe, and its calibration `report` on the held-out test split: every metric with
    its estimator named and a bootstrap interval, and the reliability bins; for a recalibrated
    probe, the same before its recalibration (`uncalibrated`); the same for each of the
    model's own confidences (`baselines`; for multiple choice `baseline` is the own
    probability of its answer), and the probe's difference from each (`versus_baselines`)."""
    probe = _probe(session, probe_id)
    report = _report(artifacts, probe)
    # reports written before these keys existed lack them, and are served without them
    optional = {key: report[key] for key in ("uncalibrated", "baselines", "versus_baselines") if key in report}
    return ProbeReportOut(probe=ProbeOut.of(probe), report=report["probe"], baseline=report["baseline"], **optional)


@router.get(
    "/v1/probes/{probe_id}/report.svg", response_class=Response, responses={200: {"content": {"image/svg+xml": {}}}}
)
def probe_report_svg(probe_id: str, session: SessionDep, artifacts: ArtifactsDep) -> Response:
    from app.calibration.rendering import render_svg

    probe = _probe(session, probe_id)
    svg = cached_render(
        artifacts,
        probe.artifact,
        "report.svg",
        lambda: render_svg(_labelled_reports(_report(artifacts, probe), probe)).encode(),
    )
    return Response(svg, media_type="image/svg+xml")


@router.get(
    "/v1/probes/{probe_id}/report.png", response_class=Response, responses={200: {"content": {"image/png": {}}}}
)
def probe_report_png(probe_id: str, session: SessionDep, artifacts: ArtifactsDep) -> Response:
    from app.calibration.rendering import render_png

    probe = _probe(session, probe_id)
    return Response(
        cached_render(
            artifacts,
            probe.artifact,
            "report.png",
            lambda: render_png(_labelled_reports(_report(artifacts, probe), probe)),
        ),
        media_type="image/png",
    )


@router.get("/v1/probes/{probe_id}/report.html", response_class=HTMLResponse)
def probe_report_html(probe_id: str, session: SessionDep, artifacts: ArtifactsDep) -> HTMLResponse:
    from app.calibration.rendering import baseline_title, render_html

    probe = _probe(session, probe_id)

    def render() -> bytes:
        title = f"Probe {probe.id}: layer {probe.layer}, {probe.method}" + (
            f", {probe.recalibration} recalibration" if probe.recalibration else ""
        )
        notes = [
            f"model {probe.model_id}" + (f" with adapter {probe.adapter_id}" if probe.adapter_id else ""),
            f"dataset {probe.dataset_id}",
            prompt_format_note(probe.prompt_format),
            "held-out test split",
        ]
        report = _report(artifacts, probe)
        versus = [(baseline_title(name), by_metric) for name, by_metric in report.get("versus_baselines", {}).items()]
        return render_html(title, _labelled_reports(report, probe), versus=versus, notes=notes).encode()

    return HTMLResponse(cached_render(artifacts, probe.artifact, "report.html", render))


@router.get("/v1/probes/{probe_id}/card")
def show_probe_card(probe_id: str, session: SessionDep) -> ProbeCard:
    """What it takes to apply the probe outside the service: the formula and its arrays, the
    model, adapter, layer, token position and prompt format it reads, the dataset and split
    it was trained on, and its held-out metrics. The same card is in the exported weights."""
    return probe_card(session, _probe(session, probe_id))


@router.get(
    "/v1/probes/{probe_id}/weights",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "A safetensors file."}},
)
def probe_weights(probe_id: str, session: SessionDep, artifacts: ArtifactsDep) -> Response:
    """The probe as a safetensors file of float64 arrays (the card's `arrays`), to apply with
    numpy as the card's `formula` says; the card itself is JSON under `card` in the file's
    `__metadata__`."""
    probe = _probe(session, probe_id)
    return Response(
        probe_export(session, artifacts, probe),
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{probe.id}.safetensors"'},
    )


def _scoring_format(probe: Probe, model: Model, asked: str | None) -> str:
    """The prompt format texts are scored under: the one asked for, else the probe's own
    unless that is a multiple-choice template, which has no `{text}` to fill."""
    if asked is None:
        try:
            check_prompt_format(probe.prompt_format, "text")
        except InvalidPromptFormat:
            raise invalid_field(
                "prompt_format",
                f"probe {probe.id} was trained under a multiple-choice template, which texts cannot fill; "
                "give a prompt_format for texts (`raw`, `chat`, or a template naming {text})",
            ) from None
        asked = probe.prompt_format
    return checked_prompt_format(model, asked, "text")


@router.post(
    "/v1/probes/{probe_id}/score",
    responses={202: {"model": JobAccepted, "description": "Not done within timeout_s: follow the job."}},
)
async def score_texts(
    probe_id: str,
    body: ScoreRequest,
    request: Request,
    response: Response,
    settings: SettingsDep,
    sessions: SessionsDep,
    connection: RedisDep,
) -> Any:
    """P(correct) for each text. Waits up to `timeout_s` for a worker, then answers 202 with
    the job instead."""
    if len(body.texts) > settings.max_score_texts:
        raise ServiceError(
            413, "payload_too_large", f"texts: at most {settings.max_score_texts} texts per request", field="texts"
        )
    refuse_empty_texts(body.texts)
    with sessions() as session:
        probe = _probe(session, probe_id)
        prompt_format = _scoring_format(probe, get_model(session, probe.model_id), body.prompt_format)
    job, _ = jobs.submit(
        sessions,
        connection,
        settings,
        "probe_scoring",
        lambda _session, _job_id: jobs.Submission(
            ProbeScoringParameters(probe_id=probe.id, texts=body.texts, prompt_format=prompt_format),
            probe.model_id,
            None,
        ),
    )
    final = await jobs.wait_for_final(sessions, request.app.state.async_redis, settings, job.id, body.timeout_s)
    if final.status == "succeeded" and final.result is not None:
        return ScoreOut(probe_id=probe_id, layer=probe.layer, confidences=final.result["confidences"])
    if final.status == "failed" and final.error is not None:
        # the job's own error: a bug in it is a 500, anything else is about this request
        raise ServiceError(
            500 if final.error.code == "internal" else 422, final.error.code, final.error.message, job_id=job.id
        )
    response.status_code = 202
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobAccepted(job=final)


# --- a probe run's layer sweep ---------------------------------------------------------------


def _finished_run(session: Session, run_id: str) -> tuple[ProbeRun, list[Probe]]:
    run = session.get(ProbeRun, run_id)
    if run is None:
        raise not_found("probe run", run_id)
    probes = list(session.scalars(select(Probe).where(Probe.run_id == run_id).order_by(Probe.layer, Probe.method)))
    if run.artifact is None or not probes:
        job = session.get(Job, run.job_id)
        status = job.status if job else "failed"
        raise ServiceError(
            409, "not_ready", f"probe run {run.id} is {status}; its probes are not there yet", job_status=status
        )
    return run, probes


def _sweep(run: ProbeRun, probes: list[Probe]) -> tuple[dict[str, dict[int, dict[str, Any]]], str, dict[str, int]]:
    """A curve per method over the run's layers, the run's title, and each method's best layer on validation."""
    curves: dict[str, dict[int, dict[str, Any]]] = {}
    for probe in probes:
        curves.setdefault(probe.method, {})[probe.layer] = probe.metrics
    chosen: dict[str, int] = {}
    for method in curves:
        candidates = [probe for probe in probes if probe.method == method]
        best = max(candidates, key=lambda p: (p.validation.get("auroc") or -1.0, -(p.validation.get("nll") or 0.0)))
        chosen[method] = best.layer
    title = f"Probe run {run.id}: model {run.model_id}" + (f", adapter {run.adapter_id}" if run.adapter_id else "")
    return curves, title + f", dataset {run.dataset_id}", chosen


@router.get(
    "/v1/probe-runs/{run_id}/layers.svg", response_class=Response, responses={200: {"content": {"image/svg+xml": {}}}}
)
def probe_run_sweep_svg(run_id: str, session: SessionDep, artifacts: ArtifactsDep) -> Response:
    """Test AUROC and ECE against the layer, a curve per method with interval bands."""
    from app.calibration.sweeps import render_sweep_svg

    run, probes = _finished_run(session, run_id)
    assert run.artifact is not None
    svg = cached_render(artifacts, run.artifact, "layers.svg", lambda: render_sweep_svg(*_sweep(run, probes)).encode())
    return Response(svg, media_type="image/svg+xml")


@router.get(
    "/v1/probe-runs/{run_id}/layers.png", response_class=Response, responses={200: {"content": {"image/png": {}}}}
)
def probe_run_sweep_png(run_id: str, session: SessionDep, artifacts: ArtifactsDep) -> Response:
    from app.calibration.sweeps import render_sweep_png

    run, probes = _finished_run(session, run_id)
    assert run.artifact is not None
    png = cached_render(artifacts, run.artifact, "layers.png", lambda: render_sweep_png(*_sweep(run, probes)))
    return Response(png, media_type="image/png")


@router.get("/v1/probe-runs/{run_id}/report.html", response_class=HTMLResponse)
def probe_run_html(run_id: str, session: SessionDep, artifacts: ArtifactsDep) -> HTMLResponse:
    """The run's page: the layer sweep and every probe's test metrics with intervals."""
    from app.calibration.sweeps import estimate_cell, render_run_html

    run, probes = _finished_run(session, run_id)
    assert run.artifact is not None

    def render() -> bytes:
        curves, title, chosen = _sweep(run, probes)
        rows = [
            [
                str(probe.layer),
                probe.method,
                "★ best of the run"
                if probe.is_best
                else ("best " + probe.method if chosen[probe.method] == probe.layer else ""),
                *(estimate_cell(probe.metrics, name) for name in ("auroc", "ece", "brier")),
            ]
            for probe in probes
        ]
        split = run.split
        notes = [
            f"{run.token_position} token, {prompt_format_note(run.prompt_format)}",
            f"split train/validation/test {split['train']:g}/{split['validation']:g}/{split['test']:g}, seed {split['seed']}",
            "each probe's report: GET /v1/probes/{id}/report.html",
        ]
        return render_run_html(title, curves, chosen, rows, notes).encode()

    return HTMLResponse(cached_render(artifacts, run.artifact, "report.html", render))
