"""`/v1/transfers`: transfer matrices — probes trained on some datasets, scored on others —
as a job; the matrix as JSON, a heatmap (SVG, PNG) and an HTML page."""

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import HTMLResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import jobs
from app.api.deps import ArtifactsDep, Force, RedisDep, SessionDep, SessionsDep, SettingsDep
from app.api.render_cache import cached_render
from app.deletions import DELETE_RESPONSES, delete_resource
from app.errors import ServiceError, not_found
from app.inputs.prompt_formats import prompt_format_note
from app.job_kinds import TransferParameters
from app.registry.database import keyset_page
from app.registry.tables import Job, Transfer
from app.registry.transfers import new_transfer
from app.schemas.common import ERROR_RESPONSES
from app.schemas.jobs import JobOut
from app.schemas.transfers import TransferAccepted, TransferCreate, TransferOut, TransferPage
from app.storage import ArtifactStore

router = APIRouter(prefix="/v1/transfers", tags=["transfers"], responses=ERROR_RESPONSES)


@router.post("", status_code=202)
def create_transfer(
    body: TransferCreate, response: Response, settings: SettingsDep, sessions: SessionsDep, connection: RedisDep
) -> TransferAccepted:
    """Queue a transfer matrix: a probe per training set (or one on their union) at each
    layer, the layer chosen on the training set's validation split, scored on every test
    set — on its test split when it is a training set too — with AUROC, accuracy, ECE and
    the rest of the report's metrics, each with its interval."""

    def prepare(session: Session, job_id: str) -> jobs.Submission[Transfer]:
        transfer = new_transfer(session, body, job_id)
        return jobs.Submission(TransferParameters(transfer_id=transfer.id), transfer.model_id, transfer)

    job, transfer = jobs.submit(sessions, connection, settings, "transfer", prepare)
    response.headers["Location"] = f"/v1/transfers/{transfer.id}"
    return TransferAccepted(job=JobOut.of(job), transfer=TransferOut.of(transfer, job.status, None))


def _status(session: Session, transfer: Transfer) -> str:
    job = session.get(Job, transfer.job_id)
    return job.status if job else "failed"


def _matrix(artifacts: ArtifactStore, transfer: Transfer) -> dict[str, Any] | None:
    return json.loads(artifacts.read_bytes(f"{transfer.artifact}/matrix.json")) if transfer.artifact else None


@router.get("")
def list_transfers(
    session: SessionDep,
    settings: SettingsDep,
    model: Annotated[str | None, Query(max_length=40)] = None,
    cursor: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> TransferPage:
    """Transfer matrices, oldest first, without their cells (read one for those)."""
    query = select(Transfer)
    if model:
        query = query.where(Transfer.model_id == model)
    items, next_cursor = keyset_page(session, query, Transfer.id, cursor, min(limit, settings.page_size_max))
    return TransferPage(
        items=[TransferOut.of(item, _status(session, item), None) for item in items], next_cursor=next_cursor
    )


def _transfer(session: Session, transfer_id: str) -> Transfer:
    transfer = session.get(Transfer, transfer_id)
    if transfer is None:
        raise not_found("transfer", transfer_id)
    return transfer


# A stored matrix is served as written: keys it lacks stay absent rather than null.
@router.get("/{transfer_id}", response_model_exclude_unset=True)
def show_transfer(transfer_id: str, session: SessionDep, artifacts: ArtifactsDep) -> TransferOut:
    transfer = _transfer(session, transfer_id)
    return TransferOut.of(transfer, _status(session, transfer), _matrix(artifacts, transfer))


@router.delete("/{transfer_id}", status_code=204, responses=DELETE_RESPONSES)
def delete_transfer(
    transfer_id: str,
    sessions: SessionsDep,
    artifacts: ArtifactsDep,
    connection: RedisDep,
    settings: SettingsDep,
    force: Force = False,
) -> Response:
    """Delete the transfer matrix and its folder (the matrix and the renderings of it)."""
    delete_resource(sessions, artifacts, connection, settings, "transfers", transfer_id, force)
    return Response(status_code=204)


def _finished(session: Session, artifacts: ArtifactStore, transfer_id: str) -> tuple[Transfer, dict[str, Any]]:
    transfer = _transfer(session, transfer_id)
    matrix = _matrix(artifacts, transfer)
    if matrix is None:
        status = _status(session, transfer)
        raise ServiceError(
            409, "not_ready", f"transfer {transfer.id} is {status}; its matrix is not there yet", job_status=status
        )
    return transfer, matrix


def _title(transfer: Transfer) -> str:
    variant = f"adapter {transfer.adapter_id}" if transfer.adapter_id else f"model {transfer.model_id}"
    return f"Transfer {transfer.id}: {transfer.method} probes of {variant}"


@router.get("/{transfer_id}/matrix.svg", response_class=Response, responses={200: {"content": {"image/svg+xml": {}}}})
def transfer_svg(transfer_id: str, session: SessionDep, artifacts: ArtifactsDep) -> Response:
    from app.calibration.matrices import render_matrix_svg

    transfer, matrix = _finished(session, artifacts, transfer_id)
    assert transfer.artifact is not None
    svg = cached_render(
        artifacts, transfer.artifact, "matrix.svg", lambda: render_matrix_svg(matrix, _title(transfer)).encode()
    )
    return Response(svg, media_type="image/svg+xml")


@router.get("/{transfer_id}/matrix.png", response_class=Response, responses={200: {"content": {"image/png": {}}}})
def transfer_png(transfer_id: str, session: SessionDep, artifacts: ArtifactsDep) -> Response:
    from app.calibration.matrices import render_matrix_png

    transfer, matrix = _finished(session, artifacts, transfer_id)
    assert transfer.artifact is not None
    png = cached_render(artifacts, transfer.artifact, "matrix.png", lambda: render_matrix_png(matrix, _title(transfer)))
    return Response(png, media_type="image/png")


@router.get("/{transfer_id}/report.html", response_class=HTMLResponse)
def transfer_html(transfer_id: str, session: SessionDep, artifacts: ArtifactsDep) -> HTMLResponse:
    from app.calibration.matrices import render_matrix_html

    transfer, matrix = _finished(session, artifacts, transfer_id)
    assert transfer.artifact is not None

    def render() -> bytes:
        split = transfer.split
        notes = [
            f"layers {', '.join(map(str, transfer.layers))}; each row's layer chosen on its validation split",
            f"{transfer.token_position} token, {prompt_format_note(transfer.prompt_format)}",
            f"split train/validation/test {split['train']:g}/{split['validation']:g}/{split['test']:g}, seed {split['seed']}",
            "a test set that is also a training set is scored on its test split only",
        ]
        if transfer.union_train:
            notes.append("one probe on the union of the training sets' train splits")
        return render_matrix_html(matrix, _title(transfer), notes).encode()

    return HTMLResponse(cached_render(artifacts, transfer.artifact, "report.html", render))
