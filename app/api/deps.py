"""Dependencies shared by the routers: settings, registry sessions, the Redis connection."""

from collections.abc import Iterator
from typing import Annotated

import redis
from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings
from app.storage import ArtifactStore


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_sessions(request: Request) -> sessionmaker[Session]:
    return request.app.state.sessions


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def get_redis(request: Request) -> redis.Redis:
    return request.app.state.redis


def get_artifacts(request: Request) -> ArtifactStore:
    return request.app.state.artifacts


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionsDep = Annotated[sessionmaker[Session], Depends(get_sessions)]
SessionDep = Annotated[Session, Depends(get_session)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
ArtifactsDep = Annotated[ArtifactStore, Depends(get_artifacts)]
