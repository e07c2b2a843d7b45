"""`confprobe serve`: the whole embedded service from one command; a part that dies is started again, and Ctrl-C stops it all."""

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import ROOT, free_port, wait_until

CONFPROBE = shutil.which("confprobe") or str(Path(sys.executable).parent / "confprobe")


def embedded_environment(var_dir: Path, port: int) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in {"DATABASE_URL", "REDIS_URL", "ARTIFACT_DIR", "QUEUE_PREFIX"}
    }
    return env | {"VAR_DIR": str(var_dir), "PORT": str(port), "HEARTBEAT_INTERVAL_S": "0.5"}


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def heartbeat_pid(var_dir: Path) -> int:
    """The pid a worker's heartbeat in the embedded Redis names."""
    embedded_redis = redis.Redis(unix_socket_path=str(var_dir / "redis.sock"))
    heartbeat = embedded_redis.get(next(embedded_redis.scan_iter("confprobe:worker:*")))
    assert heartbeat is not None
    pid: int = json.loads(heartbeat)["pid"]
    return pid


@pytest.mark.slow
def test_serve_runs_redis_gateway_and_worker_and_ctrl_c_stops_them_all(tmp_path: Path, tiny_llama: Path) -> None:
    var_dir, port = tmp_path / "var", free_port()
    serve = subprocess.Popen(
        [CONFPROBE, "serve"],
        env=embedded_environment(var_dir, port),
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(f"{base}/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 120, "the embedded service to be ready", interval=0.25)
        model = httpx.post(f"{base}/v1/models", json={"name": "tiny", "source": str(tiny_llama)}).json()
        wait_until(
            lambda: httpx.get(f"{base}/v1/models/{model['id']}").json()["status"] == "ready", 60, "the model check"
        )
        assert (var_dir / "registry.db").exists()

        worker_pid = heartbeat_pid(var_dir)
        assert is_alive(worker_pid)

        # Ctrl-C while the worker runs a job: the job finishes, then Redis stops (not before)
        texts = [f"statement number {index} about the city of {index * 7}" for index in range(2000)]
        job_id = httpx.post(
            f"{base}/v1/extractions", json={"model": model["id"], "layers": [1], "texts": texts}, timeout=30
        ).json()["job"]["id"]
        wait_until(
            lambda: httpx.get(f"{base}/v1/jobs/{job_id}").json()["status"] != "queued", 60, "the extraction to start"
        )
        os.killpg(serve.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: only this process group
        output = serve.communicate(timeout=120)[0].decode()
        assert serve.returncode == 0, output
        wait_until(lambda: not is_alive(worker_pid), 30, "the worker to exit")
        with sqlite3.connect(var_dir / "registry.db") as registry:
            assert registry.execute("select status from jobs where id = ?", (job_id,)).fetchone() == ("succeeded",), (
                output
            )
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
    result = subprocess.run(
        [CONFPROBE, "migrate"],
        env=embedded_environment(tmp_path / "var", free_port()),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "var" / "registry.db").stat().st_size > 0


@contextmanager
def serving(var_dir: Path, port: int, **environment: str) -> Iterator[subprocess.Popen[bytes]]:
    """`confprobe serve` in a session of its own, ready when this yields; Ctrl-C'd at the end."""
    env = embedded_environment(var_dir, port) | environment
    serve = subprocess.Popen(
        [CONFPROBE, "serve"],
        env=env,
        cwd=var_dir.parent,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: ready(f"http://127.0.0.1:{port}"), 120, "the embedded service to be ready", interval=0.25)
        yield serve
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)
            try:
                serve.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)


def ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz").status_code == 200
    except httpx.TransportError:
        return False


def stop_and_read(serve: subprocess.Popen[bytes]) -> str:
    os.killpg(serve.pid, signal.SIGINT)
    output = serve.communicate(timeout=120)[0].decode()
    assert serve.returncode == 0, output
    return output


def start_long_extraction(base: str, tiny_llama: Path) -> str:
    """A registered model and an extraction of it that has started."""
    model = httpx.post(f"{base}/v1/models", json={"name": "tiny", "source": str(tiny_llama)}).json()
    wait_until(lambda: httpx.get(f"{base}/v1/models/{model['id']}").json()["status"] == "ready", 60, "the model check")
    texts = [f"statement number {index} about the city of {index * 7}" for index in range(2000)]
    job_id = httpx.post(
        f"{base}/v1/extractions", json={"model": model["id"], "layers": [1], "texts": texts}, timeout=30
    ).json()["job"]["id"]
    wait_until(
        lambda: httpx.get(f"{base}/v1/jobs/{job_id}").json()["status"] != "queued", 60, "the extraction to start"
    )
    return job_id


def final_job(base: str, job_id: str, timeout: float = 60) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        job = httpx.get(f"{base}/v1/jobs/{job_id}").json()
        return job if job["status"] in {"succeeded", "failed", "cancelled"} else None

    return wait_until(final, timeout, f"job {job_id} to finish", interval=0.2)


def redis_pid(var_dir: Path) -> int | None:
    try:
        return int(
            redis.Redis(unix_socket_path=str(var_dir / "redis.sock"), socket_timeout=1).info("server")["process_id"]
        )
    except redis.exceptions.RedisError:
        return None


@pytest.mark.slow
def test_serve_restarts_its_embedded_redis_killed_mid_job_and_the_job_succeeds(
    tmp_path: Path, tiny_llama: Path
) -> None:
    var_dir, port = tmp_path / "var", free_port()
    base = f"http://127.0.0.1:{port}"
    with serving(var_dir, port) as serve:
        job_id = start_long_extraction(base, tiny_llama)
        first = redis_pid(var_dir)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: redis_pid(var_dir) not in (None, first), 30, "a new embedded Redis", interval=0.2)
        job = final_job(base, job_id)
        assert (job["status"], job["attempts"]) == ("succeeded", 1), job["error"]
        after = httpx.post(f"{base}/v1/jobs/ping").json()["job"]["id"]
        assert final_job(base, after, timeout=40)["status"] == "succeeded"
        assert serve.poll() is None
        output = stop_and_read(serve)
    assert "restarted embedded Redis (exit code -9)" in output, output


@pytest.mark.slow
def test_serve_restarts_a_killed_worker_and_the_job_it_was_running_succeeds(tmp_path: Path, tiny_llama: Path) -> None:
    var_dir, port = tmp_path / "var", free_port()
    base = f"http://127.0.0.1:{port}"
    with serving(var_dir, port, HEARTBEAT_TTL_S="2") as serve:
        job_id = start_long_extraction(base, tiny_llama)
        worker_pid = heartbeat_pid(var_dir)
        os.kill(worker_pid, signal.SIGKILL)
        job = final_job(base, job_id, timeout=90)
        assert (job["status"], job["attempts"]) == ("succeeded", 2), job["error"]
        assert serve.poll() is None
        output = stop_and_read(serve)
    assert "restarted worker (exit code -9)" in output, output


@pytest.mark.slow
def test_serve_gives_up_on_a_part_that_keeps_exiting_and_names_it(tmp_path: Path) -> None:
    var_dir, port = tmp_path / "var", free_port()
    with socket.socket() as taken:  # the gateway cannot listen: uvicorn exits with code 3 each time
        taken.bind(("127.0.0.1", port))
        taken.listen()
        env = embedded_environment(var_dir, port) | {"SERVE_RESTART_LIMIT": "3"}
        result = subprocess.run(
            [CONFPROBE, "serve"],
            env=env,
            cwd=tmp_path,
            start_new_session=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert output.count("restarted gateway (exit code 3)") == 2, output
    assert "stopped because the gateway exited 3 times within 60 s (last exit code 3)" in output, output
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis(unix_socket_path=str(var_dir / "redis.sock"), socket_connect_timeout=1).ping()
