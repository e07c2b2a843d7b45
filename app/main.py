"""The gateway application: `create_app()` wires settings, registry, Redis and routers."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi_offline import FastAPIOffline

from app import broker
from app.api import (
    adapters,
    comparisons,
    datasets,
    evaluations,
    experiments,
    extractions,
    finetunes,
    health,
    jobs,
    keys,
    models,
    probes,
    security,
    tinker,
    transfers,
)
from app.api import metrics as metrics_api
from app.errors import install_error_handlers
from app.limits import BodySizeLimit, RefuseNulCharacters
from app.monitoring import DeploymentCollector, RequestMetrics, StorageUsage
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
    from prometheus_client import CollectorRegistry

    metrics = CollectorRegistry()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_registry_engine(settings.resolved_database_url)
        app.state.settings = settings
        app.state.sessions = session_factory(engine)
        app.state.redis = broker.connect(settings, socket_timeout=10)
        app.state.artifacts = open_store(settings)
        app.state.async_redis = broker.connect_async(settings)
        app.state.metrics = metrics
        storage = StorageUsage(
            app.state.artifacts, settings.storage_metrics_ttl_s, settings.storage_metrics_max_objects
        )
        collector = DeploymentCollector(app.state.sessions, app.state.redis, settings, storage)
        metrics.register(collector)
        try:
            yield
        finally:
            metrics.unregister(collector)
            await app.state.async_redis.aclose()
            app.state.redis.close()
            engine.dispose()

    app = FastAPIOffline(
        title="Confidence Probing Service",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.add_middleware(RefuseNulCharacters)
    app.add_middleware(
        BodySizeLimit,
        default_limit=settings.max_request_bytes,
        limits={"/v1/datasets": settings.max_dataset_bytes, "/v1/adapters/upload": settings.max_adapter_bytes},
    )
    app.add_middleware(security.AuthenticateFirst)  # before the body: no body is read for a caller without a key
    app.add_middleware(RequestMetrics, registry=metrics)  # outermost: refused requests are counted too
    install_error_handlers(app)
    # Every /v1 route asks for an API key with the scope its method needs (when
    # AUTH_ENABLED), and so does /metrics unless METRICS_REQUIRE_KEY is off; health checks
    # and the docs stay open. `/v1/workers` lives in the health router and asks on its own.
    by_method: dict[str, Any] = {
        "dependencies": [Depends(security.scope_by_method)],
        "responses": security.AUTH_RESPONSES,
    }
    app.include_router(health.router)
    app.include_router(metrics_api.router, **(by_method if settings.metrics_require_key else {}))
    app.include_router(models.router, **by_method)
    app.include_router(adapters.router, **by_method)
    app.include_router(comparisons.router, **by_method)
    app.include_router(datasets.router, **by_method)
    app.include_router(evaluations.router, **by_method)
    app.include_router(experiments.router, **by_method)
    app.include_router(extractions.router, **by_method)
    app.include_router(finetunes.router, **by_method)
    app.include_router(jobs.router, **by_method)
    app.include_router(probes.router, **by_method)
    app.include_router(tinker.router, **by_method)
    app.include_router(transfers.router, **by_method)
    app.include_router(keys.router, dependencies=[Depends(security.admin_scope)], responses=security.AUTH_RESPONSES)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            experiments.add_config_schema(FastAPI.openapi(app))
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
    return app
