"""Redis going away for longer than a blip: workers wait for it and carry on, and the job
they were running when it went still finishes, because the registry row is its truth."""

import signal
import time
from pathlib import Path

import pytest
import redis

from app import broker
from app.settings import Settings
from tests.api.test_models import register
from tests.conftest import (
    RedisServer,
    make_settings,
    start_worker,
    stop_process,
    wait_for_job,
    wait_until,
)
from workers.runtime import backoff

# a worker process against a private Redis: one registry backend is enough
only_sqlite = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

# longer than RQ's own worker loop survives a refused connection
OUTAGE_S = 12.0


def kill(server: RedisServer) -> None:
    """SIGKILL: Redis gets no chance to tell its clients, and comes back empty."""
    assert server.process is not None
    server.process.kill()
    server.process.wait(10)


def is_live(settings: Settings, name: str) -> bool:
    try:
        return any(
            worker["name"] == name
            for worker in broker.live_workers(broker.connect(settings, socket_timeout=2), settings)
        )
    except redis.exceptions.RedisError:
        return False


def test_pauses_between_tries_to_reach_redis_double_up_to_their_cap() -> None:
    pauses = backoff(cap_s=10.0)
    assert [next(pauses) for _ in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


@pytest.mark.slow
@only_sqlite
def test_a_worker_outlives_a_long_redis_outage_and_takes_jobs_again(
    database_url: str, own_redis: RedisServer, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = make_settings(database_url, own_redis.url, tmp_path / "var", heartbeat_ttl_s=2.0)
    name = f"patient-{settings.queue_prefix}"
    log_file = tmp_path / "worker.log"
    worker = start_worker(settings, name, log_file=log_file)
    try:
        kill(own_redis)
        time.sleep(OUTAGE_S)
        assert worker.poll() is None, log_file.read_text()[-3000:]
        own_redis.start()
        wait_until(lambda: is_live(settings, name), 30, "the worker to heartbeat again", interval=0.2)
        with TestClient(create_app(settings)) as api:
            assert api.get("/readyz").status_code == 200
            job_id = api.post("/v1/jobs/ping").json()["job"]["id"]
            assert wait_for_job(api, job_id, timeout=40)["status"] == "succeeded"
        assert worker.poll() is None
        outage_lines = [line for line in log_file.read_text().splitlines() if "Redis is unreachable" in line]
        assert len(outage_lines) == 1, outage_lines
    finally:
        stop_process(worker)


def error_lines(log_file: Path) -> list[str]:
    return [line for line in log_file.read_text().splitlines() if '"level": "ERROR"' in line or "Traceback" in line]


@pytest.mark.slow
@only_sqlite
# a few seconds of work ends while Redis is away, and RQ cannot record that; longer work
# ends after Redis came back empty, without RQ's record of the job
@pytest.mark.parametrize("texts", [120, 1200], ids=["ends-while-redis-is-away", "ends-after-redis-is-back"])
def test_a_job_running_when_redis_goes_away_succeeds_and_the_worker_goes_on(
    database_url: str, own_redis: RedisServer, tmp_path: Path, tiny_llama: Path, texts: int
) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = make_settings(
        database_url,
        own_redis.url,
        tmp_path / "var",
        extraction_max_batch_size=1,
        extraction_cache=False,
        heartbeat_ttl_s=2.0,
    )
    log_file = tmp_path / "worker.log"
    worker = start_worker(settings, f"steady-{settings.queue_prefix}", log_file=log_file)
    try:
        with TestClient(create_app(settings)) as api:
            model = register(api, tiny_llama).json()
            assert wait_for_job(api, model["check_job_id"])["status"] == "succeeded"
            statements = [f"statement number {i} about the city of Rome" for i in range(texts)]
            long_job = api.post(
                "/v1/extractions", json={"model": model["id"], "layers": [1], "texts": statements}
            ).json()["job"]["id"]
            wait_until(
                lambda: api.get(f"/v1/jobs/{long_job}").json()["progress"]["done"] > 0,
                60,
                "the long job to start",
                interval=0.05,
            )

            kill(own_redis)
            time.sleep(OUTAGE_S)
            assert worker.poll() is None, log_file.read_text()[-3000:]
            own_redis.start()

            job = wait_for_job(api, long_job, timeout=60)
            assert job["status"] == "succeeded", (job["error"], log_file.read_text()[-3000:])
            assert job["attempts"] == 1
            after = api.post("/v1/jobs/ping").json()["job"]["id"]
            assert wait_for_job(api, after, timeout=40)["status"] == "succeeded"
            assert worker.poll() is None
            assert error_lines(log_file) == []
    finally:
        stop_process(worker)


@pytest.mark.slow
@only_sqlite
def test_a_worker_told_to_stop_while_redis_is_away_finishes_its_job_first(
    database_url: str, own_redis: RedisServer, tmp_path: Path, tiny_llama: Path
) -> None:
    """SIGTERM is a warm shutdown: RQ notes the request in Redis from inside the job, and that
    note failing must not fail the job."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = make_settings(
        database_url,
        own_redis.url,
        tmp_path / "var",
        extraction_max_batch_size=1,
        extraction_cache=False,
        heartbeat_ttl_s=2.0,
    )
    log_file = tmp_path / "worker.log"
    worker = start_worker(settings, f"stopping-{settings.queue_prefix}", log_file=log_file)
    try:
        with TestClient(create_app(settings)) as api:
            model = register(api, tiny_llama).json()
            assert wait_for_job(api, model["check_job_id"])["status"] == "succeeded"
            texts = [f"statement number {i} about the city of Rome" for i in range(200)]
            job_id = api.post("/v1/extractions", json={"model": model["id"], "layers": [1], "texts": texts}).json()[
                "job"
            ]["id"]
            wait_until(
                lambda: api.get(f"/v1/jobs/{job_id}").json()["progress"]["done"] > 0,
                60,
                "the job to start",
                interval=0.05,
            )

            kill(own_redis)
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(60) == 0, log_file.read_text()[-3000:]
            job = api.get(f"/v1/jobs/{job_id}").json()
            assert job["status"] == "succeeded", job["error"]
    finally:
        stop_process(worker)


@pytest.mark.slow
@only_sqlite
def test_a_job_that_runs_past_its_time_limit_fails_with_timeout(
    database_url: str, redis_server: RedisServer, tmp_path: Path, tiny_llama: Path
) -> None:
    """The limit is RQ's alarm in the worker's main thread, set on every job when it is queued."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = make_settings(
        database_url, redis_server.url, tmp_path / "var", extraction_max_batch_size=1, extraction_cache=False
    )
    worker = start_worker(settings, f"limited-{settings.queue_prefix}")
    try:
        with TestClient(create_app(settings)) as api:
            model = register(api, tiny_llama).json()
            assert wait_for_job(api, model["check_job_id"])["status"] == "succeeded"
        with TestClient(create_app(settings.model_copy(update={"job_timeout_s": 2}))) as api:
            texts = [f"statement number {i} about the city of Rome" for i in range(2000)]
            job_id = api.post("/v1/extractions", json={"model": model["id"], "layers": [1], "texts": texts}).json()[
                "job"
            ]["id"]
            job = wait_for_job(api, job_id, timeout=30)
            assert (job["status"], job["error"]["code"]) == ("failed", "timeout"), job["error"]
            assert job["error"]["details"] == {"limit_s": 2}
            after = api.post("/v1/jobs/ping").json()["job"]["id"]
            assert wait_for_job(api, after)["status"] == "succeeded"
    finally:
        stop_process(worker)


@pytest.mark.slow
@only_sqlite
def test_a_job_finishes_while_redis_hangs_without_answering(
    database_url: str, own_redis: RedisServer, tmp_path: Path, tiny_llama: Path
) -> None:
    """A stopped Redis still accepts connections and never answers, as one cut off by the
    network does: the job's events wait seconds for it, not minutes."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    # a thousand batches: long enough to be seen running, however fast the machine
    settings = make_settings(
        database_url,
        own_redis.url,
        tmp_path / "var",
        extraction_max_batch_size=2,
        extraction_cache=False,
        heartbeat_ttl_s=2.0,
    )
    log_file = tmp_path / "worker.log"
    worker = start_worker(settings, f"hung-{settings.queue_prefix}", log_file=log_file)
    assert own_redis.process is not None
    try:
        with TestClient(create_app(settings)) as api:
            model = register(api, tiny_llama).json()
            assert wait_for_job(api, model["check_job_id"])["status"] == "succeeded"
            texts = [f"statement number {i} about the city of Rome" for i in range(2000)]
            job_id = api.post("/v1/extractions", json={"model": model["id"], "layers": [1], "texts": texts}).json()[
                "job"
            ]["id"]
            wait_until(
                lambda: api.get(f"/v1/jobs/{job_id}").json()["progress"]["done"] > 0,
                60,
                "the job to start",
                interval=0.05,
            )

            own_redis.process.send_signal(signal.SIGSTOP)
            try:
                # a thousand events each waiting out a socket timeout would take hours; the
                # outage costs the job seconds (and the rest of its batches a busy machine's time)
                job = wait_for_job(api, job_id, timeout=120)
                assert job["status"] == "succeeded", job["error"]
            finally:
                own_redis.process.send_signal(signal.SIGCONT)
            after = api.post("/v1/jobs/ping").json()["job"]["id"]
            assert wait_for_job(api, after, timeout=40)["status"] == "succeeded"
    finally:
        stop_process(worker)
