"""Extraction at lab scale, through the real stack (Redis, registry, one gateway process,
worker processes), on tiny random Llamas so that the service's own costs — parsing, the
registry, the content cache, writing and serving arrays, spreading work — are what is
measured, not the model. Two cases (`--case workers|million|both`, default both):

(a) Workers (`bench/scale_workers.py`): the same 4,000-text extraction through the API on one
    worker and on two, each limited to one torch thread: `two_worker_speedup` (target ≥ 1.7),
    `identical` (the two arrays byte for byte), each worker's CPU time and the load average.

(b) Million texts, on a tiny Llama of hidden 16 and two blocks: datasets of 100,000 and then
    1,000,000 distinct short statements of one length ("Statement number 100123456 is
    true.", the two sets numbered apart) go through upload, extraction (layers [1, 2], last
    token) and a download of the `.npy` array, on one worker. Reported: `texts`, `upload_s`,
    `extract_s` (the extraction job's own run time, from the registry), `download_s`, the
    peak resident memory of the gateway and of the worker (`VmHWM` of each process tree, read
    from /proc: targets ≤ 1,500 MB each), the registry's size (`registry_mb`: PostgreSQL's
    `pg_database_size`, or the SQLite file), the content cache's index rows (`cache_rows`:
    target ≤ 1.1 × texts) and the extraction time of 1,000,000 texts over that of 100,000
    (`linearity`: target ≤ 11). Where the time went, for each size (`small_` the smaller):
    the parts' seconds summed (`parts_s`), the rest (`outside_parts_s`), of it the planning
    (`planning_s`) and the result read out of the cache (`assembling_s`), and the median
    seconds of the first and the last tenth of the parts (`part_s_first_tenth`,
    `part_s_last_tenth`). The downloaded array is checked: its shape,
    and a sample of its rows against the same texts extracted inline by a second, small
    request (equal to 1e-5).

    python bench/scale.py [--case both] [--texts 1000000] [--workers-texts 4000] [--part-texts 500] [--sqlite]

Without PostgreSQL (PATH's `initdb`) the registry is SQLite, said in the output. Last line:
one JSON object.
"""

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import Stack, wait_for  # noqa: E402
from bench.scale_workers import workers_case  # noqa: E402
from tests.servers import local_postgres, local_postgres_available  # noqa: E402
from tests.tiny_models import save_tiny_llama  # noqa: E402

LAYERS = [1, 2]
SMALL_TEXTS = 100_000
SAMPLE_ROWS = 200


def statement(index: int) -> str:
    return f"Statement number {index} is {'true' if index % 2 else 'false'}."


def statements_file(first: int, count: int) -> Iterator[bytes]:
    """JSONL of `count` distinct statements starting at number `first`, produced as it is sent."""
    chunk: list[bytes] = []
    for index in range(first, first + count):
        chunk.append(json.dumps({"text": statement(index), "label": index % 2}).encode() + b"\n")
        if len(chunk) == 10_000:
            yield b"".join(chunk)
            chunk = []
    if chunk:
        yield b"".join(chunk)


class GeneratedFile(io.RawIOBase):
    """A read-only file object over generated chunks, so httpx streams the upload."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self.pending:
            try:
                self.pending = next(self.chunks)
            except StopIteration:
                return 0
        size = min(len(buffer), len(self.pending))
        buffer[:size] = self.pending[:size]
        self.pending = self.pending[size:]
        return size


def peak_rss_mb(pid: int) -> float:
    """The peak resident set of a process and its children (`VmHWM`), in MB."""
    total = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(child) for child in children.read_text().split()]
    for each in pids:
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total / 1024


def finished_job(client: httpx.Client, job_id: str) -> tuple[float, dict[str, Any]]:
    """The job's own run time, from its record, and the record; asked for once a second, so
    the bench takes little CPU from the worker (a split job's record lists its parts)."""
    job = wait_for(
        lambda: (lambda j: j if j["status"] in ("succeeded", "failed", "cancelled") else None)(
            client.get(f"/v1/jobs/{job_id}").json()
        ),
        3600,
        f"job {job_id}",
        pause=1.0,
    )
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
    started = np.datetime64(job["started_at"].replace("Z", ""))
    finished = np.datetime64(job["finished_at"].replace("Z", ""))
    return float((finished - started) / np.timedelta64(1, "ms")) / 1000, job


def run_size(client: httpx.Client, model_id: str, first: int, count: int, folder: Path) -> dict[str, Any]:
    """Upload, extract and download `count` statements; checks the array's shape and a sample."""
    started = time.perf_counter()
    dataset = (
        client.post(
            "/v1/datasets",
            files={
                "file": (f"statements-{count}.jsonl", io.BufferedReader(GeneratedFile(statements_file(first, count))))
            },
        )
        .raise_for_status()
        .json()
    )
    upload_s = time.perf_counter() - started
    assert dataset["rows"] == count, dataset
    created = (
        client.post("/v1/extractions", json={"model": model_id, "dataset": dataset["id"], "layers": LAYERS})
        .raise_for_status()
        .json()
    )
    extract_s, job = finished_job(client, created["job"]["id"])
    seconds = job["result"].get("seconds", {})
    started = time.perf_counter()
    target = folder / f"states-{count}.npy"
    with client.stream("GET", f"/v1/extractions/{created['extraction']['id']}/hidden-states") as response:
        response.raise_for_status()
        with target.open("wb") as handle:
            for chunk in response.iter_bytes(2**20):
                handle.write(chunk)
    download_s = time.perf_counter() - started
    states = np.load(target, mmap_mode="r")
    assert states.shape[:2] == (count, len(LAYERS)), states.shape
    sample = sorted(random.Random(count).sample(range(count), SAMPLE_ROWS))
    inline = (
        client.post(
            "/v1/extractions",
            json={"model": model_id, "texts": [statement(first + i) for i in sample], "layers": LAYERS},
        )
        .raise_for_status()
        .json()
    )
    finished_job(client, inline["job"]["id"])
    expected = np.load(
        io.BytesIO(client.get(f"/v1/extractions/{inline['extraction']['id']}/hidden-states").raise_for_status().content)
    )
    difference = float(np.abs(np.asarray(states[sample]) - expected).max())
    assert difference <= 1e-5, f"the sampled rows differ from an inline extraction by {difference}"
    target.unlink()
    return {
        "upload_s": round(upload_s, 2),
        "extract_s": round(extract_s, 2),
        "download_s": round(download_s, 2),
        "job_id": created["job"]["id"],
        "planning_s": seconds.get("planning"),
        "assembling_s": seconds.get("assembling"),
    }


def parts_split(database_url: str, job_id: str) -> dict[str, float]:
    """Where a split extraction's time went, from the registry: the seconds its parts ran
    (summed), the rest (planning, assembling, waiting), and the median seconds of the first
    and of the last tenth of its parts, in the order they were queued (the same work each,
    but the last two halves: a part slower late than early is a cost that grows as it runs)."""
    engine = create_engine(database_url)
    with engine.connect() as connection:
        parent = connection.execute(
            text("SELECT started_at, finished_at FROM jobs WHERE id = :id"), {"id": job_id}
        ).one()
        parts = connection.execute(
            text("SELECT started_at, finished_at FROM jobs WHERE parent_id = :id ORDER BY created_at, id"),
            {"id": job_id},
        ).all()
    engine.dispose()

    def seconds(started: Any, finished: Any) -> float:
        if isinstance(started, str):  # SQLite hands datetimes back as text
            started, finished = np.datetime64(started), np.datetime64(finished)
            return float((finished - started) / np.timedelta64(1, "ms")) / 1000
        return (finished - started).total_seconds()

    durations = [seconds(*part) for part in parts if part[0] is not None and part[1] is not None]
    tenth = max(1, len(durations) // 10)
    whole = durations[:-2] if len(durations) > 2 else durations  # the two halves left out
    return {
        "parts_s": round(sum(durations), 2),
        "outside_parts_s": round(seconds(*parent) - sum(durations), 2),
        "part_s_first_tenth": round(float(np.median(whole[:tenth])), 3) if whole else 0.0,
        "part_s_last_tenth": round(float(np.median(whole[-tenth:])), 3) if whole else 0.0,
    }


def registry_numbers(database_url: str) -> tuple[float, int]:
    """The registry's size in MB and the number of rows in the content cache's index."""
    engine = create_engine(database_url)
    with engine.connect() as connection:
        rows = int(connection.execute(text("SELECT count(*) FROM cached_texts")).scalar_one())
        if engine.dialect.name == "sqlite":
            size = os.path.getsize(engine.url.database or "")
        else:
            size = int(connection.execute(text("SELECT pg_database_size(current_database())")).scalar_one())
    engine.dispose()
    return size / 2**20, rows


def million(folder: Path, database_url: str, texts: int) -> dict[str, Any]:
    model_folder = folder / "tiny-llama"
    save_tiny_llama(model_folder)
    stack = Stack(folder, database_url)
    try:
        stack.start(workers=("worker-a",), env={"MAX_DATASET_BYTES": str(128 * 2**20)})
        client = stack.client(timeout=600)
        model = client.post("/v1/models", json={"name": "tiny", "source": str(model_folder)}).raise_for_status().json()
        finished_job(client, model["check_job_id"])
        # numbered from 200,000,000 and from 100,000,000: statements of the same length in
        # tokens (nine digits each), and none of the small set in the large one
        small = run_size(client, model["id"], 2 * 10**8, min(SMALL_TEXTS, texts), folder)
        large = run_size(client, model["id"], 10**8, texts, folder)
        assert stack.gateway is not None
        gateway = peak_rss_mb(stack.gateway.pid)
        worker = peak_rss_mb(stack.workers["worker-a"].pid)
    finally:
        stack.stop()
    registry_mb, cache_rows = registry_numbers(database_url)
    small_split, large_split = parts_split(database_url, small["job_id"]), parts_split(database_url, large["job_id"])
    return {
        "texts": texts,
        "small_texts": min(SMALL_TEXTS, texts),
        "upload_s": large["upload_s"],
        "extract_s": large["extract_s"],
        "download_s": large["download_s"],
        "small_extract_s": small["extract_s"],
        "linearity": round(large["extract_s"] / small["extract_s"], 2),
        "gateway_peak_rss_mb": round(gateway, 1),
        "worker_peak_rss_mb": round(worker, 1),
        "registry_mb": round(registry_mb, 1),
        "cache_rows": cache_rows,
        "cache_rows_per_text": round(cache_rows / (texts + min(SMALL_TEXTS, texts) + 2 * SAMPLE_ROWS), 3),
        "planning_s": large["planning_s"],
        "assembling_s": large["assembling_s"],
        **large_split,
        "small_planning_s": small["planning_s"],
        "small_assembling_s": small["assembling_s"],
        **{f"small_{key}": value for key, value in small_split.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=["workers", "million", "both"], default="both")
    parser.add_argument("--texts", type=int, default=1_000_000, help="texts of the million case")
    parser.add_argument("--workers-texts", type=int, default=4000, help="texts of the workers case")
    parser.add_argument("--part-texts", type=int, default=500, help="EXTRACTION_PART_TEXTS in the workers case")
    parser.add_argument("--sqlite", action="store_true", help="a SQLite registry even where PostgreSQL is available")
    args = parser.parse_args()
    figures: dict[str, Any] = {}
    if args.case in ("workers", "both"):
        figures |= workers_case(args.workers_texts, args.part_texts)
    if args.case == "workers":
        print(json.dumps(figures))
        return
    with tempfile.TemporaryDirectory(prefix="confprobe-scale-") as name:
        folder = Path(name)
        if args.sqlite or not local_postgres_available():
            result = {"registry": "sqlite", **million(folder, f"sqlite:///{folder / 'registry.db'}", args.texts)}
        else:
            with local_postgres() as server:
                database_url = server.url(server.create_database())
                result = {"registry": "postgresql", **million(folder, database_url, args.texts)}
    print(json.dumps(figures | result))


if __name__ == "__main__":
    main()
