"""What the service costs on top of the work: the same extraction done directly and through
the HTTP API, in one run.

Texts: 1,000 city statements from the shared data. Model: a small random Llama (4 layers,
hidden 256), float32 on the CPU, layers [2, 4], last token. The content cache is off in
both paths, so both compute every vector.

(a) direct — the worker's own function (`workers.state_cache.cached_states`) called in this
    process, the model already loaded.
(b) service — `confprobe serve` (embedded Redis, SQLite, one worker that has already loaded
    the model; both paths first run the same 8-text warm-up) driven by the Python client: submit the job, wait for it over server-sent
    events, download the `.npy` array.

`overhead_ratio` = service_s / direct_s. Both arrays are compared, so the two paths are
known to do the same work. Last line: one JSON object.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.job_kinds import NoParameters  # noqa: E402
from app.registry.database import create_registry_engine, migrate, session_factory  # noqa: E402
from app.registry.tables import Job, Model  # noqa: E402
from app.settings import Settings  # noqa: E402
from confprobe_client import Client  # noqa: E402
from tests.tiny_models import save_tiny_llama  # noqa: E402
from workers import runtime  # noqa: E402
from workers.context import JobContext  # noqa: E402
from workers.state_cache import StatesRequest, cached_states  # noqa: E402

TEXT_COUNT = 1000
LAYERS = [2, 4]
CITIES = ROOT.parent / "shared" / "data" / "geometry_of_truth" / "cities.jsonl"


class QuietContext(JobContext):
    """The direct path has no job row to report progress to."""

    def progress(self, stage: str, done: int, total: int | None = None, details: dict | None = None) -> None:
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def direct(folder: Path, model_folder: Path, texts: list[str]) -> tuple[float, np.ndarray]:
    settings = Settings(var_dir=folder / "direct", redis_url="redis://127.0.0.1:1/0", extraction_cache=False)
    migrate(settings.resolved_database_url)
    worker = runtime.build_runtime(settings)
    model = Model(
        id="mdl_direct",
        name="bench",
        source=str(model_folder),
        source_kind="local",
        resolved_path=str(model_folder),
        fingerprint="bench",
        dtype="float32",
        architecture="LlamaForCausalLM",
        model_type="llama",
        num_layers=4,
        hidden_size=256,
    )
    with session_factory(create_registry_engine(settings.resolved_database_url)).begin() as session:
        session.add(Job(id="job_direct", kind="extraction", params={}, queue="bench", status="running"))
    worker.models.get(model)
    context = QuietContext(job_id="job_direct", params=NoParameters(), runtime=worker)
    cached_states(
        context, StatesRequest(model, None, LAYERS, "last", None), texts[:8], shard_name="warm-up"
    )  # as the worker's model check did
    start = time.perf_counter()
    states = cached_states(context, StatesRequest(model, None, LAYERS, "last", None), texts, shard_name="direct").states
    return time.perf_counter() - start, states


def through_service(folder: Path, model_folder: Path, texts: list[str]) -> tuple[float, np.ndarray]:
    port = free_port()
    env = {
        name: value for name, value in os.environ.items() if name not in {"DATABASE_URL", "REDIS_URL", "QUEUE_PREFIX"}
    }
    env |= {"VAR_DIR": str(folder / "service"), "PORT": str(port), "EXTRACTION_CACHE": "false", "LOG_LEVEL": "warning"}
    serve = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve"],
        env=env,
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = Client(f"http://127.0.0.1:{port}", timeout=120)
        deadline = time.monotonic() + 120
        while True:
            try:
                client.ready()
                break
            except Exception:
                if time.monotonic() > deadline or serve.poll() is not None:
                    raise RuntimeError("the service did not become ready") from None
                time.sleep(0.2)
        model = client.register_model(str(model_folder), name="bench")
        assert model.check_job_id is not None
        client.wait(model.check_job_id, progress=False)  # the worker now has the model loaded
        client.extract(model.id, LAYERS, texts=texts[:8], progress=False)  # the same warm-up as the direct path
        start = time.perf_counter()
        states = client.extract(model.id, LAYERS, texts=texts, progress=False)
        return time.perf_counter() - start, states
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        serve.wait(60)


def main() -> None:
    statements = [json.loads(line)["text"] for line in CITIES.read_text().splitlines() if line.strip()]
    texts = statements[:TEXT_COUNT]
    with tempfile.TemporaryDirectory(prefix="confprobe-bench-") as folder_name:
        folder = Path(folder_name)
        model_folder = save_tiny_llama(
            folder / "llama-4x256", hidden_size=256, layers=4, heads=4, kv_heads=4, vocab_size=512
        )
        direct_s, direct_states = direct(folder, model_folder, texts)
        service_s, service_states = through_service(folder, model_folder, texts)
    figures = {
        "texts": len(texts),
        "layers": LAYERS,
        "direct_s": round(direct_s, 3),
        "service_s": round(service_s, 3),
        "overhead_ratio": round(service_s / direct_s, 3),
        "max_abs_difference": float(np.abs(service_states - direct_states).max()),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
