"""Job round trips through the real embedded stack, and the gateway's import cost.

Starts `confprobe serve` (embedded Redis, gateway, one worker, SQLite) in a temporary
folder, then 20 concurrent clients each submit small jobs (`POST /v1/jobs/ping`, a canary
job that runs the whole path but no model) and follow each with its server-sent events
until it succeeds. A round trip is submit → `succeeded` event, measured by the client.

Clients pace themselves (one job every PACE_S each, the first at a random offset), so the
latencies describe a service under a steady load rather than a queue the benchmark itself
keeps full; `jobs_per_s` is measured separately with the same 20 clients and no pacing.

The gateway import cost is a ratio measured in this run: importing `app.main` and building
the app, against a bare FastAPI hello-world, each in a fresh interpreter, best of 5.

Last line: one JSON object.
"""

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

CLIENTS = 20
JOBS_PER_CLIENT = 25
PACE_S = 0.5
THROUGHPUT_JOBS_PER_CLIENT = 15
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def import_seconds(code: str) -> float:
    runs = []
    for _ in range(5):
        probe = f"import time\nstart = time.perf_counter()\n{code}\nprint(time.perf_counter() - start)"
        output = subprocess.run(
            [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        runs.append(float(output.strip().splitlines()[-1]))
    return min(runs)


def round_trip(client: httpx.Client) -> float:
    """Seconds from submitting a job to reading its `succeeded` event."""
    start = time.perf_counter()
    job = client.post("/v1/jobs/ping").raise_for_status().json()["job"]
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as events:
        for line in events.iter_lines():
            if line.startswith("data:"):
                status = json.loads(line.removeprefix("data:"))["status"]
                if status == "succeeded":
                    return time.perf_counter() - start
                if status in ("failed", "cancelled"):
                    raise RuntimeError(f"job {job['id']} {status}")
    raise RuntimeError(f"event stream of {job['id']} ended early")


def run_clients(base: str, jobs_per_client: int, pace_s: float | None) -> tuple[list[float], float]:
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client_loop(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=base, timeout=60) as client:
            if pace_s:
                time.sleep(rng.uniform(0, pace_s))
            for _ in range(jobs_per_client):
                started = time.perf_counter()
                try:
                    latency = round_trip(client)
                except Exception as exc:  # counted, reported below
                    with lock:
                        errors.append(exc)
                    continue
                with lock:
                    latencies.append(latency)
                if pace_s:
                    time.sleep(max(0.0, pace_s - (time.perf_counter() - started)))

    threads = [threading.Thread(target=client_loop, args=(seed,)) for seed in range(CLIENTS)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} jobs failed, first: {errors[0]!r}")
    return latencies, elapsed


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    gateway_import = import_seconds("from app.main import create_app\ncreate_app()")
    bare_import = import_seconds(
        "from fastapi import FastAPI\napp = FastAPI()\n@app.get('/')\ndef hello():\n    return {'hello': 'world'}"
    )

    with tempfile.TemporaryDirectory(prefix="confprobe-bench-") as folder:
        port = free_port()
        env = {
            name: value
            for name, value in os.environ.items()
            if name not in {"DATABASE_URL", "REDIS_URL", "QUEUE_PREFIX"}
        }
        env |= {"VAR_DIR": str(Path(folder) / "var"), "PORT": str(port), "LOG_LEVEL": "warning"}
        serve = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve"],
            env=env,
            cwd=ROOT,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{base}/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or serve.poll() is not None:
                    raise RuntimeError("the service did not become ready")
                time.sleep(0.2)
            run_clients(base, 3, None)  # warm-up: connections, first queries
            latencies, _ = run_clients(base, JOBS_PER_CLIENT, PACE_S)
            throughput_latencies, elapsed = run_clients(base, THROUGHPUT_JOBS_PER_CLIENT, None)
        finally:
            os.killpg(serve.pid, signal.SIGINT)
            serve.wait(60)

    figures = {
        "clients": CLIENTS,
        "jobs": len(latencies),
        "pace_s_per_client": PACE_S,
        "round_trip_p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "round_trip_p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "jobs_per_s": round(len(throughput_latencies) / elapsed, 1),
        "saturated_round_trip_p50_ms": round(percentile(throughput_latencies, 50) * 1000, 2),
        "gateway_import_s": round(gateway_import, 4),
        "bare_fastapi_import_s": round(bare_import, 4),
        "gateway_import_ratio": round(gateway_import / bare_import, 2),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
