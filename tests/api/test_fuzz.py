"""Generated requests against the service's own OpenAPI: no input gets a 500.

Each pass runs against a registry that holds real objects — a dataset, a model, an
extraction, a probe run, an API key, a finished job — and every other request an operation
gets names them (in its path, and as `model`/`dataset` in its body and query), so generated
input reaches the code behind the 404s. Passes: both registry backends with auth off, and
one with AUTH_ENABLED, as an admin.

A 503 passes only where it names what this service really lacks: the Tinker key (unset) or
a worker (none runs). Bounded: a few examples per operation, and once a pass has run for
PASS_SECONDS, one call for each operation not yet called.
"""

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from app import auth
from app.main import create_app
from app.registry.database import transaction
from tests.conftest import make_settings

EXAMPLES = 20
PASS_SECONDS = 8.0
PASSES = [("sqlite", False), ("postgresql", False), ("postgresql", True)]
# three statements per label, the fewest a probe run splits
STATEMENTS = "".join(
    json.dumps({"text": text, "label": label}) + "\n"
    for text, label in [
        ("Paris is in France.", 1),
        ("Two is even.", 1),
        ("Ice is cold.", 1),
        ("Tokyo is in Peru.", 0),
        ("Three is even.", 0),
        ("Fire is cold.", 0),
    ]
).encode()
# routes that answer 200 for the real object: proof that the real ids were sent
SEEN_REAL = [
    "GET /v1/datasets/{dataset_id}",
    "GET /v1/models/{model_id}",
    "GET /v1/jobs/{job_id}",
    "GET /v1/extractions/{extraction_id}",
    "GET /v1/probe-runs/{run_id}",
]


@dataclass
class Service:
    schema: Any
    headers: dict[str, str]
    path_ids: dict[str, str]  # path parameter → id of a real object
    references: dict[str, str]  # body or query field → id of a real object


def seeded(client: TestClient, headers: dict[str, str], model_folder: Path) -> tuple[dict[str, str], dict[str, str]]:
    """A dataset, a model, an extraction and a probe run of them, an API key, and a cancelled
    job (final, so its event stream ends at once): their ids by path parameter, and by the
    body and query fields that refer to them."""

    def created(response: Any) -> dict[str, Any]:
        assert response.status_code in (201, 202), response.text
        return response.json()

    dataset = created(client.post("/v1/datasets", files={"file": ("statements.jsonl", STATEMENTS)}, headers=headers))
    model = created(client.post("/v1/models", json={"name": "tiny", "source": str(model_folder)}, headers=headers))
    wanted = {"model": model["id"], "dataset": dataset["id"], "layers": [0]}
    extraction = created(client.post("/v1/extractions", json=wanted, headers=headers))["extraction"]
    run = created(client.post("/v1/probes", json=wanted, headers=headers))["run"]
    key = created(client.post("/v1/keys", json={"name": "fuzzed", "scopes": ["read"]}, headers=headers))
    job = created(client.post("/v1/jobs/ping", headers=headers))["job"]
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers).json()["status"] == "cancelled"
    path_ids = {
        "dataset_id": dataset["id"],
        "model_id": model["id"],
        "extraction_id": extraction["id"],
        "run_id": run["id"],
        "key_id": key["id"],
        "job_id": job["id"],
    }
    return path_ids, {"model": model["id"], "base_model": model["id"], "dataset": dataset["id"]}


@pytest.fixture(
    scope="module", params=PASSES, ids=[f"{backend}{'-auth' if auth_on else ''}" for backend, auth_on in PASSES]
)
def service(
    request: pytest.FixtureRequest,
    redis_server: Any,
    databases: Any,
    tiny_llama_template: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Service]:
    backend, auth_on = request.param
    service_settings = make_settings(
        databases.new(backend),
        redis_server.url,
        tmp_path_factory.mktemp("fuzz") / "var",
        tinker_api_key=None,
        auth_enabled=auth_on,
    )
    app = create_app(service_settings)
    with TestClient(app) as client:  # runs the lifespan: registry, Redis, artifact store
        headers: dict[str, str] = {}
        if auth_on:
            with transaction(app.state.sessions) as session:  # unlimited: a pass makes hundreds of requests
                _, secret = auth.create_key(session, "fuzzer", ["admin"], rate_limit_per_minute=0)
            headers = {"Authorization": f"Bearer {secret}"}
        path_ids, references = seeded(client, headers, tiny_llama_template)
        yield Service(schemathesis.openapi.from_asgi("/openapi.json", app), headers, path_ids, references)


def with_real_ids(case: Any, service: Service) -> None:
    for name in case.path_parameters or {}:
        if name in service.path_ids:
            case.path_parameters[name] = service.path_ids[name]
    for fields in (case.body, case.query):
        if isinstance(fields, dict):
            for name in fields.keys() & service.references.keys():
                fields[name] = service.references[name]
    if isinstance(case.query, dict) and case.method == "DELETE":
        case.query.pop("force", None)  # refused (in use), not deleted: the rest of the pass needs the real objects


def really_missing(response: Any) -> bool:
    """A 503 naming what this service lacks: the Tinker key, or a worker."""
    try:
        details = response.json()["error"]["details"]
    except (ValueError, KeyError, TypeError):
        return False
    return details.get("setting") == "TINKER_API_KEY" or details.get("missing") == ["worker"]


def fuzz(operation: Any, service: Service, calls: list[int], failures: list[str], deadline: float) -> None:
    """Calls one operation with generated requests, recording each status in `calls` and
    each 500 (other than a 503 naming what this service lacks) in `failures`."""

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES if time.monotonic() < deadline else 1,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def call(case: Any) -> None:
        if calls and time.monotonic() > deadline:
            return
        if len(calls) % 2 == 0:  # the first call of each operation, and every other one
            with_real_ids(case, service)
        response = case.call(headers=service.headers)
        calls.append(response.status_code)
        if response.status_code >= 500 and not (response.status_code == 503 and really_missing(response)):
            body = json.dumps(case.body, default=str)[:300] if case.body is not None else ""
            failures.append(f"{case.method} {case.formatted_path} {body}: {response.status_code} {response.text[:300]}")

    call()


@pytest.mark.slow
def test_no_generated_request_gets_a_500(service: Service) -> None:
    failures: list[str] = []
    statuses: dict[str, list[int]] = {}
    operations = [result.ok() for result in service.schema.get_all_operations()]
    deadline = time.monotonic() + PASS_SECONDS
    for operation in operations:
        fuzz(operation, service, statuses.setdefault(operation.label, []), failures, deadline)
    assert failures == []
    assert [label for label, calls in statuses.items() if not calls] == [], "some operations were never called"
    assert [label for label in SEEN_REAL if 200 not in statuses[label]] == [], "the real objects were never found"
    if service.headers:
        assert [label for label, calls in statuses.items() if 401 in calls] == [], "the admin key was refused"
