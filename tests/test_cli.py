"""`confprobe serve`: the whole embedded service from one command, stopped by Ctrl-C."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import ROOT, free_port, wait_until

CONFPROBE = shutil.which("confprobe") or str(Path(sys.executable).parent / "confprobe")


def embedded_environment(var_dir: Path, port: int) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in {"DATABASE_URL", "REDIS_URL", "ARTIFACT_DIR", "QUEUE_PREFIX"}}
    return env | {"VAR_DIR": str(var_dir), "PORT": str(port), "HEARTBEAT_INTERVAL_S": "0.5"}


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_serve_runs_redis_gateway_and_worker_and_ctrl_c_stops_them_all(tmp_path: Path, tiny_llama: Path) -> None:
    var_dir, port = tmp_path / "var", free_port()
    serve = subprocess.Popen([CONFPROBE, "serve"], env=embedded_environment(var_dir, port), cwd=tmp_path, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(f"{base}/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 120, "the embedded service to be ready", interval=0.25)
        model = httpx.post(f"{base}/v1/models", json={"name": "tiny", "source": str(tiny_llama)}).json()
        wait_until(lambda: httpx.get(f"{base}/v1/models/{model['id']}").json()["status"] == "ready", 60, "the model check")
        assert (var_dir / "registry.db").exists()

        embedded_redis = redis.Redis(unix_socket_path=str(var_dir / "redis.sock"))
        worker_pid = next(json.loads(embedded_redis.get(key))["pid"] for key in embedded_redis.scan_iter("confprobe:worker:*"))
        assert is_alive(worker_pid)

        # Ctrl-C while the worker runs a job: the job finishes, then Redis stops (not before)
        texts = [f"statement number {index} about the city of {index * 7}" for index in range(2000)]
        job_id = httpx.post(f"{base}/v1/extractions", json={"model": model["id"], "layers": [1], "texts": texts}, timeout=30).json()["job"]["id"]
        wait_until(lambda: httpx.get(f"{base}/v1/jobs/{job_id}").json()["status"] != "queued", 60, "the extraction to start")
        os.killpg(serve.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: only this process group
        output = serve.communicate(timeout=120)[0].decode()
        assert serve.returncode == 0, output
        wait_until(lambda: not is_alive(worker_pid), 30, "the worker to exit")
        with sqlite3.connect(var_dir / "registry.db") as registry:
            assert registry.execute("select status from jobs where id = ?", (job_id,)).fetchone() == ("succeeded",), output
        assert "Traceback" not in output, output
        with pytest.raises(redis.exceptions.ConnectionError):
            redis.Redis(unix_socket_path=str(var_dir / "redis.sock"), socket_connect_timeout=1).ping()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/healthz")
    finally:
        if serve.poll() is None:  # the children have process groups of their own: let it stop them
            os.killpg(serve.pid, signal.SIGTERM)
            try:
                serve.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)


def test_migrate_creates_the_embedded_registry(tmp_path: Path) -> None:
    result = subprocess.run([CONFPROBE, "migrate"], env=embedded_environment(tmp_path / "var", free_port()), cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "var" / "registry.db").stat().st_size > 0
