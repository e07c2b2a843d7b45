"""`confprobe keys`: API keys made, listed and revoked directly in the registry database,
which is how a service with AUTH_ENABLED gets its first admin key."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from fastapi.testclient import TestClient

from app import cli
from app.main import create_app
from app.settings import get_settings
from tests.conftest import RedisServer, make_settings


def confprobe(*args: str) -> Result:
    return CliRunner().invoke(cli.main, list(args))


@pytest.fixture
def registry(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The CLI's settings point at a fresh registry of each backend."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("VAR_DIR", str(tmp_path / "var"))
    get_settings.cache_clear()
    yield database_url
    get_settings.cache_clear()


@pytest.fixture
def gateway(registry: str, redis_server: RedisServer, tmp_path: Path) -> Iterator[Any]:
    """A gateway with AUTH_ENABLED on the same registry."""
    with TestClient(
        create_app(make_settings(registry, redis_server.url, tmp_path / "var", auth_enabled=True))
    ) as client:
        yield client


def test_keys_create_prints_the_key_once_and_it_opens_the_gateway_with_its_scopes(gateway: Any) -> None:
    created = confprobe("keys", "create", "--name", "first admin", "--scopes", "admin", "--json")
    assert created.exit_code == 0, created.output
    key = json.loads(created.stdout)
    assert key["scopes"] == ["read", "submit", "admin"]
    headers = {"Authorization": f"Bearer {key['secret']}"}
    assert gateway.post("/v1/keys", json={"name": "ci", "scopes": ["read"]}, headers=headers).status_code == 201

    table, as_json = confprobe("keys", "list"), confprobe("--json", "keys", "list")
    assert table.exit_code == as_json.exit_code == 0
    assert key["prefix"] in table.stdout and key["secret"] not in table.stdout + as_json.stdout
    assert [listed["name"] for listed in json.loads(as_json.stdout)] == ["ci", "first admin"]


def test_keys_create_as_a_table_shows_the_key_with_a_warning(registry: str) -> None:
    result = confprobe("keys", "create", "--name", "bot", "--scopes", "read,submit", "--rate-limit", "30")
    assert result.exit_code == 0, result.output
    header, row, _, key_line, warning = result.stdout.splitlines()
    assert header.split()[:4] == ["ID", "NAME", "PREFIX", "SCOPES"] and "read,submit" in row and " 30 " in row
    assert key_line.startswith("key: cpk_") and "shown this once" in warning


def test_keys_revoke_shuts_the_key_out_at_once(gateway: Any) -> None:
    key = json.loads(confprobe("keys", "create", "--name", "bot", "--scopes", "read", "--json").stdout)
    headers = {"Authorization": f"Bearer {key['secret']}"}
    assert gateway.get("/v1/models", headers=headers).status_code == 200
    revoked = confprobe("--json", "keys", "revoke", key["id"])
    assert revoked.exit_code == 0 and json.loads(revoked.stdout)["revoked_at"] is not None
    assert gateway.get("/v1/models", headers=headers).status_code == 401
    assert json.loads(confprobe("keys", "list", "--json").stdout) == []
    assert [listed["id"] for listed in json.loads(confprobe("keys", "list", "--all", "--json").stdout)] == [key["id"]]


def test_the_first_key_can_be_made_before_the_registry_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAR_DIR", str(tmp_path / "var"))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    get_settings.cache_clear()
    try:
        result = confprobe("keys", "create", "--name", "first", "--scopes", "admin")
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert (tmp_path / "var" / "registry.db").exists()


def test_an_unknown_scope_exits_2_naming_it(registry: str) -> None:
    result = confprobe("keys", "create", "--name", "x", "--scopes", "read,root")
    assert result.exit_code == 2 and "root is not a scope" in result.stderr


def test_a_rate_limit_beyond_what_the_registry_keeps_exits_2_naming_the_option(registry: str) -> None:
    result = confprobe("keys", "create", "--name", "x", "--scopes", "read", "--rate-limit", str(2**31))
    assert result.exit_code == 2 and "--rate-limit" in result.stderr


def test_revoking_an_unknown_key_exits_3(registry: str) -> None:
    result = confprobe("keys", "revoke", "key_nothing")
    assert result.exit_code == 3 and "key_nothing" in result.stderr
