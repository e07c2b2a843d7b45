"""How one extraction scales with workers: the same 4,000-text extraction of a dataset, through
the HTTP API, on one worker and then on two.

(a) Each run starts a fresh stack as real processes — a Redis, a SQLite registry and an
    artifact store in a new folder (so the content cache starts empty), one gateway, and one
    or two worker processes, each limited to one CPU thread (`OMP_NUM_THREADS=1`, which
    torch reads for its thread pool) so that workers, not threads, are what is counted.
    EXTRACTION_PART_TEXTS (default 500) splits the extraction into parts in both runs: one
    worker runs every part itself, two share them (`workers/fanout.py`). The model is a small
    random Llama (4 layers, hidden 256), float32, layers [2, 4], last token; the texts are the
    first 4,000 distinct statements of the shared geometry-of-truth files.

The time is from the extraction's job being created to its end, as its record says (after the model
check and a warm-up extraction of 2 × EXTRACTION_PART_TEXTS + 1 other texts, split into three
parts that both workers take part in, so each has imported the model's code and loaded it,
as the long-lived workers of a deployment have: the first load in a process imports
transformers' modules for the architecture, which takes seconds on a shared machine). The
two runs' arrays are compared byte for byte (`identical`; the `.npy` download, as the
safetensors file's header names the model, whose id differs between the two registries). `two_worker_speedup` =
one_worker_s / two_workers_s; the machine's load average is printed with it, as other
processes on a shared machine take CPU from the workers. Each worker's CPU time during the
timed extraction is measured too (from /proc): `speedup_on_free_cores` = the one worker's
CPU time over the busier of the two workers' — the speedup two workers would reach with a
core each to themselves, however busy the machine was.

Run by `bench/scale.py` (its `--case workers`), which prints the figures.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.broker import heartbeat_key, redis_server_executable  # noqa: E402
from app.settings import Settings  # noqa: E402
from bench.load import _pings, wait_for  # noqa: E402
from tests.servers import answers, free_port  # noqa: E402
from tests.tiny_models import save_tiny_llama  # noqa: E402

LAYERS = [2, 4]
QUEUE_PREFIX = "scale"
STATEMENTS = ROOT.parent / "shared" / "data" / "geometry_of_truth"


def statements(count: int) -> list[str]:
    texts: dict[str, None] = {}
    for path in sorted(STATEMENTS.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                texts.setdefault(json.loads(line)["text"], None)
    if len(texts) < count:
        raise SystemExit(f"only {len(texts)} distinct statements in {STATEMENTS}, {count} asked")
    return list(texts)[:count]


def cpu_seconds(process: subprocess.Popen[bytes]) -> float:
    """CPU time (user and system) the process has used so far, from /proc."""
    fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    seconds: float  # from submitting the extraction to its success
    result: bytes  # the `.npy` download
    parts: int
    worker_cpu_s: list[float]  # CPU time each worker used meanwhile


def run(folder: Path, model_folder: Path, dataset: Path, warm_up: Path, workers: int, part_texts: int) -> Run:
    redis_port, port = free_port(), free_port()
    env = os.environ | {
        "DATABASE_URL": f"sqlite:///{folder / 'registry.db'}",
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "VAR_DIR": str(folder / "var"),
        "LOG_LEVEL": "warning",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "EXTRACTION_PART_TEXTS": str(part_texts),
        "HEARTBEAT_INTERVAL_S": "1",
        "QUEUE_PREFIX": QUEUE_PREFIX,
    }
    processes: list[subprocess.Popen[bytes]] = []
    worker_processes: list[subprocess.Popen[bytes]] = []

    def spawn(args: list[str], log: str, **more: str) -> subprocess.Popen[bytes]:
        with open(folder / log, "ab") as output:
            process = subprocess.Popen(args, env=env | more, cwd=ROOT, stdout=output, stderr=output)
        processes.append(process)
        return process

    try:
        spawn([redis_server_executable(), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""], "redis.log")
        wait_for(lambda: _pings(redis.Redis(port=redis_port)), 10, "redis")
        base = f"http://127.0.0.1:{port}"
        spawn([sys.executable, "-m", "app.cli", "gateway", "--port", str(port)], "gateway.log")
        wait_for(lambda: answers(base), 120, "the gateway")
        connection = redis.Redis(port=redis_port)
        for number in range(workers):
            name = f"worker-{number}"
            worker_processes.append(spawn([sys.executable, "-m", "workers.main"], f"{name}.log", WORKER_NAME=name))
            wait_for(lambda: connection.exists(heartbeat_key(Settings(queue_prefix=QUEUE_PREFIX), name)), 120, name)  # noqa: B023
        with httpx.Client(base_url=base, timeout=120) as client:
            model = client.post("/v1/models", json={"name": "bench", "source": str(model_folder)}).json()
            finished(client, model["check_job_id"], 300)
            # every worker imports the model's code and loads it once before the clock starts,
            # as the long-lived workers of a deployment have (the first load in a process
            # imports transformers' model modules: seconds, on a shared machine)
            with warm_up.open("rb") as handle:
                warming = client.post("/v1/datasets", files={"file": ("warm-up.jsonl", handle)}).json()
            warming_up = client.post(
                "/v1/extractions", json={"model": model["id"], "layers": LAYERS, "dataset": warming["id"]}
            ).json()
            warmed = finished(client, warming_up["job"]["id"], 600)
            took_part = {part["worker"] for part in client.get(f"/v1/jobs/{warmed['id']}").json()["parts"] or []}
            print(f"{workers} worker(s): the warm-up's parts ran on {sorted(took_part)}", file=sys.stderr)
            with dataset.open("rb") as handle:
                uploaded = client.post("/v1/datasets", files={"file": ("statements.jsonl", handle)}).json()
            cpu_before = [cpu_seconds(process) for process in worker_processes]
            created = client.post(
                "/v1/extractions", json={"model": model["id"], "layers": LAYERS, "dataset": uploaded["id"]}
            ).json()
            # timed by the job's own record, from its creation to its end: the bench asks
            # for it a few times a second only, so as not to take CPU from the workers
            job = finished(client, created["job"]["id"], 3600, pause=0.25)
            seconds = (parse_time(job["finished_at"]) - parse_time(job["created_at"])).total_seconds()
            cpu = [cpu_seconds(process) - before for process, before in zip(worker_processes, cpu_before, strict=True)]
            result = client.get(
                f"/v1/extractions/{created['extraction']['id']}/hidden-states", params={"format": "npy"}
            ).content
            shown = client.get(f"/v1/jobs/{job['id']}").json()
            for part in shown["parts"] or []:
                row = client.get(f"/v1/jobs/{part['id']}").json()
                print(
                    f"{workers} worker(s): part {part['id']} on {part['worker']}, {row['started_at']} → {row['finished_at']}",
                    file=sys.stderr,
                )
            return Run(seconds, result, int(job["result"].get("parts", 0)), cpu)
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def finished(client: httpx.Client, job_id: str, timeout: float, pause: float = 0.05) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    job = wait_for(final, timeout, f"job {job_id}", pause=pause)
    if job["status"] != "succeeded":
        raise SystemExit(f"job {job_id} {job['status']}: {job['error']}")
    return dict(job)


def workers_case(text_count: int = 4000, part_texts: int = 500) -> dict[str, Any]:
    """One worker against two on the same split extraction; the figures (keys of bench/scale.py)."""
    texts = statements(text_count + 2 * part_texts + 1)
    texts, warm_up_texts = texts[:text_count], texts[text_count:]
    with tempfile.TemporaryDirectory(prefix="confprobe-scale-") as folder_name:
        folder = Path(folder_name)
        model_folder = save_tiny_llama(
            folder / "llama-4x256", hidden_size=256, layers=4, heads=4, kv_heads=4, vocab_size=512
        )
        dataset = folder / "statements.jsonl"
        dataset.write_text("\n".join(json.dumps({"text": text, "label": i % 2}) for i, text in enumerate(texts)))
        warm_up = folder / "warm-up.jsonl"
        warm_up.write_text(
            "\n".join(json.dumps({"text": text, "label": i % 2}) for i, text in enumerate(warm_up_texts))
        )
        load_before = os.getloadavg()
        runs: dict[int, Run] = {}
        for workers in (1, 2):
            run_folder = folder / f"{workers}-workers"
            run_folder.mkdir()
            runs[workers] = run(run_folder, model_folder, dataset, warm_up, workers, part_texts)
        load_after = os.getloadavg()
    one, two = runs[1], runs[2]
    return {
        "workers_texts": len(texts),
        "parts": two.parts,
        "part_texts": part_texts,
        "one_worker_s": round(one.seconds, 3),
        "two_workers_s": round(two.seconds, 3),
        "two_worker_speedup": round(one.seconds / two.seconds, 3),
        "identical": one.result == two.result,
        "one_worker_cpu_s": [round(value, 2) for value in one.worker_cpu_s],
        "two_workers_cpu_s": [round(value, 2) for value in two.worker_cpu_s],
        # the speedup were each worker given a core of its own: the one worker's CPU time over
        # the busier of the two's
        "speedup_on_free_cores": round(sum(one.worker_cpu_s) / max(two.worker_cpu_s), 3),
        "cpus": os.cpu_count(),
        "load_average_1m_before": round(load_before[0], 2),
        "load_average_1m_after": round(load_after[0], 2),
    }
