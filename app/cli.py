"""`confprobe`: run the service (`serve`: embedded Redis + gateway + one worker), or one
part of it (`gateway`, `worker`), or migrate the registry (`migrate`); manage API keys in
the registry (`keys`); and use a running service through its API (`models`, `adapters`,
`datasets`, `extract`, `probes`, `compare`, `jobs`), with the `confprobe_client` package
(the API key comes from CONFPROBE_API_KEY)."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from app.settings import MAX_RATE_LIMIT, get_settings

if TYPE_CHECKING:
    from pydantic import BaseModel
    from sqlalchemy.orm import Session

    from app.auth import Scope
    from app.settings import Settings
    from confprobe_client import Client, Estimate, Job


@click.group(
    help="""Confidence Probing Service: run it, or use a running one through its API.

\b
Exit codes of the API commands:
  0  done
  1  any other failure
  2  usage error (bad option or argument)
  3  not found (404)
  4  invalid request (422, 413 too large, 409 conflict)
  5  job failed or was cancelled
  6  service unavailable (503) or unreachable
  7  not authorized: no or no valid API key (401; set CONFPROBE_API_KEY), or a key
     without the scope needed (403)
  8  rate limited (429): retry after the seconds the message gives""",
)
@click.option("--url", envvar="CONFPROBE_URL", default=None, help="The service's base URL [default: $CONFPROBE_URL, else http://127.0.0.1:8000].")
@click.option("--json", "as_json", is_flag=True, help="Print answers as JSON (errors as the API's error envelope, on stderr).")
@click.pass_context
def main(ctx: click.Context, url: str | None, as_json: bool) -> None:
    ctx.obj = ApiContext(url=url, as_json=as_json)


@main.command()
def migrate() -> None:
    """Bring the registry database to the newest schema."""
    from app.registry.database import migrate as upgrade

    settings = get_settings()
    upgrade(settings.resolved_database_url)
    click.echo(f"registry at {settings.resolved_database_url} is up to date")


@main.command()
@click.option("--dry-run", is_flag=True, help="List what would go; remove nothing.")
@click.option("--grace-s", type=float, default=None, help="Leave objects younger than this alone (default: JANITOR_GRACE_S).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def janitor(dry_run: bool, grace_s: float | None, as_json: bool) -> None:
    """Remove artifacts no registry row refers to (left by work that stopped half-way). Workers
    also do it every JANITOR_INTERVAL_S."""
    import json

    from app import janitor as sweeper
    from app.registry.database import create_registry_engine, session_factory
    from app.storage import open_store

    settings = get_settings()
    engine = create_registry_engine(settings.resolved_database_url)
    try:
        report = sweeper.sweep(session_factory(engine), open_store(settings), settings.janitor_grace_s if grace_s is None else grace_s, dry_run=dry_run)
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


@main.command()
@click.option("--host", default=None, help="Address to listen on (default: HOST setting).")
@click.option("--port", type=int, default=None, help="Port to listen on (default: PORT setting).")
def gateway(host: str | None, port: int | None) -> None:
    """Run the HTTP gateway alone (migrates the registry first)."""
    import uvicorn

    from app import logs
    from app.registry.database import migrate as upgrade

    settings = get_settings()
    logs.configure(settings)
    upgrade(settings.resolved_database_url)
    uvicorn.run("app.main:create_app", factory=True, host=host or settings.host, port=port or settings.port, log_level=settings.log_level, log_config=None)


@main.command()
@click.option("--burst", is_flag=True, help="Stop when the queue is empty.")
def worker(burst: bool) -> None:
    """Run one worker on WORKER_DEVICE."""
    from workers.main import run_worker

    run_worker(burst=burst)


SERVE_RESTART_MAX_PAUSE_S = 10.0


@dataclass
class Part:
    """One process `serve` keeps running, and when it last exited by itself: a part that exits
    is started again after a pause that doubles with each recent exit, until it has exited
    `limit` times within the window."""

    name: str
    start: Callable[[], subprocess.Popen[bytes]]
    process: subprocess.Popen[bytes] | None = None
    exits: list[float] = field(default_factory=list)
    last_code: int | None = None
    restart_at: float | None = None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exited(self, now: float, window_s: float) -> int:
        """Record an exit; the number of exits within the window, this one included."""
        if self.process is not None:  # else it failed to start, and keeps its last code
            self.last_code = self.process.returncode
        self.exits = [at for at in self.exits if now - at < window_s] + [now]
        self.process = None
        return len(self.exits)

    def restart_pause_s(self) -> float:
        return float(min(0.5 * 2 ** (len(self.exits) - 1), SERVE_RESTART_MAX_PAUSE_S))


def start_part(part: Part) -> bool:
    """Start `part`; whether it started (embedded Redis may fail to answer)."""
    try:
        part.process = part.start()
    except (OSError, RuntimeError) as exc:
        click.echo(f"{part.name} did not start: {exc}", err=True)
        return False
    return True


@main.command()
@click.option("--host", default=None, help="Address to listen on (default: HOST setting).")
@click.option("--port", type=int, default=None, help="Port to listen on (default: PORT setting).")
def serve(host: str | None, port: int | None) -> None:
    """Start everything on this machine: an embedded Redis (unless REDIS_URL is set), the
    gateway and one worker. A part that exits by itself is started again (after 0.5 s, doubling
    with each recent exit up to 10 s) unless it exited SERVE_RESTART_LIMIT times within
    SERVE_RESTART_WINDOW_S; then everything stops. Ctrl-C stops them all: the gateway and the
    worker first (the worker finishes the job it is running; Ctrl-C again stops it at once),
    Redis last."""
    import socket

    from app import broker
    from app.registry.database import migrate as upgrade

    settings = get_settings()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    # Each child has its own process group, so Ctrl-C in the terminal reaches only this
    # process, which stops the children in order: Redis must outlive the worker's last job.
    redis_part: Part | None = None
    services: list[Part] = []

    def stop_services(at_once: bool) -> None:
        for part in services:
            if part.running():
                assert part.process is not None
                # killed at once, the worker's job is started again on the next start
                part.process.kill() if at_once else part.process.send_signal(signal.SIGTERM)

    requests = 0

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal requests
        requests += 1
        if requests == 1:
            click.echo("stopping: the worker finishes the job it is running (Ctrl-C again to stop at once)", err=True)
        stop_services(at_once=requests > 1)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: its terminal closed
        signal.signal(signum, on_signal)
    gave_up: Part | None = None
    try:
        env = dict(os.environ)
        if not settings.worker_name:
            # one name for every life of the worker: a restarted worker keeps its own queue, and
            # the job its killed predecessor left running is taken back and run again
            env["WORKER_NAME"] = f"{socket.gethostname()}.serve-{os.getpid()}"
        if not settings.redis_url:
            redis_part = Part("embedded Redis", lambda: broker.start_embedded_redis(settings.embedded_redis_socket, process_group=0))
            redis_part.process = redis_part.start()
            env["REDIS_URL"] = settings.resolved_redis_url
            click.echo(f"embedded Redis on {settings.embedded_redis_socket}")
        upgrade(settings.resolved_database_url)
        listen = ["--host", host or settings.host, "--port", str(port or settings.port)]
        for name, command in (("worker", ["worker"]), ("gateway", ["gateway", *listen])):
            part = Part(name, lambda command=command: subprocess.Popen([sys.executable, "-m", "app.cli", *command], env=env, process_group=0))
            if not requests:
                part.process = part.start()
            services.append(part)
        if not requests:
            click.echo(f"gateway on http://{host or settings.host}:{port or settings.port} (docs at /docs); Ctrl-C stops")
        gave_up = supervise([*([redis_part] if redis_part else []), *services], settings, lambda: requests > 0)
        if gave_up is not None:  # a part keeps exiting: stop the others
            stop_services(at_once=False)
        while any(part.running() for part in services):
            time.sleep(0.2)
    finally:
        for part in services:  # only left running if this process is being torn down
            if part.running():
                assert part.process is not None
                part.process.kill()
        if redis_part is not None and redis_part.running():
            assert redis_part.process is not None
            redis_part.process.terminate()  # saves the queue to disk on the way out
            try:
                redis_part.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                redis_part.process.kill()
    if gave_up is not None:
        raise SystemExit(
            f"stopped because the {gave_up.name} exited {len(gave_up.exits)} times within {settings.serve_restart_window_s:g} s "
            f"(last exit code {gave_up.last_code})"
        )


def supervise(parts: list[Part], settings: "Settings", stopping: Callable[[], bool]) -> Part | None:
    """Keep `parts` running until `stopping()`: restart each that exits, after its pause. The
    part that exited too often, if one did (then the caller stops the rest)."""
    while not stopping():
        now = time.monotonic()
        for part in parts:
            if part.restart_at is None and not part.running():
                exits = part.exited(now, settings.serve_restart_window_s)
                if exits >= settings.serve_restart_limit:
                    click.echo(f"{part.name} exited with code {part.last_code}, {exits} times within {settings.serve_restart_window_s:g} s: giving up", err=True)
                    return part
                pause = part.restart_pause_s()
                click.echo(f"{part.name} exited with code {part.last_code}; restarting it in {pause:g} s", err=True)
                part.restart_at = now + pause
            elif part.restart_at is not None and now >= part.restart_at and not stopping():
                part.restart_at = None
                if start_part(part):
                    click.echo(f"restarted {part.name} (exit code {part.last_code})", err=True)
        time.sleep(0.2)
    return None


# --- API keys, on the registry database -------------------------------------------------


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


def key_output(api: "ApiContext", as_json: bool) -> "ApiContext":
    """`--json` given to the command or to `confprobe` itself."""
    return replace(api, as_json=api.as_json or as_json)


@main.group()
def keys() -> None:
    """API keys, made and revoked directly in the registry database (DATABASE_URL): the way
    to the first admin key of a service with AUTH_ENABLED."""


@keys.command("create")
@click.option("--name", required=True, help="What the key is for, e.g. who holds it.")
@click.option("--scopes", type=ScopeList(), required=True, help="Comma-separated: read, submit (includes read), admin (includes both).")
@click.option("--rate-limit", type=click.IntRange(min=0, max=MAX_RATE_LIMIT), help="This key's requests per minute (0: none) [default: RATE_LIMIT_PER_MINUTE].")
@click.option("--burst", type=click.IntRange(min=1, max=MAX_RATE_LIMIT), help="Requests at once after a quiet spell (with --rate-limit) [default: the rate limit].")
@json_option
@click.pass_obj
def create_api_key(api: "ApiContext", name: str, scopes: "list[Scope]", rate_limit: int | None, burst: int | None, as_json: bool) -> None:
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
def list_api_keys(api: "ApiContext", include_revoked: bool, as_json: bool) -> None:
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
def revoke_api_key(api: "ApiContext", key_id: str, as_json: bool) -> None:
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


# --- API commands --------------------------------------------------------------------------


EXIT_FAILURE = 1
EXIT_NOT_FOUND = 3
EXIT_INVALID_REQUEST = 4
EXIT_JOB_FAILED = 5
EXIT_UNAVAILABLE = 6
EXIT_NOT_AUTHORIZED = 7
EXIT_RATE_LIMITED = 8


def make_client(url: str | None) -> "Client":
    """The API client the commands use (tests replace it with one on an in-process service)."""
    from confprobe_client import Client

    return Client(url) if url else Client()


def exit_code_of(error: Exception) -> int:
    from confprobe_client import (
        Conflict,
        Forbidden,
        InvalidRequest,
        JobFailed,
        NotFound,
        RateLimited,
        Unauthorized,
        Unavailable,
        Unreachable,
    )

    if isinstance(error, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(error, Unauthorized | Forbidden):
        return EXIT_NOT_AUTHORIZED
    if isinstance(error, RateLimited):
        return EXIT_RATE_LIMITED
    if isinstance(error, InvalidRequest | Conflict):
        return EXIT_INVALID_REQUEST
    if isinstance(error, JobFailed):
        return EXIT_JOB_FAILED
    if isinstance(error, Unavailable | Unreachable):
        return EXIT_UNAVAILABLE
    return EXIT_FAILURE


def error_envelope(error: Exception) -> dict[str, Any]:
    """The §3 error shape for `--json`, whatever the kind: an answer's own, a job's error
    (with its id), or a connection that never got an answer."""
    from confprobe_client import ApiError, JobFailed, Unreachable

    if isinstance(error, ApiError | JobFailed):
        details = error.details | ({"job_id": error.job.id} if isinstance(error, JobFailed) else {})
        return {"error": {"code": error.code, "message": error.message, "details": details}}
    code = "unreachable" if isinstance(error, Unreachable) else "client_error"
    return {"error": {"code": code, "message": str(error), "details": {}}}


@dataclass
class ApiContext:
    """What the global options say to every API command."""

    url: str | None
    as_json: bool

    def client(self) -> "Client":
        return click.get_current_context().with_resource(make_client(self.url))

    def show(self, answer: "BaseModel | Sequence[BaseModel]", columns: "Sequence[Column]") -> None:
        """JSON as the API gives it (`--json`), else an aligned table."""
        items = [answer] if not isinstance(answer, Sequence) else list(answer)
        if self.as_json:
            dumped = [item.model_dump(mode="json") for item in items]
            click.echo(json.dumps(dumped if isinstance(answer, Sequence) else dumped[0], indent=2))
        else:
            click.echo(aligned_table([header for header, _ in columns], [[cell(item) for _, cell in columns] for item in items]))


pass_api = click.make_pass_decorator(ApiContext)

Column = tuple[str, Callable[[Any], str]]


def aligned_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(text) for text in column) for column in zip(headers, *rows, strict=True)]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)).rstrip() for row in [headers, *rows])


class ApiCommand(click.Command):
    """A command that uses the API: when it fails, a message on stderr and an exit code by
    kind of failure, so scripts can tell them apart."""

    def invoke(self, ctx: click.Context) -> Any:
        from confprobe_client import ConfprobeError

        try:
            return super().invoke(ctx)
        except ConfprobeError as error:
            api = ctx.find_object(ApiContext)
            if api is not None and api.as_json:
                click.echo(json.dumps(error_envelope(error)), err=True)
            else:
                click.echo(f"error: {error}{hint_for(error)}", err=True)
            ctx.exit(exit_code_of(error))


def hint_for(error: Exception) -> str:
    """What to do about a refused key, which the service's message cannot know."""
    from confprobe_client import API_KEY_VARIABLE, Unauthorized

    if isinstance(error, Unauthorized):
        state = "is set but not accepted" if os.environ.get(API_KEY_VARIABLE) else "is not set"
        return f"\n{API_KEY_VARIABLE} {state}: export {API_KEY_VARIABLE}=<key> (an admin makes one with `confprobe keys create`)"
    return ""


class ApiGroup(click.Group):
    """Commands that use the API, each an `ApiCommand`."""

    command_class = ApiCommand


class IntegerList(click.ParamType):
    """`8,16,-1` → [8, 16, -1]."""

    name = "integers"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[int]:
        if isinstance(value, list):
            return value
        try:
            return [int(part) for part in str(value).split(",") if part.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)


def comma_separated(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


no_wait_option = click.option("--no-wait", is_flag=True, help="Answer once the job is queued instead of following it with a progress bar.")
LAYERS = IntegerList()


def metric(metrics: "dict[str, Estimate]", name: str) -> str:
    estimate = metrics.get(name)
    return "-" if estimate is None or estimate.value is None else f"{estimate.value:.3f}"


def interval(bounds: list[float] | None) -> str:
    return f"[{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else "-"


MODEL_COLUMNS: list[Column] = [
    ("ID", lambda m: m.id),
    ("NAME", lambda m: m.name),
    ("ARCHITECTURE", lambda m: m.architecture),
    ("LAYERS", lambda m: str(m.num_layers)),
    ("HIDDEN", lambda m: str(m.hidden_size)),
    ("DTYPE", lambda m: m.dtype + (f"/{m.quantization}" if m.quantization else "")),
    ("STATUS", lambda m: m.status),
]
DATASET_COLUMNS: list[Column] = [
    ("ID", lambda d: d.id),
    ("NAME", lambda d: d.name),
    ("KIND", lambda d: d.kind),
    ("ROWS", lambda d: str(d.rows)),
    ("LABELS", lambda d: " ".join(f"{label}:{count}" for label, count in sorted(d.label_balance.items()))),
]
ADAPTER_COLUMNS: list[Column] = [
    ("ID", lambda a: a.id),
    ("NAME", lambda a: a.name),
    ("BASE MODEL", lambda a: a.base_model_id),
    ("R", lambda a: str(a.r)),
    ("ALPHA", lambda a: f"{a.lora_alpha:g}"),
    ("SOURCE", lambda a: a.source_kind),
]
JOB_COLUMNS: list[Column] = [
    ("ID", lambda j: j.id),
    ("KIND", lambda j: j.kind),
    ("STATUS", lambda j: j.status),
    ("STAGE", lambda j: j.progress.stage or "-"),
    ("PROGRESS", lambda j: f"{j.progress.done}/{j.progress.total}" if j.progress.total else str(j.progress.done)),
    ("ERROR", lambda j: j.error.code if j.error else "-"),
]
EXTRACTION_COLUMNS: list[Column] = [
    ("ID", lambda e: e.id),
    ("JOB", lambda e: e.job_id),
    ("STATUS", lambda e: e.status),
    ("LAYERS", lambda e: ",".join(map(str, e.layers))),
    ("SHAPE", lambda e: "x".join(map(str, e.shape)) if e.shape else "-"),
]
PROBE_COLUMNS: list[Column] = [
    ("ID", lambda p: p.id),
    ("LAYER", lambda p: str(p.layer)),
    ("METHOD", lambda p: p.method),
    ("BEST", lambda p: "*" if p.is_best else ""),
    ("AUROC", lambda p: metric(p.metrics, "auroc")),
    ("ECE", lambda p: metric(p.metrics, "ece")),
    ("BRIER", lambda p: metric(p.metrics, "brier")),
]
RUN_COLUMNS: list[Column] = [
    ("RUN", lambda r: r.id),
    ("JOB", lambda r: r.job_id),
    ("STATUS", lambda r: r.status),
    ("LAYERS", lambda r: ",".join(map(str, r.layers))),
    ("METHODS", lambda r: ",".join(r.methods)),
]
KEY_COLUMNS: list[Column] = [
    ("ID", lambda k: k.id),
    ("NAME", lambda k: k.name),
    ("PREFIX", lambda k: k.prefix),
    ("SCOPES", lambda k: ",".join(k.scopes)),
    ("RATE/MIN", lambda k: "default" if k.rate_limit_per_minute is None else str(k.rate_limit_per_minute)),
    ("LAST USED", lambda k: k.last_used_at.isoformat(timespec="minutes") if k.last_used_at else "-"),
    ("REVOKED", lambda k: k.revoked_at.isoformat(timespec="minutes") if k.revoked_at else "-"),
]
COMPARISON_COLUMNS: list[Column] = [
    ("ID", lambda c: c.id),
    ("JOB", lambda c: c.job_id),
    ("STATUS", lambda c: c.status),
    ("ADAPTERS", lambda c: ",".join(c.adapter_ids)),
    ("LAYER", lambda c: str(c.report["layer"]) if c.report else "-"),
]


@main.group(cls=ApiGroup)
def models() -> None:
    """Base models."""


@models.command("add")
@click.argument("source")
@click.option("--name", help="Display name [default: the last part of SOURCE].")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Weights' dtype on the worker [default: float32].")
@click.option("--quantization", type=click.Choice(["8bit", "4bit"]))
@no_wait_option
@pass_api
def add_model(api: ApiContext, source: str, name: str | None, dtype: str | None, quantization: str | None, no_wait: bool) -> None:
    """Register the base model at SOURCE (a folder, or a Hugging Face id in the service's
    cache) and wait for a worker to check it."""
    client = api.client()
    model = client.register_model(source, name=name, dtype=dtype, quantization=quantization)
    if not no_wait and model.status == "pending" and model.check_job_id:
        client.wait(model.check_job_id)
        model = client.get_model(model.id)
    api.show(model, MODEL_COLUMNS)


@models.command("ls")
@click.option("--limit", type=click.IntRange(1, 200), default=50, show_default=True)
@pass_api
def list_models(api: ApiContext, limit: int) -> None:
    """Registered base models, newest first."""
    api.show(api.client().list_models(limit=limit).items, MODEL_COLUMNS)


@main.group(cls=ApiGroup)
def adapters() -> None:
    """LoRA adapters of the base models."""


def show_imported_adapter(api: ApiContext, client: "Client", job: "Job", no_wait: bool) -> None:
    if no_wait:
        api.show(job, JOB_COLUMNS)
        return
    finished = client.wait(job.id)
    api.show(client.get_adapter((finished.result or {})["adapter_id"]), ADAPTER_COLUMNS)


@adapters.command("import")
@click.argument("source")
@click.option("--base-model", required=True, help="Id of the base model it was trained on.")
@click.option("--name", required=True)
@no_wait_option
@pass_api
def import_adapter(api: ApiContext, source: str, base_model: str, name: str, no_wait: bool) -> None:
    """Import the adapter at SOURCE: tinker://…/external_weights/…, a folder or archive under
    the service's ADAPTER_ROOTS, or an allowed https URL."""
    client = api.client()
    show_imported_adapter(api, client, client.import_adapter(source, base_model, name), no_wait)


@adapters.command("upload")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--base-model", required=True, help="Id of the base model it was trained on.")
@click.option("--name", required=True)
@no_wait_option
@pass_api
def upload_adapter(api: ApiContext, file: Path, base_model: str, name: str, no_wait: bool) -> None:
    """Upload FILE, a .tar, .tar.gz or .zip of a PEFT adapter or a Tinker checkpoint."""
    client = api.client()
    show_imported_adapter(api, client, client.upload_adapter(file, base_model, name), no_wait)


@adapters.command("ls")
@click.option("--base-model", help="Only the adapters of this base model.")
@click.option("--limit", type=click.IntRange(1, 200), default=50, show_default=True)
@pass_api
def list_adapters(api: ApiContext, base_model: str | None, limit: int) -> None:
    """Imported adapters, newest first."""
    api.show(api.client().list_adapters(base_model=base_model, limit=limit).items, ADAPTER_COLUMNS)


@adapters.command("rm")
@click.argument("adapter_id")
@click.option("--force", is_flag=True, help="Delete even while unfinished jobs use it.")
@pass_api
def remove_adapter(api: ApiContext, adapter_id: str, force: bool) -> None:
    """Delete an adapter's registration and files."""
    api.client().delete_adapter(adapter_id, force=force)
    click.echo(json.dumps({"deleted": adapter_id}) if api.as_json else f"deleted {adapter_id}")


@main.group(cls=ApiGroup)
def datasets() -> None:
    """Statements and multiple-choice datasets."""


@datasets.command("add")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="Display name [default: the file name].")
@pass_api
def add_dataset(api: ApiContext, file: Path, name: str | None) -> None:
    """Upload FILE (JSONL or CSV): statements {text, label} or multiple choice {question,
    choices, answer}."""
    api.show(api.client().upload_dataset(file, name=name), DATASET_COLUMNS)


@datasets.command("ls")
@click.option("--limit", type=click.IntRange(1, 200), default=50, show_default=True)
@pass_api
def list_datasets(api: ApiContext, limit: int) -> None:
    """Uploaded datasets, newest first."""
    api.show(api.client().list_datasets(limit=limit).items, DATASET_COLUMNS)


@main.command(cls=ApiCommand)
@click.option("--model", required=True, help="Id of the base model.")
@click.option("--adapter", help="Id of an adapter of that model.")
@click.option("--layers", type=LAYERS, required=True, help="Comma-separated, e.g. 8,16,-1 (0 = embeddings).")
@click.option("--texts-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="One text per line.")
@click.option("--dataset", help="Id of an uploaded dataset (instead of --texts-file).")
@click.option("--token-position", type=click.Choice(["last", "mean"]), help="[default: last]")
@click.option("--max-length", type=click.IntRange(min=1), help="Truncate texts to this many tokens.")
@click.option("--out", type=click.Path(dir_okay=False, writable=True, path_type=Path), help="Write the (texts, layers, hidden) array here as .npy.")
@no_wait_option
@pass_api
def extract(
    api: ApiContext,
    model: str,
    adapter: str | None,
    layers: list[int],
    texts_file: Path | None,
    dataset: str | None,
    token_position: str | None,
    max_length: int | None,
    out: Path | None,
    no_wait: bool,
) -> None:
    """Extract hidden states of texts at layers; with --out, save them as .npy."""
    if (texts_file is None) == (dataset is None):
        raise click.UsageError("give exactly one of --texts-file and --dataset")
    if out is not None and no_wait:
        raise click.UsageError("--out needs the states, which --no-wait does not wait for")
    texts = [line for line in texts_file.read_text().splitlines() if line.strip()] if texts_file else None
    client = api.client()
    extraction = client.create_extraction(model, layers, texts=texts, dataset=dataset, adapter=adapter, token_position=token_position, max_length=max_length)
    if not no_wait:
        client.wait(extraction.job_id)
        extraction = client.get_extraction(extraction.id)
    if out is not None:
        import numpy as np

        np.save(out, client.download_hidden_states(extraction.id))
    api.show(extraction, EXTRACTION_COLUMNS)
    if out is not None and not api.as_json:
        click.echo(f"states: {out}")


@main.group(cls=ApiGroup)
def probes() -> None:
    """Correctness probes and their calibration reports."""


@probes.command("train")
@click.option("--model", required=True, help="Id of the base model.")
@click.option("--adapter", help="Id of an adapter of that model.")
@click.option("--dataset", required=True, help="Id of a statements or multiple-choice dataset.")
@click.option("--layers", type=LAYERS, required=True, help="Comma-separated; one probe per layer and method.")
@click.option("--method", default="logistic", show_default=True, help="logistic, mass_mean, or both: logistic,mass_mean.")
@click.option("--recalibration", type=click.Choice(["temperature", "platt"]), help="Fitted on the validation split.")
@click.option("--seed", type=click.IntRange(min=0), help="Seed of the split [default: 0].")
@no_wait_option
@pass_api
def train_probes(
    api: ApiContext, model: str, adapter: str | None, dataset: str, layers: list[int], method: str, recalibration: str | None, seed: int | None, no_wait: bool
) -> None:
    """Train probes and show their held-out metrics; the best on validation is starred."""
    methods = comma_separated(method)
    client = api.client()
    run = client.train_probes(model, dataset, layers, method=methods[0] if len(methods) == 1 else methods, adapter=adapter, seed=seed, recalibration=recalibration)
    if no_wait:
        api.show(run, RUN_COLUMNS)
        return
    client.wait(run.job_id)
    api.show(client.get_probe_run(run.id).probes, PROBE_COLUMNS)


@probes.command("ls")
@click.option("--model", help="Only the probes of this model.")
@click.option("--dataset", help="Only the probes trained on this dataset.")
@click.option("--best", is_flag=True, help="Only the best probe of each run.")
@click.option("--limit", type=click.IntRange(1, 200), default=50, show_default=True)
@pass_api
def list_probes(api: ApiContext, model: str | None, dataset: str | None, best: bool, limit: int) -> None:
    """Trained probes with their held-out metrics."""
    api.show(api.client().list_probes(model=model, dataset=dataset, best=True if best else None, limit=limit).items, PROBE_COLUMNS)


@probes.command("report")
@click.argument("probe_id")
@click.option("--out", type=click.Path(dir_okay=False, writable=True, path_type=Path), help="Where to write the HTML report [default: PROBE_ID.html].")
@click.option("--open", "open_in_browser", is_flag=True, help="Open the HTML report in a web browser.")
@pass_api
def probe_report(api: ApiContext, probe_id: str, out: Path | None, open_in_browser: bool) -> None:
    """Write a probe's calibration report (reliability diagram, histogram, metrics) as HTML
    and show its held-out metrics."""
    client = api.client()
    report = client.probe_report(probe_id)
    path = out or Path(f"{probe_id}.html")
    path.write_text(client.probe_report_html(probe_id), encoding="utf-8")
    if api.as_json:
        click.echo(json.dumps(report.model_dump(mode="json") | {"html": str(path)}, indent=2))
    else:
        rows = [[name, metric(report.probe.metrics, name), interval(estimate.interval)] for name, estimate in report.probe.metrics.items()]
        click.echo(aligned_table(["METRIC", "VALUE", "95% INTERVAL"], rows))
        click.echo(f"report: {path}")
    if open_in_browser:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())


@main.command(cls=ApiCommand)
@click.option("--model", required=True, help="Id of the base model.")
@click.option("--adapters", "adapter_ids", required=True, help="Comma-separated adapter ids of that model.")
@click.option("--dataset", required=True)
@click.option("--layers", type=LAYERS, required=True, help="Comma-separated; the best on the base's validation split is reported.")
@click.option("--method", type=click.Choice(["logistic", "mass_mean"]), help="[default: logistic]")
@no_wait_option
@pass_api
def compare(api: ApiContext, model: str, adapter_ids: str, dataset: str, layers: list[int], method: str | None, no_wait: bool) -> None:
    """Compare a base model with its adapters on the same texts, split and layer."""
    client = api.client()
    comparison = client.compare(model, comma_separated(adapter_ids), dataset, layers, method=method)
    if not no_wait:
        client.wait(comparison.job_id)
        comparison = client.get_comparison(comparison.id)
    if api.as_json or comparison.report is None:
        api.show(comparison, COMPARISON_COLUMNS)
        return
    from confprobe_client import CalibrationReport

    reports = [(variant["label"], CalibrationReport.model_validate(variant["report"])) for variant in comparison.report["variants"]]
    rows = [[label, *(metric(report.metrics, name) for name in ("auroc", "ece", "brier"))] for label, report in reports]
    click.echo(aligned_table(["MODEL", "AUROC", "ECE", "BRIER"], rows))
    click.echo(f"comparison {comparison.id}, layer {comparison.report['layer']}")


@main.group(cls=ApiGroup)
def experiment() -> None:
    """Experiment configs (the seed framework's YAML) run as one job."""


@experiment.command("run")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@no_wait_option
@pass_api
def run_experiment(api: ApiContext, config: Path, no_wait: bool) -> None:
    """Run CONFIG (YAML or JSON): adapter import, extraction, probes and report, resumed from
    what earlier runs already made."""
    client = api.client()
    started = client.run_experiment(config)
    if not no_wait:
        client.wait(started.job_id)
    finished = client.get_experiment(started.id)
    if api.as_json:
        click.echo(json.dumps(finished.model_dump(mode="json"), indent=2))
        return
    click.echo(aligned_table(["ARTIFACT", "LINK"], [[name, link or "—"] for name, link in finished.links.items()]))
    click.echo(f"experiment {finished.id}: {finished.status}")


@main.group(cls=ApiGroup)
def jobs() -> None:
    """Jobs: list, show, cancel, watch."""


@jobs.command("ls")
@click.option("--status", type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled"]))
@click.option("--kind", help="e.g. extraction, probe_training, adapter_import, model_check.")
@click.option("--limit", type=click.IntRange(1, 200), default=50, show_default=True)
@pass_api
def list_jobs(api: ApiContext, status: str | None, kind: str | None, limit: int) -> None:
    """Jobs, newest first."""
    api.show(api.client().list_jobs(status=status, kind=kind, limit=limit).items, JOB_COLUMNS)


@jobs.command("show")
@click.argument("job_id")
@pass_api
def show_job(api: ApiContext, job_id: str) -> None:
    api.show(api.client().get_job(job_id), JOB_COLUMNS)


@jobs.command("cancel")
@click.argument("job_id")
@pass_api
def cancel_job(api: ApiContext, job_id: str) -> None:
    """Cancel a queued job at once, or a running one at its next progress point."""
    api.show(api.client().cancel_job(job_id), JOB_COLUMNS)


@jobs.command("watch")
@click.argument("job_id")
@pass_api
def watch_job(api: ApiContext, job_id: str) -> None:
    """Follow a job with a progress bar until it ends (exit code 5 when it fails)."""
    api.show(api.client().wait(job_id), JOB_COLUMNS)


if __name__ == "__main__":
    main()
