"""Real components for the tests: a Redis server, a PostgreSQL server, registry databases
migrated by Alembic, worker processes, and tiny random models built on the spot.

Outside CI a missing server binary skips the tests that need it; under CI (`CI=true`) it
fails them, so CI never passes by skipping.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TINKER_TELEMETRY", "0")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the suite in as many processes as the machine has cores: each (and the
    # gateways and workers its tests start, which inherit this) computes on one thread, or
    # their thread pools would contend for the same cores and every one of them slow down
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from app.broker import redis_server_executable
from app.registry.database import migrate
from app.settings import Settings
from tests.servers import (
    PostgresServer,
    answers,
    free_port,
    local_postgres,
    local_postgres_available,
)

# the real models' fixtures, one instance a session for every module that uses them (a
# fixture imported into each module would be made again for each)
pytest_plugins = ["tests.real_models"]

IN_CI = os.environ.get("CI") == "true"
ROOT = Path(__file__).resolve().parent.parent
# the real data sets sit beside the checkout, in shared/data
SHARED_DATA = Path(os.environ.get("CONFPROBE_TEST_DATA", ROOT.parent / "shared" / "data"))
BACKENDS = ["sqlite", "postgresql"]
# Tests of the registry's own behaviour — its tables and migrations, jobs and their
# compare-and-set changes, deletion, the content cache's index, work spread over workers —
# run on both backends. Every other test runs on one: SQLite where the test works on the
# registry in its own process (`database_url`), PostgreSQL where a gateway and a worker
# process share it (`stack`), as a deployment does.
BOTH_BACKENDS = (
    "tests/registry/",
    "tests/api/test_jobs.py",
    "tests/api/test_deletions.py",
    "tests/api/test_datasets.py",
    "tests/test_janitor.py",
    "tests/workers/test_fanout.py",
    "tests/workers/test_state_cache.py",
    "tests/workers/test_lost_workers.py",
    "tests/workers/test_runner.py",
)
TERMINAL = {"succeeded", "failed", "cancelled"}


def require(available: bool, reason: str) -> None:
    if not available:
        if IN_CI:
            pytest.fail(f"CI needs this: {reason}")
        pytest.skip(reason)


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextmanager
def served(app: Any) -> Iterator[str]:
    """An ASGI app on a free loopback port, in a background thread; yields its base URL."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 20, "the server to listen")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


# --- Redis -----------------------------------------------------------------------------


@dataclass
class RedisServer:
    """A real redis-server on a free loopback port; `restart()` keeps the port."""

    folder: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                redis_server_executable(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.folder),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        wait_until(lambda: _pings(client), 10, "redis-server to answer")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(folder=tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test alone (no persistence), so stopping, killing or restarting it
    disturbs nobody else."""
    server = RedisServer(folder=tmp_path)
    server.start()
    yield server
    server.stop()


# --- PostgreSQL ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    require(local_postgres_available(), "PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    # room for the engines of many tests: a test's pooled connections close only once it is collected
    with local_postgres(max_connections=300) as server:
        yield server


# --- Registry databases ----------------------------------------------------------------


class Databases:
    """Fresh, migrated registry databases, copied from a template migrated once per backend."""

    def __init__(self, request: pytest.FixtureRequest, folder: Path) -> None:
        self._request = request
        self._folder = folder
        self._sqlite_template: Path | None = None
        self._postgres_template: str | None = None

    def new(self, backend: str) -> str:
        if backend == "sqlite":
            if self._sqlite_template is None:
                self._sqlite_template = self._folder / "template.db"
                migrate(f"sqlite:///{self._sqlite_template}")
            path = self._folder / f"{uuid.uuid4().hex[:12]}.db"
            shutil.copyfile(self._sqlite_template, path)
            return f"sqlite:///{path}"
        server: PostgresServer = self._request.getfixturevalue("postgres_server")
        if self._postgres_template is None:
            self._postgres_template = server.create_database()
            migrate(server.url(self._postgres_template))
        return server.url(server.create_database(template=self._postgres_template))


@pytest.fixture(scope="session")
def databases(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Databases:
    return Databases(request, tmp_path_factory.mktemp("registries"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The registry backends a test runs on (`BOTH_BACKENDS`)."""
    path = Path(metafunc.definition.path).relative_to(ROOT).as_posix()
    both = path.startswith(BOTH_BACKENDS)
    pinned = {
        name.strip()
        for mark in metafunc.definition.iter_markers("parametrize")
        for name in (mark.args[0].split(",") if isinstance(mark.args[0], str) else mark.args[0])
    }
    if "database_url" in metafunc.fixturenames and "database_url" not in pinned:
        metafunc.parametrize("database_url", BACKENDS if both else ["sqlite"], indirect=True)
    if "stack" in metafunc.fixturenames and "stack" not in pinned:
        metafunc.parametrize("stack", BACKENDS if both else ["postgresql"], indirect=True, scope="session")


@pytest.fixture
def database_url(request: pytest.FixtureRequest, databases: Databases) -> str:
    return databases.new(request.param)


TINKER_KEY = "tml-test-key"


def make_settings(database_url: str, redis_url: str, var_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "var_dir": var_dir,
        "adapter_roots": [var_dir.parent / "adapter-sources"],
        "tinker_api_key": TINKER_KEY,
        "database_url": database_url,
        "redis_url": redis_url,
        "queue_prefix": f"test-{uuid.uuid4().hex[:8]}",
        "heartbeat_interval_s": 0.5,
        "heartbeat_ttl_s": 5,
        "hf_cache_dir": var_dir / "hf-cache",
    }
    values.update(overrides)
    return Settings(**values)


def settings_environment(settings: Settings) -> dict[str, str]:
    """The environment that gives another process the same settings."""
    env = dict(os.environ)
    for name, value in settings.model_dump(exclude_none=True, mode="json").items():
        env[name.upper()] = json.dumps(value) if isinstance(value, list) else str(value)
    return env


@pytest.fixture
def settings(database_url: str, redis_server: RedisServer, tmp_path: Path) -> Settings:
    return make_settings(database_url, redis_server.url, tmp_path / "var")


@pytest.fixture
def api(settings: Settings) -> Iterator[Any]:
    """The gateway in-process against a fresh registry and a real Redis; no worker runs, so
    jobs stay queued until a test runs them."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(settings)) as client:
        yield client


# --- Workers ---------------------------------------------------------------------------


def start_worker(settings: Settings, name: str, log_file: Path | None = None) -> subprocess.Popen[bytes]:
    env = settings_environment(settings) | {"WORKER_NAME": name, "PYTHONUNBUFFERED": "1"}
    output: Any = open(log_file, "wb") if log_file else subprocess.DEVNULL  # noqa: SIM115 (the child owns it)
    process = subprocess.Popen([sys.executable, "-m", "workers.main"], env=env, cwd=ROOT, stdout=output, stderr=output)
    client = redis.Redis.from_url(settings.resolved_redis_url)
    key = f"{settings.queue_prefix}:worker:{name}"
    wait_until(
        lambda: process.poll() is not None or client.exists(key), 120, f"worker {name} to heartbeat", interval=0.2
    )
    assert process.poll() is None, f"worker {name} exited with {process.returncode}"
    return process


def start_gateway(settings: Settings, port: int, log_file: Path | None = None) -> subprocess.Popen[bytes]:
    """`confprobe gateway` in its own process on `port`, answering when this returns."""
    output: Any = open(log_file, "wb") if log_file else subprocess.DEVNULL  # noqa: SIM115 (the child owns it)
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "gateway", "--port", str(port)],
        env=settings_environment(settings),
        cwd=ROOT,
        stdout=output,
        stderr=output,
    )
    wait_until(
        lambda: process.poll() is not None or answers(f"http://127.0.0.1:{port}"),
        60,
        "the gateway to answer",
        interval=0.1,
    )
    assert process.poll() is None, f"the gateway exited with {process.returncode}"
    return process


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@dataclass
class Stack:
    settings: Settings
    client: Any
    worker: subprocess.Popen[bytes]
    worker_name: str


@pytest.fixture(scope="session")
def tinker_standin() -> Iterator[Any]:
    """The local stand-in of the Tinker service, shared by the session: workers started with
    the stack fixture point at it."""
    from tests.tinker_standin import TinkerStandin

    with TinkerStandin(api_key=TINKER_KEY) as standin:
        yield standin


@pytest.fixture(scope="session")
def stack(
    request: pytest.FixtureRequest,
    databases: Databases,
    redis_server: RedisServer,
    tinker_standin: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """Gateway + one real worker process on a real Redis and a registry of each backend,
    shared by the tests that need jobs to run."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = make_settings(
        databases.new(request.param),
        redis_server.url,
        tmp_path_factory.mktemp("stack") / "var",
        tinker_base_url=tinker_standin.base_url,
    )
    worker_name = f"stack-{request.param}"
    worker = start_worker(settings, worker_name)
    try:
        with TestClient(create_app(settings)) as client:
            yield Stack(settings=settings, client=client, worker=worker, worker_name=worker_name)
    finally:
        stop_process(worker)


def wait_for_job(client: Any, job_id: str, timeout: float = 120) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in TERMINAL else None

    return wait_until(final, timeout, f"job {job_id} to finish", interval=0.05)


# --- S3 --------------------------------------------------------------------------------

S3_BUCKET = "confprobe-test"


@dataclass
class S3Server:
    """moto's S3-compatible server in its own process (as MinIO would be), with one bucket;
    every test store gets a fresh prefix in it."""

    endpoint_url: str
    bucket: str = S3_BUCKET

    def client(self) -> Any:
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url)

    def new_prefix(self) -> str:
        return f"t-{uuid.uuid4().hex[:12]}"

    def keys(self, prefix: str) -> list[str]:
        """Every object name under `prefix/`, straight from the server."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{prefix}/")
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=1).status_code < 500
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    import importlib.util

    require(
        importlib.util.find_spec("moto") is not None and importlib.util.find_spec("flask") is not None,
        "moto[server] is not installed",
    )
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # test credentials for this process and the workers it starts: never a real account
    with pytest.MonkeyPatch.context() as environment:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            environment.setenv(name, value)
        environment.delenv("AWS_SESSION_TOKEN", raising=False)
        environment.delenv("AWS_PROFILE", raising=False)
        try:
            server = S3Server(endpoint_url=f"http://127.0.0.1:{port}")
            wait_until(
                lambda: process.poll() is not None or _answers(server.endpoint_url),
                30,
                "the S3 server to answer",
                interval=0.1,
            )
            assert process.poll() is None, f"moto_server exited with {process.returncode}"
            server.client().create_bucket(Bucket=server.bucket)
            yield server
        finally:
            stop_process(process)


# --- Models ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_llama_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def tiny_llama(tiny_llama_template: Path, tmp_path: Path) -> Path:
    """A private copy, so registering it never collides with another test's registration."""
    return Path(shutil.copytree(tiny_llama_template, tmp_path / "tiny-llama"))
