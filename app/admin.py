"""`confprobe migrate`, `janitor` and `keys`: the registry administered directly on its
database (DATABASE_URL) rather than through the API, so they work before any gateway runs:
the schema brought up to date, unreferenced artifacts swept, and the first admin key made."""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import click

from app.settings import MAX_RATE_LIMIT, get_settings
from confprobe_client.cli import ApiContext
from confprobe_client.exit_codes import EXIT_NOT_FOUND
from confprobe_client.formatting import KEY_COLUMNS
from confprobe_client.options import comma_separated

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from app.auth import Scope


@click.command()
def migrate() -> None:
    """Bring the registry database to the newest schema."""
    from app.registry.database import migrate as upgrade

    settings = get_settings()
    upgrade(settings.resolved_database_url)
    click.echo(f"registry at {settings.resolved_database_url} is up to date")


@click.command()
@click.option("--dry-run", is_flag=True, help="List what would go; remove nothing.")
@click.option(
    "--grace-s", type=float, default=None, help="Leave objects younger than this alone (default: JANITOR_GRACE_S)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def janitor(dry_run: bool, grace_s: float | None, as_json: bool) -> None:
    """Remove artifacts no registry row refers to (left by work that stopped half-way). Workers
    also do it every JANITOR_INTERVAL_S."""
    from app import janitor as sweeper
    from app.registry.database import create_registry_engine, session_factory
    from app.storage import open_store

    settings = get_settings()
    engine = create_registry_engine(settings.resolved_database_url)
    try:
        report = sweeper.sweep(
            session_factory(engine),
            open_store(settings),
            settings.janitor_grace_s if grace_s is None else grace_s,
            dry_run=dry_run,
        )
    finally:
        engine.dispose()
    if as_json:
        click.echo(json.dumps(report.as_dict()))
        return
    verb = "would remove" if dry_run else "removed"
    for key in report.removed:
        click.echo(f"{verb} {key}")
    for key in report.aborted_uploads:
        click.echo(f"{'would abort' if dry_run else 'aborted'} the incomplete upload of {key}")
    for path in report.local_removed:
        click.echo(f"{verb} the local leftover {path}")
    for path in report.cache_evicted:
        click.echo(f"{'would evict' if dry_run else 'evicted'} the cached copy {path}")
    click.echo(
        f"{len(report.removed)} orphan objects, {len(report.aborted_uploads)} incomplete uploads and {len(report.local_removed)} local leftovers "
        f"({report.freed_bytes} bytes) {'found' if dry_run else 'removed'}; {report.kept} kept"
    )


class ScopeList(click.ParamType):
    """`submit,read` → ["read", "submit"], each one a known scope."""

    name = "scopes"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> "list[Scope]":
        from app.auth import SCOPES

        if isinstance(value, list):
            return value
        requested = comma_separated(str(value))
        unknown = [scope for scope in requested if scope not in SCOPES]
        if unknown or not requested:
            self.fail(f"{', '.join(unknown) or 'nothing'} is not a scope (choose from {', '.join(SCOPES)})", param, ctx)
        return [scope for scope in SCOPES if scope in requested]


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (same as the global --json).")


@contextmanager
def registry_session() -> Iterator["Session"]:
    """A transaction on the registry of this machine's settings (DATABASE_URL), brought to
    the newest schema first: the first key is often made before the gateway ever ran."""
    from app.registry.database import (
        create_registry_engine,
        migrate,
        session_factory,
        transaction,
    )

    url = get_settings().resolved_database_url
    migrate(url)
    engine = create_registry_engine(url)
    try:
        with transaction(session_factory(engine)) as session:
            yield session
    finally:
        engine.dispose()


def key_output(api: ApiContext, as_json: bool) -> ApiContext:
    """`--json` given to the command or to `confprobe` itself."""
    return replace(api, as_json=api.as_json or as_json)


@click.group()
def keys() -> None:
    """API keys, made and revoked directly in the registry database (DATABASE_URL): the way
    to the first admin key of a service with AUTH_ENABLED."""


@keys.command("create")
@click.option("--name", required=True, help="What the key is for, e.g. who holds it.")
@click.option(
    "--scopes",
    type=ScopeList(),
    required=True,
    help="Comma-separated: read, submit (includes read), admin (includes both).",
)
@click.option(
    "--rate-limit",
    type=click.IntRange(min=0, max=MAX_RATE_LIMIT),
    help="This key's requests per minute (0: none) [default: RATE_LIMIT_PER_MINUTE].",
)
@click.option(
    "--burst",
    type=click.IntRange(min=1, max=MAX_RATE_LIMIT),
    help="Requests at once after a quiet spell (with --rate-limit) [default: the rate limit].",
)
@json_option
@click.pass_obj
def create_api_key(
    api: ApiContext, name: str, scopes: "list[Scope]", rate_limit: int | None, burst: int | None, as_json: bool
) -> None:
    """Make a key and print it once (the registry keeps only its hash)."""
    from app.auth import create_key
    from app.schemas.keys import ApiKeyCreated, ApiKeyOut

    if burst is not None and rate_limit is None:
        raise click.UsageError("--burst needs --rate-limit")
    with registry_session() as session:
        key, secret = create_key(session, name, scopes, rate_limit, burst)
    output = key_output(api, as_json)
    output.show(ApiKeyCreated(**ApiKeyOut.of(key).model_dump(), secret=secret), KEY_COLUMNS)
    if not output.as_json:
        click.echo(f"\nkey: {secret}\nshown this once; keep it somewhere safe (e.g. export CONFPROBE_API_KEY=…)")


@keys.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Revoked keys too.")
@json_option
@click.pass_obj
def list_api_keys(api: ApiContext, include_revoked: bool, as_json: bool) -> None:
    """API keys, newest first, without their secrets."""
    from app.registry.api_keys import list_keys
    from app.schemas.keys import ApiKeyOut

    with registry_session() as session:
        found, _ = list_keys(session, include_revoked=include_revoked, cursor=None, limit=10_000)
    key_output(api, as_json).show([ApiKeyOut.of(key) for key in found], KEY_COLUMNS)


keys.add_command(list_api_keys, "ls")  # as `models ls`, `jobs ls`…


@keys.command("revoke")
@click.argument("key_id")
@json_option
@click.pass_obj
def revoke_api_key(api: ApiContext, key_id: str, as_json: bool) -> None:
    """Revoke KEY_ID: it stops working at once, on every gateway."""
    from app.errors import ServiceError
    from app.registry.api_keys import revoke_key
    from app.schemas.keys import ApiKeyOut

    try:
        with registry_session() as session:
            revoked = ApiKeyOut.of(revoke_key(session, key_id))
    except ServiceError as error:
        click.echo(f"error: {error.message}", err=True)
        raise SystemExit(EXIT_NOT_FOUND) from error
    key_output(api, as_json).show(revoked, KEY_COLUMNS)


COMMANDS: tuple[click.Command, ...] = (migrate, janitor, keys)
