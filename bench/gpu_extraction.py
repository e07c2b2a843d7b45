"""Extraction throughput on one CUDA GPU, through the worker's compute path.

Model: a randomly initialised Llama with Llama-3.1-8B's shape (hidden 4096, 32 layers, 32
heads and 8 key/value heads, intermediate 14,336, vocabulary 128,256), built directly on the
GPU in bfloat16 with SDPA attention (nothing downloads, nothing is written to disk). Texts:
4,096 of random token ids (seeded), their lengths drawn from a log-normal distribution like
that of short documents and prompts (median about 90 tokens, capped at 1,024). Request: layers
[8, 16, 24, 31], last token, through `workers.state_cache.compute` (the planner, the
shortcuts, pinned copies overlapped with the GPU's work), after one untimed warm-up batch.

Figures: `tokens_per_s` (real tokens), `texts_per_s`, `gpu_mfu` (the FLOPs of the blocks
actually computed, real tokens only, counted as bench/extraction.py counts them, per second,
over the peak bf16 FLOP/s measured in the same run with a large bf16 matmul),
`measured_peak_tflops`, and `nominal_peak_tflops` / `gpu_mfu_vs_nominal` when the device's
name is known. Last line: one JSON object. Without CUDA it says so and exits with status 2.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers import hidden_states, state_cache  # noqa: E402
from workers.model_loading import LoadedModel  # noqa: E402

TEXT_COUNT = 4096
LAYERS = [8, 16, 24, 31]
TOKEN_BUDGET = 65_536
MAX_BATCH_SIZE = 256
# dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a part of the device's name
NOMINAL_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}


def lengths(count: int, seed: int = 0) -> list[int]:
    """Log-normal lengths (median ~90 tokens), between 8 and 1,024."""
    drawn = np.random.default_rng(seed).lognormal(mean=np.log(90), sigma=0.8, size=count)
    return [int(n) for n in np.clip(drawn, 8, 1024)]


def build_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def measured_peak_tflops() -> float:
    """The best of a few 8192³ bf16 matmuls, TFLOP/s."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12)
    return best


def block_flops(token_ids: list[list[int]]) -> float:
    """FLOPs of the blocks the worker runs for these texts (real tokens; shared prefixes once;
    the deepest block's query, output projection and MLP at the last token)."""
    hidden, kv, intermediate, deepest = 4096, 1024, 14336, max(LAYERS)
    qo, kv_weights, mlp = 2 * hidden * hidden, 2 * hidden * kv, 3 * hidden * intermediate
    shortcuts = hidden_states.DEFAULT_SHORTCUTS
    total = 0.0
    lengths = [len(ids) for ids in token_ids]
    # batches as the worker plans them for a Llama model: its texts share rows
    for indices in hidden_states.plan_batches(lengths, TOKEN_BUDGET, MAX_BATCH_SIZE, packed=True):
        texts = [token_ids[index] for index in indices]
        prefix = hidden_states.shared_prefix_length(texts)
        if prefix < shortcuts.min_prefix or prefix * (len(texts) - 1) < shortcuts.min_prefix_saving:
            prefix = 0
        tokens = prefix + sum(len(ids) - prefix for ids in texts)
        attention = 4 * hidden * (sum(n * (n + 1) / 2 - prefix * (prefix + 1) / 2 for n in map(len, texts)))
        attention += 4 * hidden * prefix * (prefix + 1) / 2
        total += (deepest - 1) * (2 * (qo + kv_weights + mlp) * tokens + attention)
        if max(len(ids) - prefix for ids in texts) >= shortcuts.min_trim_width:
            total += 2 * kv_weights * tokens + sum(2 * (qo + mlp) + 4 * hidden * len(ids) for ids in texts)
        else:
            total += 2 * (qo + kv_weights + mlp) * tokens + attention
    return total


def main() -> None:
    if not torch.cuda.is_available():
        print("bench/gpu_extraction.py: no CUDA device here; this benchmark needs one GPU", file=sys.stderr)
        raise SystemExit(2)
    name = torch.cuda.get_device_name(0)
    model = build_model()
    generator = np.random.default_rng(1)
    token_ids = [generator.integers(1000, 128000, size=n).tolist() for n in lengths(TEXT_COUNT)]
    loaded = LoadedModel("mdl_gpu_bench", model, _Tokenizer(), 0, 0, True)

    def run(texts: list[list[int]]) -> np.ndarray:
        return state_cache.compute(
            loaded, texts, LAYERS, "last", device="cuda", token_budget=TOKEN_BUDGET, max_batch_size=MAX_BATCH_SIZE
        )

    run(token_ids[:64])  # warm-up, untimed
    torch.cuda.synchronize()
    start = time.perf_counter()
    states = run(token_ids)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert states.shape == (TEXT_COUNT, len(LAYERS), 4096) and np.isfinite(states).all()
    peak = measured_peak_tflops()
    achieved = block_flops(token_ids) / seconds / 1e12
    real_tokens = sum(len(ids) for ids in token_ids)
    figures = {
        "device": name,
        "texts": TEXT_COUNT,
        "layers": LAYERS,
        "real_tokens": real_tokens,
        "seconds": round(seconds, 2),
        "texts_per_s": round(TEXT_COUNT / seconds, 1),
        "tokens_per_s": round(real_tokens / seconds),
        "achieved_tflops": round(achieved, 1),
        "measured_peak_tflops": round(peak, 1),
        "gpu_mfu": round(achieved / peak, 3),
    }
    nominal = next((value for key, value in NOMINAL_BF16_TFLOPS.items() if key in name), None)
    if nominal is not None:
        figures |= {"nominal_peak_tflops": nominal, "gpu_mfu_vs_nominal": round(achieved / nominal, 3)}
    print(f"{real_tokens / seconds:,.0f} tokens/s, MFU {achieved / peak:.1%} of the measured peak", file=sys.stderr)
    print(json.dumps(figures))


class _Tokenizer:
    """What `compute` asks of a tokenizer: its pad id (the texts come as token ids)."""

    pad_token_id = 0


if __name__ == "__main__":
    main()
