"""The Python client and the CLI's API commands against a live gateway with AUTH_ENABLED:
the key goes out as a bearer token (from `api_key=` or CONFPROBE_API_KEY), and refusals
come back by kind — exceptions for the client, exit codes 7 and 8 for the CLI."""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy.orm import Session, sessionmaker

from app import cli
from app.main import create_app
from app.settings import Settings
from confprobe_client import Client, Forbidden, RateLimited, Unauthorized
from tests.api.test_auth import make_key
from tests.conftest import RedisServer, make_settings, served


@dataclass
class Gateway:
    url: str
    sessions: sessionmaker[Session]

    def key(self, *scopes: str, **limits: int) -> str:
        return make_key(self.sessions, list(scopes), **limits)


@pytest.fixture
def settings(database_url: str, redis_server: RedisServer, tmp_path: Path) -> Settings:
    return make_settings(database_url, redis_server.url, tmp_path / "var", auth_enabled=True)


@pytest.fixture
def gateway(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gateway]:
    monkeypatch.delenv("CONFPROBE_API_KEY", raising=False)
    app = create_app(settings)
    with served(app) as url:
        yield Gateway(url, app.state.sessions)


def test_the_client_sends_its_api_key_and_without_one_raises_unauthorized(gateway: Gateway) -> None:
    with Client(gateway.url, api_key=gateway.key("read")) as client:
        assert client.list_models().items == []
    with pytest.raises(Unauthorized) as refused, Client(gateway.url) as client:
        client.list_models()
    assert (refused.value.status, refused.value.details["reason"]) == (401, "missing")


def test_the_client_takes_its_key_from_confprobe_api_key(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONFPROBE_API_KEY", gateway.key("read"))
    with Client(gateway.url) as client:
        assert client.list_jobs().items == []


def test_a_key_without_the_scope_raises_forbidden_naming_it(gateway: Gateway) -> None:
    with pytest.raises(Forbidden) as refused, Client(gateway.url, api_key=gateway.key("read")) as client:
        client.ping()
    assert refused.value.required_scope == "submit"


def test_a_key_over_its_limit_raises_rate_limited_with_retry_after(gateway: Gateway) -> None:
    with Client(gateway.url, api_key=gateway.key("read", rate_limit_per_minute=1)) as client:
        client.list_models()
        with pytest.raises(RateLimited) as refused:
            client.list_models()
    assert (
        refused.value.code == "rate_limited"
        and refused.value.retry_after is not None
        and refused.value.retry_after >= 1
    )


def test_an_admin_creates_lists_and_revokes_keys_through_the_client(gateway: Gateway) -> None:
    with Client(gateway.url, api_key=gateway.key("admin")) as admin:
        created = admin.create_key("ci", ["submit"], rate_limit_per_minute=100)
        assert created.secret not in repr(created)
        with Client(gateway.url, api_key=created.secret) as ci:
            assert ci.ping().kind == "ping"
            listed = next(key for key in admin.list_keys().items if key.id == created.id)
            assert listed.scopes == ["read", "submit"] and not hasattr(listed, "secret")
            assert admin.revoke_key(created.id).revoked_at is not None
            with pytest.raises(Unauthorized):
                ci.list_jobs()


def test_cli_commands_send_the_key_from_confprobe_api_key(gateway: Gateway) -> None:
    key = gateway.key("read")
    allowed = CliRunner().invoke(
        cli.main, ["--url", gateway.url, "--json", "jobs", "ls"], env={"CONFPROBE_API_KEY": key}
    )
    assert allowed.exit_code == 0, allowed.output
    refused = CliRunner().invoke(cli.main, ["--url", gateway.url, "jobs", "ls"], env={"CONFPROBE_API_KEY": None})
    assert refused.exit_code == 7 and "CONFPROBE_API_KEY is not set" in refused.stderr


def test_cli_exits_7_for_a_missing_scope_and_8_when_rate_limited(gateway: Gateway) -> None:
    read_only = CliRunner().invoke(
        cli.main, ["--url", gateway.url, "jobs", "cancel", "job_x"], env={"CONFPROBE_API_KEY": gateway.key("read")}
    )
    assert read_only.exit_code == 7 and "`submit`" in read_only.stderr
    limited = {"CONFPROBE_API_KEY": gateway.key("read", rate_limit_per_minute=1)}
    assert CliRunner().invoke(cli.main, ["--url", gateway.url, "jobs", "ls"], env=limited).exit_code == 0
    over = CliRunner().invoke(cli.main, ["--url", gateway.url, "jobs", "ls"], env=limited)
    assert over.exit_code == 8 and "retry in" in over.stderr
