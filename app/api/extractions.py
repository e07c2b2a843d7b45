"""`/v1/extractions`: hidden states of texts at layers, computed by a job, downloaded as
`.npy` or `.safetensors`."""

import io
import itertools
import json
import struct
from collections.abc import Iterator
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import jobs
from app.api.deps import ArtifactsDep, Force, RedisDep, SessionDep, SessionsDep, SettingsDep
from app.deletions import DELETE_RESPONSES, delete_resource
from app.errors import ServiceError, not_found
from app.job_kinds import ExtractionParameters
from app.registry.database import keyset_page
from app.registry.extractions import new_extraction
from app.registry.tables import Extraction, Job
from app.schemas.common import ERROR_RESPONSES
from app.schemas.extractions import (
    ExtractionAccepted,
    ExtractionCreate,
    ExtractionOut,
    ExtractionPage,
)
from app.schemas.jobs import JobOut
from app.storage import ArtifactStore

router = APIRouter(prefix="/v1/extractions", tags=["extractions"], responses=ERROR_RESPONSES)

CHUNK_BYTES = 1 << 20


@router.post("", status_code=202)
def create_extraction(
    body: ExtractionCreate, response: Response, settings: SettingsDep, sessions: SessionsDep, connection: RedisDep
) -> ExtractionAccepted:
    """Queue an extraction. The answer comes at once; follow the job, then download."""

    def prepare(session: Session, job_id: str) -> jobs.Submission[Extraction]:
        extraction, model = new_extraction(session, body, settings, job_id)
        params = ExtractionParameters(extraction_id=extraction.id, texts=body.texts)
        return jobs.Submission(params, model.id, extraction)

    job, extraction = jobs.submit(sessions, connection, settings, "extraction", prepare)
    response.headers["Location"] = f"/v1/extractions/{extraction.id}"
    return ExtractionAccepted(job=JobOut.of(job), extraction=ExtractionOut.of(extraction, job.status))


def _get(session: SessionDep, extraction_id: str) -> tuple[Extraction, Job]:
    row = session.execute(
        select(Extraction, Job).join(Job, Job.id == Extraction.job_id).where(Extraction.id == extraction_id)
    ).first()
    if row is None:
        raise not_found("extraction", extraction_id)
    return row[0], row[1]


@router.get("")
def list_extractions(
    session: SessionDep,
    settings: SettingsDep,
    cursor: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> ExtractionPage:
    found, next_cursor = keyset_page(
        session, select(Extraction), Extraction.id, cursor, min(limit, settings.page_size_max)
    )
    statuses = dict(session.execute(select(Job.id, Job.status).where(Job.id.in_([e.job_id for e in found]))).all())
    return ExtractionPage(items=[ExtractionOut.of(e, statuses[e.job_id]) for e in found], next_cursor=next_cursor)


@router.get("/{extraction_id}")
def show_extraction(extraction_id: str, session: SessionDep) -> ExtractionOut:
    extraction, job = _get(session, extraction_id)
    return ExtractionOut.of(extraction, job.status)


def _npy_header(shape: list[int]) -> bytes:
    from numpy.lib import format as npy_format

    buffer = io.BytesIO()
    npy_format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue()


def _safetensors_data_range(artifacts: ArtifactStore, key: str) -> tuple[int, int]:
    """Byte range of the one tensor's data in a safetensors file (8-byte header length,
    JSON header, then data), so `.npy` is streamed from the same bytes without loading them."""
    (header_length,) = struct.unpack("<Q", artifacts.read_bytes(key, 0, 8))
    header = json.loads(artifacts.read_bytes(key, 8, 8 + header_length))
    start, end = header["hidden_states"]["data_offsets"]
    return 8 + header_length + start, 8 + header_length + end


@router.delete("/{extraction_id}", status_code=204, responses=DELETE_RESPONSES)
def delete_extraction(
    extraction_id: str,
    sessions: SessionsDep,
    artifacts: ArtifactsDep,
    connection: RedisDep,
    settings: SettingsDep,
    force: Force = False,
) -> Response:
    """Delete the extraction and its array. Its vectors stay in the cache (they go with the
    model), so extracting the same texts again runs no forward pass."""
    delete_resource(sessions, artifacts, connection, settings, "extractions", extraction_id, force)
    return Response(status_code=204)


@router.get(
    "/{extraction_id}/hidden-states",
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The (texts, layers, hidden) float32 array."},
        409: {"description": "Not computed yet."},
    },
)
def download_hidden_states(
    extraction_id: str, session: SessionDep, artifacts: ArtifactsDep, format: Literal["npy", "safetensors"] = "npy"
) -> Response:
    """The array, streamed from the artifact store: `npy` for `numpy.load`, or
    `safetensors` (tensor `hidden_states`, layers in its metadata)."""
    extraction, job = _get(session, extraction_id)
    if extraction.artifact is None or extraction.shape is None:
        raise ServiceError(
            409,
            "not_ready",
            f"extraction {extraction_id} is {job.status}; its hidden states are not there yet",
            status_of_job=job.status,
        )
    key = extraction.artifact
    if format == "safetensors":
        size = artifacts.size(key)  # ArtifactMissing (410) before any answer starts
        path = artifacts.direct_path(key)
        if path is not None:
            return FileResponse(path, media_type="application/octet-stream", filename=f"{extraction_id}.safetensors")
        return _attachment(artifacts.iter_bytes(key, chunk_bytes=CHUNK_BYTES), size, f"{extraction_id}.safetensors")
    header = _npy_header(extraction.shape)
    start, end = _safetensors_data_range(artifacts, key)
    return _attachment(
        itertools.chain([header], artifacts.iter_bytes(key, start, end, CHUNK_BYTES)),
        len(header) + end - start,
        f"{extraction_id}.npy",
    )


def _attachment(chunks: Iterator[bytes], length: int, filename: str) -> StreamingResponse:
    return StreamingResponse(
        chunks,
        media_type="application/octet-stream",
        headers={"Content-Length": str(length), "Content-Disposition": f'attachment; filename="{filename}"'},
    )
