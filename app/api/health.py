"""`/healthz` (the process answers) and `/readyz` (database, Redis and a live worker)."""

from typing import Any

import sqlalchemy.exc
from fastapi import APIRouter, Depends, Request
from sqlalchemy import text

from app import auth, broker
from app.api.deps import RedisDep, SessionsDep, SettingsDep
from app.api.security import AUTH_RESPONSES, presented_key, scope_by_method
from app.errors import ServiceError
from app.schemas.health import HealthOut, ReadinessOut, WorkerList, WorkerOut
from app.settings import Settings

router = APIRouter()


@router.get("/v1/workers", tags=["workers"], dependencies=[Depends(scope_by_method)], responses=AUTH_RESPONSES)
def list_workers(settings: SettingsDep, connection: RedisDep) -> WorkerList:
    """Live workers (fresh heartbeat): device, memory budget and use, resident models with
    their attached adapters, and the job each is running."""
    return WorkerList(items=[WorkerOut.model_validate(worker) for worker in broker.live_workers(connection, settings)])


@router.get("/healthz", tags=["health"])
def healthz() -> HealthOut:
    return HealthOut(status="ok")


@router.get(
    "/readyz", tags=["health"], responses={503: {"description": "A part is missing; `details.missing` names it."}}
)
def readyz(request: Request, settings: SettingsDep, sessions: SessionsDep, connection: RedisDep) -> ReadinessOut:
    """Ready when the registry database answers, Redis answers, and at least one worker's
    heartbeat is fresh. Open to anyone, as load balancers probe it; with authentication on,
    only a caller with a `read` key also sees which workers run where (name, device, current
    job) and why a part is unreachable — anyone else gets the verdicts and a count."""
    detailed = _may_see_details(request, settings)
    checks: dict[str, Any] = {}
    missing: list[str] = []
    try:
        with sessions() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any failure to answer means not ready
        checks["database"] = f"unreachable: {exc}" if detailed else "unreachable"
        missing.append("database")
    try:
        connection.ping()
        checks["redis"] = "ok"
        workers = broker.live_workers(connection, settings)
        checks["workers"] = (
            [{"name": w["name"], "device": w["device"], "current_job": w.get("current_job")} for w in workers]
            if detailed
            else len(workers)
        )
        if not workers:
            missing.append("worker")
    except Exception as exc:
        checks["redis"] = f"unreachable: {exc}" if detailed else "unreachable"
        checks["workers"] = [] if detailed else 0
        missing.extend(["redis", "worker"])
    if missing:
        raise ServiceError(503, "not_ready", f"not ready: no {', no '.join(missing)}", missing=missing, checks=checks)
    return ReadinessOut(status="ready", checks=checks)


def _may_see_details(request: Request, settings: Settings) -> bool:
    """Everyone when authentication is off; else a caller presenting a live key that may read."""
    if not settings.auth_enabled:
        return True
    token = presented_key(request.headers)
    if not token:
        return False
    try:
        return auth.identify(request.app.state.sessions, settings, token).may("read")
    except (ServiceError, sqlalchemy.exc.SQLAlchemyError):
        return False
