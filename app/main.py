"""The gateway application: `create_app()` wires settings, registry, Redis and routers."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from app import broker
from app.api import (
    adapters,
    comparisons,
    datasets,
    experiments,
    extractions,
    health,
    jobs,
    models,
    probes,
    tinker,
)
from app.errors import install_error_handlers
from app.limits import BodySizeLimit
from app.registry.database import create_registry_engine, session_factory
from app.settings import Settings, get_settings
from app.storage import open_store

DESCRIPTION = """
Find out whether a fine-tuned LLM *knows when it is wrong*: register base models and LoRA
adapters, extract hidden states on GPU workers, train correctness probes and read their
calibration. Everything that runs a model is a **job**: follow it at `/v1/jobs/{id}`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_registry_engine(settings.resolved_database_url)
        app.state.settings = settings
        app.state.sessions = session_factory(engine)
        app.state.redis = broker.connect(settings)
        app.state.artifacts = open_store(settings)
        app.state.async_redis = broker.connect_async(settings)
        try:
            yield
        finally:
            await app.state.async_redis.aclose()
            app.state.redis.close()
            engine.dispose()

    app = FastAPIOffline(
        title="Confidence Probing Service",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.add_middleware(
        BodySizeLimit,
        default_limit=settings.max_request_bytes,
        limits={"/v1/datasets": settings.max_dataset_bytes, "/v1/adapters/upload": settings.max_adapter_bytes},
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(adapters.router)
    app.include_router(comparisons.router)
    app.include_router(datasets.router)
    app.include_router(experiments.router)
    app.include_router(extractions.router)
    app.include_router(jobs.router)
    app.include_router(probes.router)
    app.include_router(tinker.router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            experiments.add_config_schema(FastAPI.openapi(app))
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
    return app
