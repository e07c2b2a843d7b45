"""`/v1/comparisons`: a base model and its adapters side by side, as a job; the report as
JSON, SVG (one reliability curve per model) and HTML."""

import json
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

from app import jobs
from app.api.deps import ArtifactsDep, Force, RedisDep, SessionDep, SessionsDep, SettingsDep
from app.api.render_cache import cached_render
from app.deletions import DELETE_RESPONSES, delete_resource
from app.errors import ServiceError, not_found
from app.inputs.prompt_formats import prompt_format_note
from app.job_kinds import ComparisonParameters, SplitParameters
from app.registry.comparisons import new_comparison
from app.registry.tables import Comparison, Job
from app.schemas.common import ERROR_RESPONSES
from app.schemas.comparisons import ComparisonAccepted, ComparisonCreate, ComparisonOut
from app.schemas.jobs import JobOut
from app.storage import ArtifactStore

router = APIRouter(prefix="/v1/comparisons", tags=["comparisons"], responses=ERROR_RESPONSES)


def _view(comparison: Comparison, status: str, report: dict[str, Any] | None) -> ComparisonOut:
    fields = {
        name: getattr(comparison, name) for name in ComparisonOut.model_fields if name not in {"status", "report"}
    }
    return ComparisonOut(**fields, status=status, report=report)


@router.post("", status_code=202)
def compare(
    body: ComparisonCreate, response: Response, settings: SettingsDep, sessions: SessionsDep, connection: RedisDep
) -> ComparisonAccepted:
    """Queue a comparison: the same texts, split and layers for the base and each adapter;
    a probe per model and layer; metrics side by side with paired-bootstrap differences,
    and cross-transfer (the base's probe on each adapter's states and back)."""

    def prepare(session: Session, job_id: str) -> jobs.Submission[Comparison]:
        comparison = new_comparison(session, body, job_id)
        params = ComparisonParameters(
            comparison_id=comparison.id,
            split=SplitParameters(
                train=body.split.train, validation=body.split.validation, test=body.split.test, seed=body.seed
            ),
            max_length=body.max_length,
        )
        return jobs.Submission(params, comparison.model_id, comparison)

    job, comparison = jobs.submit(sessions, connection, settings, "comparison", prepare)
    response.headers["Location"] = f"/v1/comparisons/{comparison.id}"
    return ComparisonAccepted(job=JobOut.of(job), comparison=_view(comparison, job.status, None))


def _comparison(session: Session, comparison_id: str) -> tuple[Comparison, str]:
    comparison = session.get(Comparison, comparison_id)
    if comparison is None:
        raise not_found("comparison", comparison_id)
    job = session.get(Job, comparison.job_id)
    return comparison, job.status if job else "failed"


def _report(artifacts: ArtifactStore, comparison: Comparison) -> dict[str, Any] | None:
    return json.loads(artifacts.read_bytes(comparison.artifact)) if comparison.artifact else None


def _finished_report(artifacts: ArtifactStore, comparison: Comparison, status: str) -> dict[str, Any]:
    report = _report(artifacts, comparison)
    if report is None:
        raise ServiceError(
            409, "not_ready", f"comparison {comparison.id} is {status}; its report is not there yet", job_status=status
        )
    return report


def _folder(comparison: Comparison) -> str:
    """The folder of the comparison's report, where its renderings are kept too."""
    assert comparison.artifact is not None  # _finished_report has checked
    return comparison.artifact.rsplit("/", 1)[0]


def _curves(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(variant["label"], variant["report"]) for variant in report["variants"]]


# A stored report is served as written: keys it lacks stay absent rather than null.
@router.get("/{comparison_id}", response_model_exclude_unset=True)
def show_comparison(comparison_id: str, session: SessionDep, artifacts: ArtifactsDep) -> ComparisonOut:
    comparison, status = _comparison(session, comparison_id)
    return _view(comparison, status, _report(artifacts, comparison))


@router.delete("/{comparison_id}", status_code=204, responses=DELETE_RESPONSES)
def delete_comparison(
    comparison_id: str,
    sessions: SessionsDep,
    artifacts: ArtifactsDep,
    connection: RedisDep,
    settings: SettingsDep,
    force: Force = False,
) -> Response:
    """Delete the comparison, its report and the renderings of it."""
    delete_resource(sessions, artifacts, connection, settings, "comparisons", comparison_id, force)
    return Response(status_code=204)


@router.get("/{comparison_id}/report.svg", response_class=Response, responses={200: {"content": {"image/svg+xml": {}}}})
def comparison_svg(comparison_id: str, session: SessionDep, artifacts: ArtifactsDep) -> Response:
    from app.calibration.rendering import render_svg

    comparison, status = _comparison(session, comparison_id)
    report = _finished_report(artifacts, comparison, status)
    svg = cached_render(artifacts, _folder(comparison), "report.svg", lambda: render_svg(_curves(report)).encode())
    return Response(svg, media_type="image/svg+xml")


@router.get("/{comparison_id}/report.html", response_class=HTMLResponse)
def comparison_html(comparison_id: str, session: SessionDep, artifacts: ArtifactsDep) -> HTMLResponse:
    from app.calibration.rendering import render_html

    comparison, status = _comparison(session, comparison_id)
    report = _finished_report(artifacts, comparison, status)

    def render() -> bytes:
        notes = [
            f"layer {report['layer']} (chosen on the base's validation split), {comparison.method} probes, held-out test split",
            prompt_format_note(comparison.prompt_format),
            *report["flags"],
        ]
        for label, answered in (report.get("answers") or {}).items():
            picks = ", ".join(f"{letter} {count}" for letter, count in answered["picks"].items())
            notes.append(
                f"{label} answers {answered['accuracy']:.1%} of {answered['n']} questions right; picks {picks}"
            )
        for label, moved in (report.get("answer_differences") or {}).items():
            accuracy = moved["accuracy"]
            low, high = accuracy["interval"] or (float("nan"), float("nan"))
            notes.append(
                f"{label} accuracy minus the base's: {accuracy['value']:+.1%} [{low:+.1%}, {high:+.1%}] "
                f"({accuracy['estimator']}); letter picks moved by {moved['picks_total_variation']:.1%} (total variation)"
            )
        for label, transfer in report["cross_transfer"].items():
            notes.append(
                f"cross-transfer {label}: AUROC {transfer['auroc']:.3f}"
                if transfer.get("auroc") is not None
                else f"cross-transfer {label}: —"
            )
        title = f"Comparison {comparison.id}: base vs {len(comparison.adapter_ids)} adapter(s)"
        sections = []
        if report.get("per_layer_test"):
            from app.calibration.sweeps import sweep_section

            curves: dict[str, dict[int, Any]] = {}
            for layer, by_variant in report["per_layer_test"].items():
                for label, metrics in by_variant.items():
                    curves.setdefault(label, {})[int(layer)] = metrics
            chosen = dict.fromkeys(curves, report["layer"])
            sections.append(sweep_section(curves, f"{title}: layer sweep", chosen))
        return render_html(
            title, _curves(report), differences=report["differences"], notes=notes, sections=sections
        ).encode()

    return HTMLResponse(cached_render(artifacts, _folder(comparison), "report.html", render))
