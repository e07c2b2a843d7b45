"""Load on the real multi-worker stack, with a worker SIGKILLed mid-job.

Starts a real Redis, a private PostgreSQL (the multi-machine registry), one gateway process
with API keys required (as docker-compose runs it) and two worker processes, then 50
concurrent clients for 60 s mix job submissions (canary `ping` jobs, and small extractions
on a tiny Llama that run real forward passes), status polls of their own jobs, job listings
and hidden-states downloads, each request with a submit key made by `confprobe keys create`.
Some seconds in, one worker is SIGKILLed while it runs a long extraction, and a fresh worker
takes its place; the killed job must be finished by a worker (retried), not lost.

After the clients stop, every submitted job is followed until it is final (up to 5 min).
`jobs_lost` counts jobs that never got there; `kills_survived` counts kills whose running
job still succeeded; `transport_errors` counts requests that got no answer (refused, reset,
timed out); `settle_errors` counts status polls while following the jobs that got no job
back (an error answer, or none).

A client thinks `--think-ms` on average between requests (uniformly 0.4 to 1.6 times it);
`--think-ms 0` sends the next request as soon as the last is answered, to find where the
stack saturates. The key has no rate limit, so such a run measures the service rather than
the limit it would put on one client.

Without PostgreSQL the run refuses to start; `--sqlite` runs it on a SQLite registry
instead (one machine only, and not what a deployment measures).

    python bench/load.py [--seconds 60] [--clients 50] [--think-ms 250] [--sqlite]

Last line: one JSON object. The exit status is 1 when any request got a 5xx or no answer,
any job was lost, or following the jobs met an error: a run that went wrong never reads
as a result.
"""

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.broker import heartbeat_key, redis_server_executable  # noqa: E402
from app.registry.database import migrate  # noqa: E402
from app.settings import Settings  # noqa: E402
from tests.servers import answers, free_port, local_postgres, local_postgres_available  # noqa: E402
from tests.tiny_models import save_tiny_llama  # noqa: E402

FINAL = {"succeeded", "failed", "cancelled"}
THINK_SPREAD = (0.4, 1.6)  # a client's pause, as fractions of the mean: the 100-400 ms of a 250 ms mean
STACK = Settings(queue_prefix="load", heartbeat_ttl_s=4)  # what the stack runs with, for its Redis key names
WORDS = [
    "the",
    "river",
    "city",
    "mountain",
    "north",
    "paris",
    "rome",
    "seven",
    "blue",
    "quiet",
    "bridge",
    "capital",
    "old",
    "market",
]


def wait_for(predicate: Any, timeout: float, what: str, pause: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(pause)
    raise TimeoutError(f"waited {timeout} s for {what}")


class Stack:
    """Redis, registry, gateway and workers as real processes."""

    def __init__(self, folder: Path, database_url: str) -> None:
        self.folder = folder
        self.redis_port, self.port = free_port(), free_port()
        self.env = os.environ | {
            "DATABASE_URL": database_url,
            "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "VAR_DIR": str(folder / "var"),
            "QUEUE_PREFIX": STACK.queue_prefix,
            "HEARTBEAT_INTERVAL_S": "1",
            "HEARTBEAT_TTL_S": str(STACK.heartbeat_ttl_s),
            "LOG_LEVEL": "warning",
            "AUTH_ENABLED": "true",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.processes: list[subprocess.Popen[bytes]] = []
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.base = f"http://127.0.0.1:{self.port}"
        self.started = time.monotonic()
        self.api_key = ""
        self.gateway: subprocess.Popen[bytes] | None = None

    def _spawn(self, args: list[str], log: str, **env: str) -> subprocess.Popen[bytes]:
        with open(self.folder / log, "ab") as output:
            process = subprocess.Popen(args, env=self.env | env, cwd=ROOT, stdout=output, stderr=output)
        self.processes.append(process)
        return process

    def start(self, workers: tuple[str, ...] = ("worker-a", "worker-b"), env: dict[str, str] | None = None) -> None:
        """Redis, the registry's schema, a submit key, the gateway and `workers`; `env` adds
        settings for the gateway and workers."""
        self.env |= env or {}
        self._spawn(
            [
                redis_server_executable(),
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            "redis.log",
        )
        client = redis.Redis(port=self.redis_port)
        wait_for(lambda: _pings(client), 10, "redis")
        migrate(self.env["DATABASE_URL"])
        self.api_key = self.create_key()
        self.gateway = self._spawn(
            [sys.executable, "-m", "app.cli", "gateway", "--port", str(self.port)], "gateway.log"
        )
        wait_for(lambda: answers(self.base), 60, "the gateway")
        for name in workers:
            self.start_worker(name)

    def create_key(self) -> str:
        """A submit key, made the way an operator makes the first one."""
        made = subprocess.run(
            [
                sys.executable,
                "-m",
                "app.cli",
                "keys",
                "create",
                "--name",
                "load benchmark",
                "--scopes",
                "submit",
                "--rate-limit",
                "0",
                "--json",
            ],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(made.stdout)["secret"]

    def client(self, timeout: float) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=timeout, headers={"Authorization": f"Bearer {self.api_key}"})

    def start_worker(self, name: str) -> None:
        self.workers[name] = self._spawn([sys.executable, "-m", "workers.main"], f"{name}.log", WORKER_NAME=name)
        client = redis.Redis(port=self.redis_port)
        wait_for(lambda: client.exists(heartbeat_key(STACK, name)), 120, f"worker {name}")

    def heartbeat(self, name: str) -> dict[str, Any] | None:
        raw = redis.Redis(port=self.redis_port).get(heartbeat_key(STACK, name))
        return json.loads(raw) if raw else None

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


class Load:
    def __init__(
        self, stack: Stack, model_id: str, extraction_id: str, clients: int, seconds: float, think_ms: float
    ) -> None:
        self.base, self.api_key, self.model_id, self.extraction_id = stack.base, stack.api_key, model_id, extraction_id
        self.clients, self.seconds, self.think_s = clients, seconds, think_ms / 1000
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.transport_errors = 0
        self.submitted: list[str] = []

    async def request(self, client: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> httpx.Response | None:
        start = time.perf_counter()
        try:
            response = await client.request(method, url, **kwargs)
            await response.aread()
        except httpx.HTTPError:
            self.transport_errors += 1
            return None
        self.latencies.append(time.perf_counter() - start)
        self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
        return response

    async def client_loop(self, seed: int, deadline: float) -> None:
        rng = random.Random(seed)
        mine: list[str] = []
        headers = {"Authorization": f"Bearer {self.api_key}"}
        async with httpx.AsyncClient(base_url=self.base, timeout=60, headers=headers) as client:
            while time.monotonic() < deadline:
                if self.think_s:
                    await asyncio.sleep(self.think_s * rng.uniform(*THINK_SPREAD))  # a client thinks between requests
                roll = rng.random()
                if roll < 0.05:
                    response = await self.request(client, "POST", "/v1/jobs/ping")
                elif roll < 0.08:
                    texts = [" ".join(rng.choices(WORDS, k=rng.randint(4, 12))) for _ in range(8)]
                    response = await self.request(
                        client,
                        "POST",
                        "/v1/extractions",
                        json={"model": self.model_id, "layers": [1, 2], "texts": texts},
                    )
                elif roll < 0.65 and mine:
                    await self.request(client, "GET", f"/v1/jobs/{rng.choice(mine)}")
                    continue
                elif roll < 0.8:
                    await self.request(
                        client, "GET", f"/v1/extractions/{self.extraction_id}/hidden-states", params={"format": "npy"}
                    )
                    continue
                else:
                    await self.request(client, "GET", "/v1/jobs", params={"limit": 20})
                    continue
                if response is not None and response.status_code == 202:
                    job_id = response.json()["job"]["id"]
                    mine.append(job_id)
                    self.submitted.append(job_id)

    async def run(self) -> float:
        start = time.monotonic()
        deadline = start + self.seconds
        await asyncio.gather(*(self.client_loop(seed, deadline) for seed in range(self.clients)))
        return time.monotonic() - start


def kill_mid_extraction(stack: Stack, model_id: str, after_s: float) -> dict[str, Any]:
    """Submit a long extraction, SIGKILL whichever worker runs it, and start a fresh worker
    in its place."""
    time.sleep(after_s)
    client = stack.client(timeout=30)
    texts = [" ".join(random.Random(-i).choices(WORDS, k=24)) for i in range(2000)]
    job_id = (
        client.post("/v1/extractions", json={"model": model_id, "layers": [1, 2, 3], "texts": texts})
        .raise_for_status()
        .json()["job"]["id"]
    )

    def runner() -> str | None:
        return next(
            (
                name
                for name, process in stack.workers.items()
                if process.poll() is None and (stack.heartbeat(name) or {}).get("current_job") == job_id
            ),
            None,
        )

    victim = wait_for(runner, 300, "a worker to run the long extraction")
    time.sleep(0.5)
    stack.workers[victim].send_signal(signal.SIGKILL)
    stack.workers[victim].wait(10)
    stack.start_worker(f"{victim}-replacement")
    return {"worker": victim, "job": job_id, "at_s": round(time.monotonic() - stack.started, 1)}


@dataclass
class Settled:
    jobs: dict[str, dict[str, Any]]  # each job as it was last seen
    errors: int  # polls that got no job back: an error answer (a 5xx, a 404) or none


def settle(stack: Stack, job_ids: list[str], timeout: float) -> Settled:
    """Each job as it is once final, or as it was when `timeout` ran out; a poll that gets
    no job back is counted and tried again on the next round."""
    client = stack.client(timeout=30)
    settled = Settled(jobs={}, errors=0)
    deadline = time.monotonic() + timeout
    pending = list(job_ids)
    while pending and time.monotonic() < deadline:
        still = []
        for job_id in pending:
            try:
                response = client.get(f"/v1/jobs/{job_id}")
            except httpx.HTTPError:
                response = None
            if response is None or response.status_code != 200:
                settled.errors += 1
                still.append(job_id)
                continue
            settled.jobs[job_id] = response.json()
            if settled.jobs[job_id]["status"] not in FINAL:
                still.append(job_id)
        pending = still
        if pending:
            time.sleep(1)
    return settled


def prepare(stack: Stack, model_folder: Path) -> tuple[str, str]:
    client = stack.client(timeout=120)
    model = (
        client.post("/v1/models", json={"name": "tiny-llama", "source": str(model_folder)}).raise_for_status().json()
    )
    wait_for(
        lambda: client.get(f"/v1/jobs/{model['check_job_id']}").json()["status"] == "succeeded", 120, "the model check"
    )
    texts = [" ".join(random.Random(i).choices(WORDS, k=10)) for i in range(256)]
    created = (
        client.post("/v1/extractions", json={"model": model["id"], "layers": [1, 2], "texts": texts})
        .raise_for_status()
        .json()
    )
    wait_for(
        lambda: client.get(f"/v1/jobs/{created['job']['id']}").json()["status"] == "succeeded",
        120,
        "the first extraction",
    )
    return model["id"], created["extraction"]["id"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--kill-after", type=float, default=20, help="seconds into the run before the kill")
    parser.add_argument(
        "--think-ms", type=float, default=250, help="a client's mean pause between requests; 0: none (saturation)"
    )
    parser.add_argument(
        "--sqlite", action="store_true", help="run on a SQLite registry (without it, PostgreSQL is required)"
    )
    args = parser.parse_args()
    if not args.sqlite and not local_postgres_available():
        parser.error(
            "PostgreSQL server binaries (initdb, pg_ctl) are not installed; install them, or pass --sqlite to measure on SQLite"
        )

    folder = Path(tempfile.mkdtemp(prefix="confprobe-load-"))
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, folder, ignore_errors=True)
        if args.sqlite:
            database_url, database = f"sqlite:///{folder / 'registry.db'}", "sqlite"
        else:
            server = cleanup.enter_context(local_postgres(max_connections=200))
            database_url, database = server.url(server.create_database()), "postgresql"
        # a model big enough that an extraction takes a moment, so the kill lands mid-job
        model_folder = save_tiny_llama(
            folder / "model", hidden_size=256, layers=6, heads=4, kv_heads=2, vocab_size=4096
        )
        stack = Stack(folder, database_url)
        cleanup.callback(stack.stop)
        stack.start()
        model_id, extraction_id = prepare(stack, model_folder)

        load = Load(stack, model_id, extraction_id, args.clients, args.seconds, args.think_ms)
        loop = asyncio.new_event_loop()
        stack.started = time.monotonic()
        killer = loop.run_in_executor(None, kill_mid_extraction, stack, model_id, args.kill_after)
        elapsed = loop.run_until_complete(load.run())
        kill = loop.run_until_complete(killer)
        loop.close()

        watched = [*load.submitted, kill["job"]]
        settled = settle(stack, watched, timeout=300)
        jobs = settled.jobs
        lost = [job_id for job_id in watched if jobs.get(job_id, {}).get("status") not in FINAL]
        killed_job = jobs.get(kill["job"], {"status": "unknown", "worker": None, "attempts": 0})
        latencies_ms = np.array(load.latencies or [float("nan")]) * 1000
        errors_5xx = sum(count for status, count in load.statuses.items() if status >= 500)
        print(
            f"statuses: {dict(sorted(load.statuses.items()))}; killed {kill['worker']} running {kill['job']} at {kill['at_s']} s → "
            f"{killed_job['status']} on {killed_job['worker']} after {killed_job['attempts']} attempts",
            file=sys.stderr,
        )
        result = {
            "requests": int(sum(load.statuses.values())),
            "errors_5xx": int(errors_5xx),
            "transport_errors": load.transport_errors,
            "settle_errors": settled.errors,
            "jobs_submitted": len(load.submitted),
            "jobs_lost": len(lost),
            "jobs_failed": sum(1 for job in jobs.values() if job["status"] == "failed"),
            "jobs_retried": sum(1 for job in jobs.values() if job["attempts"] > 1),
            "p50_ms": round(float(np.percentile(latencies_ms, 50)), 1),
            "p99_ms": round(float(np.percentile(latencies_ms, 99)), 1),
            "requests_per_s": round(sum(load.statuses.values()) / elapsed, 1),
            "kills": 1,
            "kills_survived": int(killed_job["status"] == "succeeded" and killed_job["attempts"] >= 2),
            "clients": args.clients,
            "think_ms": args.think_ms,
            "seconds": round(elapsed, 1),
            "workers": 2,
            "database": database,
            "auth": True,
        }
        failures = [
            f"{name}={result[name]}"
            for name in ("errors_5xx", "transport_errors", "jobs_lost", "settle_errors")
            if result[name]
        ]
        if failures:
            print(f"FAILED: {', '.join(failures)}", file=sys.stderr, flush=True)
        print(json.dumps(result), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
