"""Extraction throughput: the naive way against the worker's code path, in one process.

Texts: the city statements of the shared data, repeated to 2,000. Model: a randomly
initialised Llama of realistic proportions (8 layers, hidden 512, 8 heads, vocabulary 32,000),
float32 on the CPU. Request: layers [2, 4], last token.

(a) naive — what the seed framework did: batches of 32 in the given order, padded to the
    longest, a full forward pass with `output_hidden_states=True` (all 8 blocks, the final
    norm and the LM head), then the last real token picked out.
(b) service — `workers.extraction.run`, the job function a worker runs, against a real
    SQLite registry, a real Redis and an artifact folder: length-sorted token-budget
    batches, forward stopped after block 4, vectors written to the content cache and the
    result file. Then the same request again, served from the cache.

Last line: one JSON object.
"""

import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.broker import redis_server_executable  # noqa: E402
from app.job_kinds import ExtractionParameters  # noqa: E402
from app.registry.database import create_registry_engine, migrate, session_factory  # noqa: E402
from app.registry.tables import Extraction, Job, Model  # noqa: E402
from app.settings import Settings  # noqa: E402
from tests.tiny_models import save_tokenizer  # noqa: E402
from workers import extraction, runtime  # noqa: E402
from workers.context import JobContext  # noqa: E402

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TEXT_COUNT = 2000
LAYERS = [2, 4]
NAIVE_BATCH = 32
CITIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "geometry_of_truth" / "cities.jsonl"


def city_texts() -> list[str]:
    statements = [json.loads(line)["text"] for line in CITIES.read_text().splitlines() if line.strip()]
    return [statements[i % len(statements)] for i in range(TEXT_COUNT)]


def build_model(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    save_tokenizer(folder, vocab_size=1000)


def naive(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", texts: list[str]) -> torch.Tensor:
    rows = []
    with torch.inference_mode():
        for start in range(0, len(texts), NAIVE_BATCH):
            encoded = tokenizer(texts[start : start + NAIVE_BATCH], padding=True, return_tensors="pt")
            hidden_states = model(**encoded, output_hidden_states=True).hidden_states
            last = encoded["attention_mask"].sum(dim=1) - 1
            rows.append(torch.stack([hidden_states[layer][torch.arange(len(last)), last] for layer in LAYERS], dim=1))
    return torch.cat(rows)


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    texts = city_texts()
    with tempfile.TemporaryDirectory(prefix="confprobe-bench-") as folder_name:
        folder = Path(folder_name)
        model_folder = folder / "llama-8x512"
        build_model(model_folder)
        redis = subprocess.Popen(
            [redis_server_executable(), "--port", "0", "--unixsocket", str(folder / "redis.sock"), "--save", ""],
            stdout=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.3)
            settings = Settings(
                var_dir=folder / "var", redis_url=f"unix://{folder / 'redis.sock'}", worker_memory_budget_mb=4096
            )
            migrate(settings.resolved_database_url)
            worker = runtime.build_runtime(settings)
            sessions = session_factory(create_registry_engine(settings.resolved_database_url))
            with sessions.begin() as session:
                session.add(
                    Model(
                        id="mdl_bench",
                        name="bench",
                        source=str(model_folder),
                        source_kind="local",
                        resolved_path=str(model_folder),
                        fingerprint="bench",
                        dtype="float32",
                        architecture="LlamaForCausalLM",
                        model_type="llama",
                        num_layers=8,
                        hidden_size=512,
                    )
                )
            with sessions() as session:
                model_row = session.get_one(Model, "mdl_bench")
            worker.models.get(model_row)  # loaded once, outside the timings, as a resident model is

            def service_run(name: str) -> tuple[float, dict]:
                with sessions.begin() as session:
                    session.add(
                        Job(
                            id=f"job_{name}",
                            kind="extraction",
                            params={},
                            queue="bench",
                            status="running",
                            worker=worker.name,
                            attempts=1,
                        )
                    )
                    session.add(
                        Extraction(
                            id=f"ext_{name}",
                            job_id=f"job_{name}",
                            model_id="mdl_bench",
                            text_count=len(texts),
                            layers=LAYERS,
                            token_position="last",
                            model_fingerprint="bench",
                        )
                    )
                start = time.perf_counter()
                result = extraction.run(
                    JobContext(
                        job_id=f"job_{name}",
                        params=ExtractionParameters(extraction_id=f"ext_{name}", texts=texts),
                        runtime=worker,
                    )
                )
                return time.perf_counter() - start, result

            from transformers import AutoModelForCausalLM, AutoTokenizer

            naive_model = AutoModelForCausalLM.from_pretrained(model_folder).eval()
            naive_tokenizer = AutoTokenizer.from_pretrained(model_folder)
            naive_start = time.perf_counter()
            naive_states = naive(naive_model, naive_tokenizer, texts)
            naive_s = time.perf_counter() - naive_start
            service_s, computed = service_run("computed")
            cached_s, cached = service_run("cached")
            assert cached["batches_run"] == 0 and cached["cache_hits"] == len(texts)

            from safetensors.numpy import load_file

            service_states = load_file(
                str(worker.artifacts.local_path("extractions/ext_computed/hidden_states.safetensors"))
            )["hidden_states"]
            max_difference = float((torch.from_numpy(service_states) - naive_states).abs().max())
        finally:
            redis.terminate()
            redis.wait()
            shutil.rmtree(folder / "var", ignore_errors=True)

    figures = {
        "texts": len(texts),
        "layers": LAYERS,
        "naive_texts_per_s": round(len(texts) / naive_s, 1),
        "texts_per_s": round(len(texts) / service_s, 1),
        "speedup_vs_naive": round(naive_s / service_s, 2),
        "cached_texts_per_s": round(len(texts) / cached_s, 1),
        "cache_hit_speedup": round(service_s / cached_s, 1),
        "max_abs_difference_vs_naive": max_difference,
        "batches_run": computed["batches_run"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
