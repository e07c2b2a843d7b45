"""Adapter import cost against a plain copy of the same bytes, and its memory.

Builds a rank-16 LoRA checkpoint in Tinker's layout with the tensor shapes of
Llama-3.1-8B — every attention and MLP projection of all 32 layers, float32 — in a child
process (so building it does not count towards this process's memory), then imports it
through the worker's own job function (`workers.adapters.importer.run`: validation against
the base's shapes, conversion, sha256, registration in a real SQLite registry) from a local
folder. The base is Llama-3.1-8B's config alone: its shapes come from the meta device.

`import_vs_copy` = import time ÷ time of `shutil.copyfile` of the adapter file, in the same
run; `peak_rss_over_adapter` = growth of this process's peak RSS during the import ÷ the
adapter's size.

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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.job_kinds import AdapterImportParameters  # noqa: E402
from app.registry.database import create_registry_engine, migrate, session_factory  # noqa: E402
from app.registry.tables import Job, Model  # noqa: E402
from app.settings import Settings  # noqa: E402
from workers import runtime  # noqa: E402
from workers.adapters import convert, importer  # noqa: E402
from workers.context import JobContext  # noqa: E402

RANK = 16
LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}

BUILD_ADAPTER = """
import json, sys
import torch
from safetensors.torch import save_file
folder, rank = sys.argv[1], int(sys.argv[2])
hidden, inter, kv = 4096, 14336, 1024
shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
          "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
          "mlp.down_proj": (hidden, inter)}
tensors = {}
for layer in range(32):
    for module, (out_features, in_features) in shapes.items():
        name = f"base_model.model.model.layers.{layer}.{module}"
        tensors[name + ".lora_A.weight"] = torch.randn(rank, in_features) * 0.01
        tensors[name + ".lora_B.weight"] = torch.randn(out_features, rank) * 0.01
save_file(tensors, folder + "/adapter_model.safetensors")
json.dump({"r": rank, "lora_alpha": 32}, open(folder + "/adapter_config.json", "w"))
"""


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="confprobe-bench-") as folder_name:
        folder = Path(folder_name)
        adapter, base = folder / "sources" / "llama-3.1-8b-r16", folder / "llama-3.1-8b"
        adapter.mkdir(parents=True)
        base.mkdir()
        (base / "config.json").write_text(json.dumps(LLAMA_3_1_8B))
        subprocess.run([sys.executable, "-c", BUILD_ADAPTER, str(adapter), str(RANK)], check=True)
        adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size

        settings = Settings(
            var_dir=folder / "var", redis_url="redis://127.0.0.1:1/0", adapter_roots=[folder / "sources"]
        )
        migrate(settings.resolved_database_url)
        worker = runtime.build_runtime(settings)
        sessions = session_factory(create_registry_engine(settings.resolved_database_url))
        with sessions.begin() as session:
            session.add(
                Model(
                    id="mdl_8b",
                    name="meta-llama/Llama-3.1-8B",
                    source=str(base),
                    source_kind="local",
                    resolved_path=str(base),
                    fingerprint="8b",
                    dtype="bfloat16",
                    architecture="LlamaForCausalLM",
                    model_type="llama",
                    num_layers=32,
                    hidden_size=4096,
                )
            )
            session.add(Job(id="job_import", kind="adapter_import", params={}, queue="bench", status="running"))
        convert.base_modules(str(base))  # imports torch and transformers before the measurement

        copy_start = time.perf_counter()
        shutil.copyfile(adapter / "adapter_model.safetensors", folder / "copy.safetensors")
        copy_s = time.perf_counter() - copy_start

        rss_before = peak_rss_bytes()
        params = AdapterImportParameters(
            source_kind="local_folder", source=str(adapter), base_model_id="mdl_8b", name="bench"
        )
        start = time.perf_counter()
        result = importer.run(NoRedisContext(job_id="job_import", params=params, runtime=worker))
        import_s = time.perf_counter() - start
        rss_growth = peak_rss_bytes() - rss_before
        assert result["created"], result

    figures = {
        "adapter_dtype": "float32",
        "rank": RANK,
        "adapter_mb": round(adapter_bytes / 2**20, 1),
        "import_s": round(import_s, 3),
        "copy_s": round(copy_s, 3),
        "import_vs_copy": round(import_s / copy_s, 2),
        "peak_rss_growth_mb": round(rss_growth / 2**20, 1),
        "peak_rss_over_adapter": round(rss_growth / adapter_bytes, 3),
    }
    print(json.dumps(figures))


class NoRedisContext(JobContext):
    """Progress goes to the registry row only: this benchmark runs no Redis."""

    def progress(self, stage: str, done: int, total: int | None = None, details: dict | None = None) -> None:
        pass


if __name__ == "__main__":
    main()
