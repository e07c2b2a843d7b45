"""`/v1/tinker/models`: the base models the Tinker service supports.

The Tinker SDK imports torch, which the gateway never does; a worker asks Tinker instead,
in a short job the gateway waits for. Answers are cached for a few minutes.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from app import jobs
from app.api.deps import RedisDep, SessionsDep, SettingsDep
from app.errors import ServiceError
from app.job_kinds import NoParameters
from app.schemas.adapters import TinkerModels
from app.schemas.common import ERROR_RESPONSES
from app.schemas.jobs import JobAccepted

router = APIRouter(prefix="/v1/tinker", tags=["tinker"], responses=ERROR_RESPONSES)

CACHE_SECONDS = 300


@router.get(
    "/models", responses={202: {"model": JobAccepted, "description": "No worker answered in time: follow the job."}}
)
async def tinker_models(
    request: Request,
    response: Response,
    settings: SettingsDep,
    sessions: SessionsDep,
    connection: RedisDep,
    timeout_s: Annotated[float, Query(gt=0, le=120)] = 30,
) -> Any:
    if not settings.tinker_api_key:
        raise ServiceError(
            503,
            "unavailable",
            "listing Tinker models needs the TINKER_API_KEY setting, which is not set",
            setting="TINKER_API_KEY",
        )
    cache_key = f"{settings.queue_prefix}:tinker-models"
    cached = await request.app.state.async_redis.get(cache_key)
    if cached:
        return TinkerModels.model_validate_json(cached)
    job, _ = jobs.submit(
        sessions,
        connection,
        settings,
        "tinker_models",
        lambda _session, _job_id: jobs.Submission(NoParameters(), None, None),
    )
    final = await jobs.wait_for_final(sessions, request.app.state.async_redis, settings, job.id, timeout_s)
    if final.status == "succeeded" and final.result is not None:
        answer = TinkerModels.model_validate(final.result)
        await request.app.state.async_redis.set(cache_key, answer.model_dump_json(), ex=CACHE_SECONDS)
        return answer
    if final.status == "failed" and final.error is not None:
        raise ServiceError(502, final.error.code, f"Tinker: {final.error.message}", job_id=job.id)
    response.status_code = 202
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobAccepted(job=final)
