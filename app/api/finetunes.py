"""`/v1/finetunes`: train a LoRA adapter from a base model and a dataset as a job, follow its
loss, and find the adapter it registered. Cancelling goes through the job
(`POST /v1/jobs/{id}/cancel`)."""

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

from app import jobs
from app.api.deps import ArtifactsDep, RedisDep, SessionDep, SessionsDep, SettingsDep
from app.api.render_cache import cached_render
from app.errors import ServiceError, not_found
from app.inputs.adapter_sources import require_tinker_key
from app.inputs.prompt_formats import prompt_format_note
from app.job_kinds import FinetuneParameters
from app.registry.finetunes import finetune_view, list_finetunes, new_finetune
from app.registry.tables import Finetune, Job
from app.schemas.common import ERROR_RESPONSES
from app.schemas.finetunes import FinetuneAccepted, FinetuneCreate, FinetuneOut, FinetunePage, LossHistory
from app.schemas.jobs import JobOut
from app.storage import ArtifactStore

router = APIRouter(prefix="/v1/finetunes", tags=["finetunes"], responses=ERROR_RESPONSES)
HISTORY_FILE = "history.json"


@router.post("", status_code=202)
def create_finetune(
    body: FinetuneCreate, response: Response, settings: SettingsDep, sessions: SessionsDep, connection: RedisDep
) -> FinetuneAccepted:
    """Queue a fine-tune: training examples from the dataset (completions only in the loss),
    LoRA on the base, checkpoints a retried attempt resumes from, and the adapter registered
    with its provenance when it ends. Progress reports each step's loss and learning rate."""
    if body.backend == "tinker":
        require_tinker_key(settings, "Tinker fine-tunes")

    def prepare(session: Session, job_id: str) -> jobs.Submission[Finetune]:
        finetune = new_finetune(session, body, job_id)
        return jobs.Submission(FinetuneParameters(finetune_id=finetune.id), finetune.base_model_id, finetune)

    job, finetune = jobs.submit(sessions, connection, settings, "finetune", prepare)
    response.headers["Location"] = f"/v1/finetunes/{finetune.id}"
    return FinetuneAccepted(job=JobOut.of(job), finetune=finetune_view(finetune, job.status))


@router.get("")
def finetunes(
    session: SessionDep,
    settings: SettingsDep,
    base_model: Annotated[str | None, Query(max_length=40)] = None,
    cursor: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> FinetunePage:
    rows, next_cursor = list_finetunes(
        session, base_model=base_model, cursor=cursor, limit=min(limit, settings.page_size_max)
    )
    statuses = _statuses(session, rows)
    return FinetunePage(items=[finetune_view(row, statuses[row.job_id]) for row in rows], next_cursor=next_cursor)


def _statuses(session: Session, rows: list[Finetune]) -> dict[str, str]:
    found = {job.id: job.status for job in (session.get(Job, row.job_id) for row in rows) if job is not None}
    return {row.job_id: found.get(row.job_id, "failed") for row in rows}


def _finetune(session: Session, finetune_id: str) -> tuple[Finetune, str]:
    finetune = session.get(Finetune, finetune_id)
    if finetune is None:
        raise not_found("fine-tune", finetune_id)
    job = session.get(Job, finetune.job_id)
    return finetune, job.status if job else "failed"


@router.get("/{finetune_id}")
def show_finetune(finetune_id: str, session: SessionDep) -> FinetuneOut:
    return finetune_view(*_finetune(session, finetune_id))


def _points(artifacts: ArtifactStore, finetune: Finetune, status: str) -> list[dict[str, Any]]:
    """The loss history, once the run has ended and written it."""
    try:
        return json.loads(artifacts.read_bytes(f"{finetune.artifact}/{HISTORY_FILE}"))["points"]
    except FileNotFoundError:
        raise ServiceError(
            409,
            "not_ready",
            f"fine-tune {finetune.id} is {status}; its loss history is written when it ends "
            "(each step's loss is in the job's progress meanwhile)",
            job_status=status,
        ) from None


@router.get("/{finetune_id}/history")
def finetune_history(finetune_id: str, session: SessionDep, artifacts: ArtifactsDep) -> LossHistory:
    """Every step's training loss, learning rate and completion tokens, and the validation
    loss where it was computed."""
    finetune, status = _finetune(session, finetune_id)
    return LossHistory(finetune_id=finetune.id, points=_points(artifacts, finetune, status))


def _title(finetune: Finetune) -> str:
    return f"Fine-tune {finetune.name} ({finetune.id})"


@router.get("/{finetune_id}/loss.svg", response_class=Response, responses={200: {"content": {"image/svg+xml": {}}}})
def finetune_loss_svg(finetune_id: str, session: SessionDep, artifacts: ArtifactsDep) -> Response:
    from app.calibration.loss_curves import render_loss_svg

    finetune, status = _finetune(session, finetune_id)
    points = _points(artifacts, finetune, status)
    svg = cached_render(
        artifacts, finetune.artifact, "loss.svg", lambda: render_loss_svg(_title(finetune), points).encode()
    )
    return Response(svg, media_type="image/svg+xml")


@router.get("/{finetune_id}/loss.png", response_class=Response, responses={200: {"content": {"image/png": {}}}})
def finetune_loss_png(finetune_id: str, session: SessionDep, artifacts: ArtifactsDep) -> Response:
    from app.calibration.loss_curves import render_loss_png

    finetune, status = _finetune(session, finetune_id)
    points = _points(artifacts, finetune, status)
    png = cached_render(artifacts, finetune.artifact, "loss.png", lambda: render_loss_png(_title(finetune), points))
    return Response(png, media_type="image/png")


def _facts(finetune: Finetune) -> list[tuple[str, str]]:
    summary = finetune.summary or {}
    lora, training = finetune.settings["lora"], finetune.settings["training"]
    facts = [
        ("base model", finetune.base_model_id),
        ("dataset", f"{finetune.dataset_id} (sha256 {finetune.dataset_sha256[:12]}…)"),
        ("backend", finetune.backend),
        ("adapter", finetune.adapter_id or "—"),
        ("LoRA", ", ".join(f"{key} {value}" for key, value in lora.items())),
        ("training", ", ".join(f"{key} {value}" for key, value in training.items() if value is not None)),
        ("prompt", prompt_format_note(finetune.prompt_format)),
    ]
    facts += [(key.replace("_", " "), _shown(value)) for key, value in summary.items()]
    return facts


def _shown(value: Any) -> str:
    """A summary value as a reader wants it: numbers to four significant digits, none as a dash."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{key.replace('_', ' ')} {_shown(item)}" for key, item in value.items())
    return str(value)


@router.get("/{finetune_id}/report.html", response_class=HTMLResponse)
def finetune_page(finetune_id: str, session: SessionDep, artifacts: ArtifactsDep) -> HTMLResponse:
    """The loss curve and what the run was, as one self-contained page."""
    from app.calibration.loss_curves import render_loss_html

    finetune, status = _finetune(session, finetune_id)
    points = _points(artifacts, finetune, status)
    page = cached_render(
        artifacts,
        finetune.artifact,
        "report.html",
        lambda: render_loss_html(_title(finetune), points, _facts(finetune)).encode(),
    )
    return HTMLResponse(page)
