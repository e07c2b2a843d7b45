"""`/v1/adapters`: import LoRA adapters (Tinker, folders, archives, URLs, uploads) as jobs;
list, show and delete them."""

import shutil
from collections.abc import Callable
from typing import Annotated

import redis
from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from pydantic import AfterValidator
from sqlalchemy.orm import Session, sessionmaker

from app import jobs
from app.api.deps import ArtifactsDep, RedisDep, SessionDep, SessionsDep, SettingsDep
from app.errors import ServiceError, invalid_field, nul_free_filename
from app.inputs.adapter_sources import classify_source
from app.inputs.archives import FORMAT_HEAD_BYTES, ArchiveRejected, archive_format_of
from app.inputs.documents import parse_document
from app.job_kinds import AdapterImportParameters
from app.registry.adapters import artifact_in_use, get_adapter, list_adapters
from app.registry.database import transaction
from app.registry.deletions import jobs_using_adapter
from app.registry.models import get_model
from app.registry.tables import Job, new_id
from app.schemas.adapters import AdapterImport, AdapterOut, AdapterPage
from app.schemas.common import ERROR_RESPONSES, without_nul
from app.schemas.jobs import JobAccepted, JobOut
from app.settings import Settings

router = APIRouter(prefix="/v1/adapters", tags=["adapters"], responses=ERROR_RESPONSES)


def _queue_import(
    sessions: sessionmaker[Session],
    connection: redis.Redis,
    settings: Settings,
    params: AdapterImportParameters,
    undo_also: Callable[[], None] | None = None,
) -> Job:
    def prepare(session: Session, _job_id: str) -> jobs.Submission[None]:
        base = get_model(session, params.base_model_id)
        return jobs.Submission(params, base.id, None)

    job, _ = jobs.submit(sessions, connection, settings, "adapter_import", prepare, undo_also)
    return job


@router.post("/import", status_code=202)
def import_adapter(
    body: AdapterImport, response: Response, settings: SettingsDep, sessions: SessionsDep, connection: RedisDep
) -> JobAccepted:
    """Import from a Tinker checkpoint, a local PEFT folder or archive, or an allowed URL. The
    job converts the adapter to PEFT, checks it against the base model, and registers it."""
    source = classify_source(body.source, settings)
    params = AdapterImportParameters(
        source_kind=source.kind,
        source=source.location,
        tinker_run_id=source.tinker_run_id,
        base_model_id=body.base_model,
        name=body.name,
        metadata=body.metadata,
    )
    job = _queue_import(sessions, connection, settings, params)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobAccepted(job=JobOut.of(job))


@router.post("/upload", status_code=202)
def upload_adapter(
    file: Annotated[
        UploadFile, File(description="`.tar`, `.tar.gz` or `.zip` of a PEFT adapter or a Tinker checkpoint.")
    ],
    base_model: Annotated[
        str, Form(description="Id of the base model it was trained on."), AfterValidator(without_nul)
    ],
    name: Annotated[str, Form(min_length=1, max_length=200), AfterValidator(without_nul)],
    response: Response,
    settings: SettingsDep,
    sessions: SessionsDep,
    connection: RedisDep,
    artifacts: ArtifactsDep,
    metadata: Annotated[
        str | None, Form(description="Training metadata as a JSON object."), AfterValidator(without_nul)
    ] = None,
) -> JobAccepted:
    """Upload an adapter archive (including the legacy Tinker `.tar`); the job unpacks it as
    hostile input, converts and registers it."""
    source = nul_free_filename(file.filename) or "upload"
    user_metadata = parse_document(metadata, "json", "metadata") if metadata else {}
    if not isinstance(user_metadata, dict):
        raise invalid_field("metadata", "must be a JSON object")
    with sessions() as session:
        get_model(session, base_model)
    try:
        archive_format_of(file.file.read(FORMAT_HEAD_BYTES))
    except ArchiveRejected as exc:
        raise ServiceError(exc.status, exc.code, f"file: {exc.message}", field="file") from exc
    file.file.seek(0)
    # through the store, not a local folder: the worker that imports it may be on another machine
    staged = f"staging/uploads/{new_id('upl')}.archive"
    with artifacts.writer(staged) as handle:
        shutil.copyfileobj(file.file, handle, 1 << 20)
    params = AdapterImportParameters(
        source_kind="upload", source=source, upload=staged, base_model_id=base_model, name=name, metadata=user_metadata
    )
    try:
        job = _queue_import(sessions, connection, settings, params, undo_also=lambda: artifacts.delete(staged))
    except ServiceError:
        artifacts.delete(staged)
        raise
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobAccepted(job=JobOut.of(job))


@router.get("")
def list_imported_adapters(
    session: SessionDep,
    settings: SettingsDep,
    base_model: Annotated[str | None, Query(max_length=40)] = None,
    cursor: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> AdapterPage:
    adapters, next_cursor = list_adapters(
        session, base_model_id=base_model, cursor=cursor, limit=min(limit, settings.page_size_max)
    )
    return AdapterPage(items=[AdapterOut.of(adapter) for adapter in adapters], next_cursor=next_cursor)


@router.get("/{adapter_id}")
def show_adapter(adapter_id: str, session: SessionDep) -> AdapterOut:
    return AdapterOut.of(get_adapter(session, adapter_id))


@router.delete(
    "/{adapter_id}",
    status_code=204,
    responses={409: {"description": "In use by a queued or running job; `?force=true` deletes anyway."}},
)
def delete_adapter(adapter_id: str, sessions: SessionsDep, artifacts: ArtifactsDep, force: bool = False) -> Response:
    """Remove the adapter's row and files together."""
    with transaction(sessions) as session:
        adapter = get_adapter(session, adapter_id)
        users = jobs_using_adapter(session, adapter_id)
        if users and not force:
            raise ServiceError(
                409,
                "conflict",
                f"adapter {adapter_id} is used by {len(users)} unfinished jobs; pass force=true to delete anyway",
                used_by=list(users),
            )
        artifact = adapter.artifact
        session.delete(adapter)
        session.flush()
        shared = artifact_in_use(session, artifact)
    if not shared:
        artifacts.delete_prefix(artifact)
    return Response(status_code=204)
