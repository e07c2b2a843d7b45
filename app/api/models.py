"""`/v1/models`: register a base model, list and show them."""

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response, status
from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app import broker, jobs
from app.api.deps import ArtifactsDep, Force, RedisDep, SessionDep, SessionsDep, SettingsDep
from app.deletions import DELETE_RESPONSES, delete_resource
from app.errors import ServiceError
from app.inputs.model_sources import fingerprint, resolve_source, source_shape
from app.job_kinds import ModelCheckParameters
from app.registry.database import transaction
from app.registry.models import find_model, get_model, list_models, new_model
from app.registry.tables import Model
from app.schemas.common import ERROR_RESPONSES
from app.schemas.jobs import JobAccepted, JobOut
from app.schemas.models import ModelCreate, ModelOut, ModelPage
from app.settings import Settings

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": ModelOut, "description": "Already registered: the existing model."}},
)
def register_model(
    body: ModelCreate, response: Response, settings: SettingsDep, sessions: SessionsDep, connection: RedisDep
) -> ModelOut:
    """Register a base model and queue a check in which a worker loads it and runs one
    token through it. The answer comes at once with `status: pending`."""
    model, created = register(body, settings, sessions, connection)
    if created:
        response.headers["Location"] = f"/v1/models/{model.id}"
    else:
        response.status_code = status.HTTP_200_OK
    return ModelOut.of(model)


def register(
    body: ModelCreate, settings: Settings, sessions: sessionmaker[Session], connection: Any
) -> tuple[Model, bool]:
    """The registered model, and whether this call registered it (else it already was)."""
    source = resolve_source(body.source, body.revision, settings.hf_cache_dir, settings.model_roots)
    shape = source_shape(source)
    model = new_model(body.name, source, body.revision, body.dtype, body.quantization, shape, fingerprint(source))
    job = jobs.new_job(
        "model_check", ModelCheckParameters(model_id=model.id), broker.default_queue(settings), model_id=model.id
    )
    model.check_job_id = job.id
    try:
        with transaction(sessions) as session:
            existing = find_model(session, source, body.revision, body.dtype, body.quantization)
            if existing is not None:
                return existing, False
            session.add(model)
            session.flush()
            session.add(job)
    except IntegrityError:  # registered concurrently by another request
        with sessions() as session:
            existing = find_model(session, source, body.revision, body.dtype, body.quantization)
        if existing is None:
            raise ServiceError(409, "conflict", "the model is being registered by another request; retry") from None
        return existing, False

    def undo(session: Session) -> None:
        jobs.deleting(job.id)(session)
        session.execute(delete(Model).where(Model.id == model.id))

    jobs.enqueue(sessions, connection, settings, job, undo)
    return model, True


@router.get("")
def list_registered_models(
    session: SessionDep,
    settings: SettingsDep,
    cursor: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> ModelPage:
    models, next_cursor = list_models(session, cursor=cursor, limit=min(limit, settings.page_size_max))
    return ModelPage(items=[ModelOut.of(model) for model in models], next_cursor=next_cursor)


@router.get("/{model_id}")
def show_model(model_id: str, session: SessionDep) -> ModelOut:
    return ModelOut.of(get_model(session, model_id))


@router.delete("/{model_id}", status_code=204, responses=DELETE_RESPONSES)
def delete_model(
    model_id: str,
    sessions: SessionsDep,
    artifacts: ArtifactsDep,
    connection: RedisDep,
    settings: SettingsDep,
    force: Force = False,
) -> Response:
    """Delete the registration and its cached hidden states (the model's own files are never
    touched). Refused while an unfinished job runs on it, and while adapters, extractions,
    probes, evaluations, comparisons, transfers, fine-tunes or experiments of it exist:
    `force=true` deletes them with it."""
    delete_resource(sessions, artifacts, connection, settings, "models", model_id, force)
    return Response(status_code=204)


@router.post("/{model_id}/check", status_code=status.HTTP_202_ACCEPTED)
def check_model(
    model_id: str, response: Response, settings: SettingsDep, sessions: SessionsDep, connection: RedisDep
) -> JobAccepted:
    """Queue another check of a registered model (after fixing its files, or to confirm a
    worker can load it). The model keeps its status until the check ends."""
    with transaction(sessions) as session:
        model = get_model(session, model_id)
        job = jobs.new_job(
            "model_check", ModelCheckParameters(model_id=model.id), broker.default_queue(settings), model_id=model.id
        )
        session.add(job)
        session.flush()
        previous_check = model.check_job_id
        model.check_job_id = job.id

    def undo(session: Session) -> None:
        session.execute(update(Model).where(Model.id == model_id).values(check_job_id=previous_check))
        jobs.deleting(job.id)(session)

    jobs.enqueue(sessions, connection, settings, job, undo)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobAccepted(job=JobOut.of(job))
