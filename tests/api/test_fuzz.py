"""Generated requests against the service's own OpenAPI: no input gets a 500.

Bounded: a few examples per operation. 503 is allowed — it is what the API documents when a
back-end or setting is missing (here, the Tinker key)."""

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from app.main import create_app
from tests.conftest import make_settings


@pytest.fixture(scope="module")
def service_schema(redis_server: Any, databases: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    service_settings = make_settings(databases.new("sqlite"), redis_server.url, tmp_path_factory.mktemp("fuzz") / "var", tinker_api_key=None)
    app = create_app(service_settings)
    with TestClient(app):  # runs the lifespan: registry, Redis, artifact store
        yield schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.slow
def test_no_generated_request_gets_a_500(service_schema: Any) -> None:
    failures: list[str] = []
    calls_made: list[str] = []
    for result in service_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
        def calls(case: Any) -> None:
            response = case.call()
            calls_made.append(operation.label)
            if response.status_code >= 500 and response.status_code != 503:
                failures.append(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}")

        calls()
    assert failures == []
    assert len(set(calls_made)) == len(list(service_schema.get_all_operations())), "some operations were never called"
