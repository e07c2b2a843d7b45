"""API keys, scopes and per-key rate limits, on a gateway with AUTH_ENABLED (both registry
backends, a real Redis): who gets in, what each scope allows, what the registry keeps, and
limits that hold across gateway processes."""

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from app import auth
from app.main import create_app
from app.registry.database import transaction
from app.settings import Settings
from tests.api.test_errors import assert_envelope
from tests.conftest import RedisServer, free_port, make_settings

BOOTSTRAP_KEY = "operator-chosen-bootstrap-key-0123456789abcdef"


@pytest.fixture
def settings(database_url: str, redis_server: RedisServer, tmp_path: Path) -> Settings:
    """This module's gateway (the `api` fixture) requires keys."""
    return make_settings(
        database_url, redis_server.url, tmp_path / "var", auth_enabled=True, bootstrap_admin_key=BOOTSTRAP_KEY
    )


def make_key(sessions: sessionmaker[Session], scopes: list[str], **limits: int) -> str:
    with transaction(sessions) as session:
        _, secret = auth.create_key(session, f"{'+'.join(scopes)} key", scopes, **limits)  # type: ignore[arg-type]
    return secret


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def public_and_secret(key: str) -> tuple[str, str]:
    """`cpk_<prefix>` and the random rest (which may hold `_` itself)."""
    kind, prefix, secret = key.split("_", 2)
    return f"{kind}_{prefix}", secret


@pytest.fixture
def read_key(api: Any) -> str:
    return make_key(api.app.state.sessions, ["read"])


@pytest.fixture
def submit_key(api: Any) -> str:
    return make_key(api.app.state.sessions, ["submit"])


@pytest.fixture
def admin_key(api: Any) -> str:
    return make_key(api.app.state.sessions, ["admin"])


def v1_operations(api: Any) -> list[tuple[str, str]]:
    """(method, path with every parameter filled) of each /v1 operation the service documents."""
    paths = api.get("/openapi.json").json()["paths"]
    return [
        (method.upper(), re.sub(r"\{[^}]+\}", "x", path))
        for path, operations in paths.items()
        if path.startswith("/v1/")
        for method in operations
    ]


# --- off by default --------------------------------------------------------------------


def test_auth_is_off_by_default_and_every_route_answers_without_a_key(
    database_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    default = make_settings(database_url, redis_server.url, tmp_path / "var")
    assert default.auth_enabled is False
    with TestClient(create_app(default)) as client:
        assert client.get("/v1/models").status_code == 200
        assert client.post("/v1/jobs/ping").status_code == 202
        assert client.get("/v1/keys").status_code == 200


# --- who gets in -----------------------------------------------------------------------


def test_a_request_without_a_key_is_a_401_with_a_bearer_challenge(api: Any) -> None:
    response = api.get("/v1/models")
    error = assert_envelope(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert error["details"]["reason"] == "missing" and "Authorization: Bearer" in error["message"]


def test_every_v1_route_refuses_a_request_without_a_key(api: Any) -> None:
    operations = v1_operations(api)
    assert len(operations) > 30
    refused = {(method, path): api.request(method, path).status_code for method, path in operations}
    assert set(refused.values()) == {401}, {operation: status for operation, status in refused.items() if status != 401}


def test_an_upload_without_a_key_is_refused_before_its_body_is_read(api: Any) -> None:
    def body() -> Iterator[bytes]:
        yield b"--b\r\ncontent-disposition: form-data; name=file; filename=x.jsonl\r\n\r\n"
        raise AssertionError("the body was read")

    response = api.post("/v1/datasets", content=body(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert_envelope(response, 401, "unauthorized")


def test_an_upload_with_a_read_key_is_refused_before_its_body_is_read(api: Any, read_key: str) -> None:
    def body() -> Iterator[bytes]:
        yield b"--b\r\ncontent-disposition: form-data; name=file; filename=x.jsonl\r\n\r\n"
        raise AssertionError("the body was read")

    for path in ["/v1/datasets", "/v1/adapters/upload"]:
        response = api.post(
            path, content=body(), headers={"content-type": "multipart/form-data; boundary=b", **bearer(read_key)}
        )
        assert assert_envelope(response, 403, "forbidden")["details"]["required_scope"] == "submit", path


def test_a_key_that_is_not_one_of_ours_is_a_401(api: Any, read_key: str) -> None:
    public_part, _ = public_and_secret(read_key)
    for key in ["not-a-key", f"cpk_{'0' * 12}_{'A' * 43}", f"{public_part}_{'A' * 43}"]:
        response = api.get("/v1/models", headers=bearer(key))
        error = assert_envelope(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert error["details"]["reason"] == "invalid", key


def test_the_key_is_accepted_in_x_api_key_too(api: Any, read_key: str) -> None:
    assert api.get("/v1/models", headers={"X-API-Key": read_key}).status_code == 200


def test_a_revoked_key_is_a_401_from_the_moment_it_is_revoked(api: Any, read_key: str, admin_key: str) -> None:
    assert api.get("/v1/models", headers=bearer(read_key)).status_code == 200
    key_id = next(
        key["id"]
        for key in api.get("/v1/keys", headers=bearer(admin_key)).json()["items"]
        if read_key.startswith(key["prefix"])
    )
    assert api.delete(f"/v1/keys/{key_id}", headers=bearer(admin_key)).status_code == 200
    response = api.get("/v1/models", headers=bearer(read_key))
    assert assert_envelope(response, 401, "unauthorized")["details"]["reason"] == "revoked"


def test_open_paths_need_no_key(api: Any) -> None:
    for path in ["/healthz", "/docs", "/redoc", "/openapi.json"]:
        assert api.get(path).status_code == 200, path
    assert api.get("/readyz").status_code == 503  # no worker here; not a 401
    assets = re.findall(r'(?:src|href)="(/[^"]+\.(?:js|css))"', api.get("/docs").text)
    assert assets and all(api.get(asset).status_code == 200 for asset in assets)


def test_metrics_need_a_read_key_when_auth_is_on(api: Any, read_key: str) -> None:
    response = api.get("/metrics")
    assert_envelope(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    scraped = api.get("/metrics", headers=bearer(read_key))
    assert scraped.status_code == 200 and "confprobe_jobs" in scraped.text
    assert api.get("/metrics", headers={"X-API-Key": read_key}).status_code == 200


def test_metrics_stay_open_when_the_operator_says_so(
    database_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    open_metrics = make_settings(
        database_url, redis_server.url, tmp_path / "var", auth_enabled=True, metrics_require_key=False
    )
    with TestClient(create_app(open_metrics)) as client:
        assert client.get("/metrics").status_code == 200
        assert_envelope(client.get("/v1/models"), 401, "unauthorized")


def test_openapi_declares_the_schemes_on_v1_operations_only(api: Any) -> None:
    spec = api.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["HTTPBearer"]["scheme"] == "bearer"
    assert schemes["APIKeyHeader"] == schemes["APIKeyHeader"] | {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert spec["paths"]["/v1/models"]["post"]["security"] == [{"HTTPBearer": []}, {"APIKeyHeader": []}]
    assert {"401", "403", "429"} <= set(spec["paths"]["/v1/models"]["post"]["responses"])
    assert "security" not in spec["paths"]["/healthz"]["get"]


def test_the_bootstrap_admin_key_is_admitted_as_admin_and_a_near_miss_is_not(api: Any) -> None:
    assert (
        api.post("/v1/keys", json={"name": "first", "scopes": ["read"]}, headers=bearer(BOOTSTRAP_KEY)).status_code
        == 201
    )
    near_miss = BOOTSTRAP_KEY[:-1] + "0"
    assert_envelope(api.get("/v1/keys", headers=bearer(near_miss)), 401, "unauthorized")


def test_a_bootstrap_admin_key_too_short_to_be_secret_is_refused_and_an_empty_one_is_none() -> None:
    with pytest.raises(ValidationError, match="bootstrap_admin_key"):
        Settings(bootstrap_admin_key="short")
    assert Settings(bootstrap_admin_key="").bootstrap_admin_key is None  # docker-compose's `${BOOTSTRAP_ADMIN_KEY:-}`


# --- what scopes allow -----------------------------------------------------------------


def test_a_read_key_reads_and_anything_else_is_a_403_naming_submit(api: Any, read_key: str) -> None:
    assert api.get("/v1/jobs", headers=bearer(read_key)).status_code == 200
    response = api.post("/v1/jobs/ping", headers=bearer(read_key))
    error = assert_envelope(response, 403, "forbidden")
    assert error["details"]["required_scope"] == "submit" and "`submit`" in error["message"]


def test_every_v1_route_that_changes_something_refuses_a_read_key(api: Any, read_key: str) -> None:
    changing = [(method, path) for method, path in v1_operations(api) if method not in {"GET", "HEAD"}]
    assert len(changing) > 10
    for method, path in changing:
        response = api.request(method, path, headers=bearer(read_key))
        needed = "admin" if path.startswith("/v1/keys") else "submit"
        assert (response.status_code, response.json()["error"]["details"].get("required_scope")) == (403, needed), (
            method,
            path,
        )


def test_a_submit_key_runs_and_reads_but_does_not_manage_keys(api: Any, submit_key: str) -> None:
    assert api.post("/v1/jobs/ping", headers=bearer(submit_key)).status_code == 202
    assert api.get("/v1/jobs", headers=bearer(submit_key)).status_code == 200
    for response in [
        api.get("/v1/keys", headers=bearer(submit_key)),
        api.post("/v1/keys", json={"name": "n", "scopes": ["read"]}, headers=bearer(submit_key)),
    ]:
        assert assert_envelope(response, 403, "forbidden")["details"]["required_scope"] == "admin"


# --- managing keys ---------------------------------------------------------------------


def test_an_admin_creates_lists_and_revokes_keys_and_the_secret_is_shown_once(api: Any, admin_key: str) -> None:
    created = api.post("/v1/keys", json={"name": "ci", "scopes": ["submit"]}, headers=bearer(admin_key))
    assert created.status_code == 201
    key = created.json()
    assert key["scopes"] == ["read", "submit"] and key["secret"].startswith(key["prefix"] + "_")
    assert api.post("/v1/jobs/ping", headers=bearer(key["secret"])).status_code == 202

    listed = api.get("/v1/keys", headers=bearer(admin_key))
    assert key["secret"] not in listed.text and public_and_secret(key["secret"])[1] not in listed.text
    entry = next(item for item in listed.json()["items"] if item["id"] == key["id"])
    assert "secret" not in entry and entry["last_used_at"] is not None

    revoked = api.delete(f"/v1/keys/{key['id']}", headers=bearer(admin_key)).json()
    assert revoked["revoked_at"] is not None
    assert key["id"] not in [item["id"] for item in api.get("/v1/keys", headers=bearer(admin_key)).json()["items"]]
    everything = api.get("/v1/keys", params={"include_revoked": True}, headers=bearer(admin_key)).json()["items"]
    assert key["id"] in [item["id"] for item in everything]
    assert_envelope(api.delete("/v1/keys/key_nothing", headers=bearer(admin_key)), 404, "not_found")


def test_the_registry_row_holds_no_secret(api: Any, admin_key: str) -> None:
    secret = api.post("/v1/keys", json={"name": "ci", "scopes": ["read"]}, headers=bearer(admin_key)).json()["secret"]
    _, random_part = public_and_secret(secret)
    with api.app.state.sessions() as session:
        rows = session.execute(text("SELECT * FROM api_keys")).all()
    stored = " ".join(str(value) for row in rows for value in row)
    assert len(rows) == 2 and secret not in stored and random_part not in stored
    assert auth.key_sha256(secret) in stored  # what is kept instead


def test_a_bad_key_request_is_a_422_naming_the_field(api: Any, admin_key: str) -> None:
    unknown_scope = api.post("/v1/keys", json={"name": "n", "scopes": ["root"]}, headers=bearer(admin_key))
    assert assert_envelope(unknown_scope, 422, "validation_error")["details"]["fields"][0]["field"] == "scopes.0"
    burst_alone = api.post(
        "/v1/keys", json={"name": "n", "scopes": ["read"], "rate_limit_burst": 5}, headers=bearer(admin_key)
    )
    assert assert_envelope(burst_alone, 422, "invalid_field")["details"]["field"] == "rate_limit_burst"


def test_a_key_limit_beyond_what_the_registry_holds_is_a_422_naming_the_field(api: Any, admin_key: str) -> None:
    for field, value in [
        ("rate_limit_per_minute", 2**63),
        ("rate_limit_per_minute", 2**31),
        ("rate_limit_burst", 2**31),
    ]:
        body = {"name": "n", "scopes": ["read"], "rate_limit_per_minute": 60} | {field: value}
        response = api.post("/v1/keys", json=body, headers=bearer(admin_key))
        assert assert_envelope(response, 422, "validation_error")["details"]["fields"][0]["field"] == field, (
            field,
            value,
        )
    largest = api.post(
        "/v1/keys",
        json={"name": "n", "scopes": ["read"], "rate_limit_per_minute": 1_000_000, "rate_limit_burst": 1_000_000},
        headers=bearer(admin_key),
    )
    assert largest.status_code == 201
    assert (largest.json()["rate_limit_per_minute"], largest.json()["rate_limit_burst"]) == (1_000_000, 1_000_000)


# --- rate limits -----------------------------------------------------------------------


def test_a_key_over_its_limit_gets_a_429_with_retry_after_and_another_key_does_not(api: Any) -> None:
    limited = make_key(api.app.state.sessions, ["read"], rate_limit_per_minute=2)
    other = make_key(api.app.state.sessions, ["read"], rate_limit_per_minute=2)
    assert [api.get("/v1/models", headers=bearer(limited)).status_code for _ in range(2)] == [200, 200]
    response = api.get("/v1/models", headers=bearer(limited))
    error = assert_envelope(response, 429, "rate_limited")
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 30 and error["details"]["retry_after_s"] == retry_after
    assert error["details"]["limit_per_minute"] == 2
    assert api.get("/v1/models", headers=bearer(other)).status_code == 200


def test_the_default_limit_applies_to_keys_without_their_own(
    database_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    strict = make_settings(
        database_url, redis_server.url, tmp_path / "var", auth_enabled=True, rate_limit_per_minute=1, rate_limit_burst=3
    )
    app = create_app(strict)
    with TestClient(app) as client:
        key = make_key(app.state.sessions, ["read"])
        statuses = [client.get("/v1/models", headers=bearer(key)).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


def test_the_limit_is_shared_by_gateways_on_the_same_redis(api: Any, settings: Settings) -> None:
    key = make_key(api.app.state.sessions, ["read"], rate_limit_per_minute=3)
    with TestClient(create_app(settings)) as second:
        statuses = [
            gateway.get("/v1/models", headers=bearer(key)).status_code for gateway in (api, api, second, second, api)
        ]
    assert statuses == [200, 200, 200, 429, 429]


def test_without_redis_keys_are_still_checked_and_limits_are_not(database_url: str, tmp_path: Path) -> None:
    no_redis = make_settings(
        database_url, f"redis://127.0.0.1:{free_port()}/0", tmp_path / "var", auth_enabled=True, rate_limit_per_minute=1
    )
    app = create_app(no_redis)
    with TestClient(app) as client:
        key = make_key(app.state.sessions, ["read"])
        assert [client.get("/v1/models", headers=bearer(key)).status_code for _ in range(3)] == [200, 200, 200]
        assert_envelope(client.get("/v1/models"), 401, "unauthorized")


def heartbeat_of_a_worker(settings: Settings) -> None:
    """A worker's heartbeat in Redis, as a worker on `host-17` running a job writes it."""
    import redis

    from app import broker

    state = {"name": "gpu-box-3", "device": "cuda:0", "pid": 4242, "host": "host-17", "current_job": "job_secret_work"}
    broker.beat(redis.Redis.from_url(settings.resolved_redis_url), settings, state)


def test_readyz_tells_anyone_whether_it_is_ready_but_not_where_workers_run(api: Any, settings: Settings) -> None:
    heartbeat_of_a_worker(settings)
    response = api.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "redis": "ok", "workers": 1}
    assert (
        "host-17" not in response.text and "gpu-box-3" not in response.text and "job_secret_work" not in response.text
    )
    read_key = make_key(api.app.state.sessions, ["read"])
    assert api.get("/readyz", headers={"X-API-Key": "cpk_000000000000_" + "A" * 43}).json()["checks"]["workers"] == 1
    detailed = api.get("/readyz", headers=bearer(read_key)).json()["checks"]["workers"]
    assert detailed == [{"name": "gpu-box-3", "device": "cuda:0", "current_job": "job_secret_work"}]
