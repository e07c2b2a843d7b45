"""Health, readiness and the workers' state."""

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel


class ResidentModel(BaseModel):
    model_id: str
    bytes: int
    adapters: list[str] = []


class WorkerOut(BaseModel):
    name: str
    device: str
    host: str | None = None
    pid: int | None = None
    started_at: datetime | None = None
    last_heartbeat: datetime | None = None
    memory_budget_bytes: int | None = None
    memory_used_bytes: int | None = None
    resident_models: list[ResidentModel] = []
    current_job: str | None = None


class WorkerList(BaseModel):
    items: list[WorkerOut]


class HealthOut(BaseModel):
    status: Literal["ok"]


class ReadinessOut(BaseModel):
    status: Literal["ready"]
    checks: dict[str, Any]
