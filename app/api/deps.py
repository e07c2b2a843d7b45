"""Dependencies shared by the routers: settings, registry sessions, the Redis connection."""

from collections.abc import Iterator
from typing import Annotated

import redis
from fastapi import Depends, Query, Request
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings
from app.storage import ArtifactStore


def app_settings(request: Request) -> Settings:
    return request.app.state.settings


def app_sessions(request: Request) -> sessionmaker[Session]:
    return request.app.state.sessions


def request_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def app_redis(request: Request) -> redis.Redis:
    return request.app.state.redis


def app_artifacts(request: Request) -> ArtifactStore:
    return request.app.state.artifacts


SettingsDep = Annotated[Settings, Depends(app_settings)]
SessionsDep = Annotated[sessionmaker[Session], Depends(app_sessions)]
SessionDep = Annotated[Session, Depends(request_session)]
RedisDep = Annotated[redis.Redis, Depends(app_redis)]
ArtifactsDep = Annotated[ArtifactStore, Depends(app_artifacts)]
Force = Annotated[
    bool,
    Query(description="Delete even while unfinished jobs use it (they are cancelled), with everything made from it."),
]
