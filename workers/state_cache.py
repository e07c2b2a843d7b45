"""Hidden states of texts through the content cache, for every job that needs them
(`extraction`, `probe_training`, `probe_scoring`, `comparison`).

Vectors already in the cache are read from it; the rest are computed in batches of similar
length, and added to the cache. The cache key is the one docs/concepts.md#hidden-states names:
model source, revision and weights fingerprint, adapter, quantization, dtype, token position,
max_length and prompt format (together the cache *space*), then the sha256 of the text as the
prompt format rendered it, and the layer. A `raw` space is keyed as it was before prompt
formats existed, so entries cached then are still found.
"""

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from app.inputs.prompt_formats import RAW
from app.registry.cache_spaces import claim_space
from app.registry.tables import (
    Adapter,
    CachedHiddenState,
    Model,
)
from app.storage import ArtifactStore
from workers import arrays
from workers.errors import JobFailed
from workers.hidden_states import pad, plan_batches, read_layers
from workers.model_loading import LoadedModel
from workers.prompts import prompt_strings

if TYPE_CHECKING:
    from workers.context import JobContext

STATES_TENSOR = "hidden_states"
LOOKUP_CHUNK = 500


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_space(
    model: Model, adapter_fingerprint: str | None, token_position: str, max_length: int | None, prompt_format: str = RAW
) -> str:
    key: list[Any] = [
        model.source,
        model.revision,
        model.fingerprint,
        adapter_fingerprint,
        model.quantization,
        model.dtype,
        token_position,
        max_length,
    ]
    if prompt_format != RAW:
        key.append(prompt_format)
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


@dataclass(frozen=True)
class Tokenized:
    token_ids: list[list[int]]
    truncated: list[bool]


def model_token_limit(loaded: LoadedModel) -> int | None:
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int | None, prompt_format: str = RAW) -> Tokenized:
    """Token ids of the texts under a prompt format (`workers/prompts.py`); texts longer than
    `max_length` are truncated by the tokenizer itself (it knows which special tokens to keep),
    keeping their first tokens."""
    prompts = prompt_strings(tokenizer, prompt_format, texts)
    special = prompts.add_special_tokens
    token_ids = [
        list(ids) for ids in tokenizer(prompts.strings, add_special_tokens=special, truncation=False)["input_ids"]
    ]
    truncated = [max_length is not None and len(ids) > max_length for ids in token_ids]
    too_long = [index for index, flag in enumerate(truncated) if flag]
    if too_long:
        shortened = tokenizer(
            [prompts.strings[index] for index in too_long],
            add_special_tokens=special,
            truncation=True,
            max_length=max_length,
        )["input_ids"]
        for index, ids in zip(too_long, shortened, strict=True):
            token_ids[index] = list(ids)
    empty = [index for index, ids in enumerate(token_ids) if not ids]
    if empty:
        raise JobFailed("empty_text", f"text {empty[0]} has no tokens", text_index=empty[0])
    return Tokenized(token_ids=token_ids, truncated=truncated)


def _forward(
    loaded: LoadedModel, token_ids: list[list[int]], layers: Sequence[int], token_position: str, device: str
) -> torch.Tensor:
    """One batch; on an out-of-memory error the batch is split in two and retried."""
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    try:
        return read_layers(loaded.model, pad(token_ids, pad_id, "right", device), layers, token_position).cpu()
    except torch.OutOfMemoryError as exc:
        if len(token_ids) == 1:
            raise JobFailed(
                "out_of_memory",
                f"a single text of {len(token_ids[0])} tokens does not fit on {device}; lower max_length",
            ) from exc
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        half = len(token_ids) // 2
        return torch.cat(
            [
                _forward(loaded, token_ids[:half], layers, token_position, device),
                _forward(loaded, token_ids[half:], layers, token_position, device),
            ]
        )


def compute(
    loaded: LoadedModel,
    token_ids: list[list[int]],
    layers: Sequence[int],
    token_position: str,
    *,
    device: str,
    token_budget: int,
    max_batch_size: int,
    on_batch: Callable[[int], None] = lambda done: None,
) -> np.ndarray:
    """(texts, layers, hidden) float32 for every text, computed in length-sorted batches."""
    result: np.ndarray | None = None
    done = 0
    for indices in plan_batches([len(ids) for ids in token_ids], token_budget, max_batch_size):
        states = _forward(loaded, [token_ids[index] for index in indices], layers, token_position, device).numpy()
        if result is None:
            result = np.empty((len(token_ids), len(layers), states.shape[-1]), dtype=np.float32)
        result[indices] = states
        done += len(indices)
        on_batch(done)
    assert result is not None, "compute() needs at least one text"
    return result


class HiddenStateCache:
    """Per-text, per-layer vectors in safetensors shards, indexed in the registry."""

    def __init__(self, sessions: sessionmaker[Session], store: ArtifactStore, space: str) -> None:
        self.sessions = sessions
        self.store = store
        self.space = space

    def lookup(self, shas: Sequence[str], layers: Sequence[int]) -> dict[tuple[str, int], CachedHiddenState]:
        found: dict[tuple[str, int], CachedHiddenState] = {}
        with self.sessions() as session:
            for start in range(0, len(shas), LOOKUP_CHUNK):
                query = select(CachedHiddenState).where(
                    CachedHiddenState.space == self.space,
                    CachedHiddenState.text_sha256.in_(shas[start : start + LOOKUP_CHUNK]),
                    CachedHiddenState.layer.in_(list(layers)),
                )
                found.update(((entry.text_sha256, entry.layer), entry) for entry in session.scalars(query))
        return found

    def read_into(
        self,
        entries: Sequence[CachedHiddenState],
        out: np.ndarray,
        positions: dict[str, list[int]],
        slots: dict[int, int],
    ) -> None:
        """Copy each entry's vector into `out` at every position of its text and the slot of
        its layer, one shard at a time."""
        by_shard: dict[str, list[CachedHiddenState]] = defaultdict(list)
        for entry in entries:
            by_shard[entry.shard].append(entry)
        for shard, shard_entries in by_shard.items():
            with safe_open(self.store.local_path(shard), framework="numpy") as handle:
                states = handle.get_tensor(STATES_TENSOR)
            # four lists of ints, not a tuple per vector: thousands of small tuples would set
            # off a full garbage collection over the worker's whole heap (the model's included)
            to_text: list[int] = []
            to_slot: list[int] = []
            from_row: list[int] = []
            from_slot: list[int] = []
            for entry in shard_entries:
                for position in positions[entry.text_sha256]:
                    to_text.append(position)
                    to_slot.append(slots[entry.layer])
                    from_row.append(entry.row)
                    from_slot.append(entry.slot)
            out[to_text, to_slot] = states[from_row, from_slot]
            del states

    def shard_key(self, shard_name: str) -> str:
        return f"cache/{self.space[:2]}/{self.space}/{shard_name}.safetensors"

    def add(
        self, shard_name: str, shas: Sequence[str], layers: Sequence[int], states: np.ndarray, truncated: Sequence[bool]
    ) -> None:
        """Write a shard, then index it; an index that fails to commit takes its shard away."""
        shard = self.shard_key(shard_name)
        with self.store.temporary_path(shard) as path:
            arrays.write(path, STATES_TENSOR, states, metadata={"layers": json.dumps(list(layers))})
        rows = [
            {
                "space": self.space,
                "text_sha256": sha,
                "layer": layer,
                "shard": shard,
                "row": row,
                "slot": slot,
                "truncated": truncated[row],
            }
            for row, sha in enumerate(shas)
            for slot, layer in enumerate(layers)
        ]
        try:
            with self.sessions() as session, session.begin():
                insert = postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
                session.execute(insert(CachedHiddenState).on_conflict_do_nothing(), rows)
        except BaseException:
            self.store.delete(shard)
            raise


@dataclass(frozen=True)
class StatesRequest:
    """Everything a set of hidden states depends on, besides the texts."""

    model: Model
    adapter: Adapter | None
    layers: list[int]
    token_position: str
    max_length: int | None
    prompt_format: str = RAW


@dataclass
class States:
    states: np.ndarray  # (texts, layers, hidden), float32
    truncated: list[bool]
    cache_hits: int
    computed_texts: int
    batches_run: int


def state_cache_of(context: "JobContext[Any]", request: StatesRequest) -> HiddenStateCache:
    """The content cache's space for `request`."""
    model, adapter = request.model, request.adapter
    space = cache_space(
        model, adapter.identity if adapter else None, request.token_position, request.max_length, request.prompt_format
    )
    return HiddenStateCache(context.runtime.sessions, context.runtime.artifacts, space)


@dataclass(frozen=True)
class BatchPlan:
    """What `cached_states` would compute for a list of texts, and in which batches: `missing`
    holds the position in the list of the first occurrence of each text the cache lacks, in
    the list's order; `batches` hold indices into `missing`, as `compute` runs them."""

    missing: list[int]
    batches: list[list[int]]
    cache_hits: int  # texts of the list served from the cache
    lengths: list[int]  # tokens of each missing text, as `missing`


def plan_missing(
    context: "JobContext[Any]", request: StatesRequest, texts: Sequence[str], token_budget: int, max_batch_size: int
) -> BatchPlan:
    """The batches `cached_states` would run for `texts` now, with the same planning: the
    texts the cache lacks are tokenized (the model's tokenizer is loaded for it) and grouped
    by `plan_batches`. A run of whole batches of this plan, passed to `cached_states` in the
    list's order, is planned by it into exactly those batches again (the plan sorts stably
    and closes a batch by what it holds and what comes next alone), so its vectors are the
    same bytes as the whole list's would be."""
    worker = context.runtime
    shas = [text_sha256(text) for text in texts]
    first: dict[str, int] = {}
    for index, sha in enumerate(shas):
        first.setdefault(sha, index)
    layers = request.layers
    hits = state_cache_of(context, request).lookup(list(first), layers)
    missing = [index for sha, index in first.items() if any((sha, layer) not in hits for layer in layers)]
    if not missing:
        return BatchPlan(missing=[], batches=[], cache_hits=len(texts), lengths=[])
    loaded = worker.resident(request.model, request.adapter)
    tokenized = tokenize(
        loaded.tokenizer,
        [texts[index] for index in missing],
        request.max_length or model_token_limit(loaded),
        request.prompt_format,
    )
    lengths = [len(ids) for ids in tokenized.token_ids]
    batches = plan_batches(lengths, token_budget, max_batch_size)
    missing_shas = {shas[index] for index in missing}
    served = sum(1 for sha in shas if sha not in missing_shas)
    return BatchPlan(missing=missing, batches=batches, cache_hits=served, lengths=lengths)


def cached_states(
    context: "JobContext[Any]",
    request: StatesRequest,
    texts: Sequence[str],
    shard_name: str,
    out: np.ndarray | None = None,
    *,
    fill_only: bool = False,
    token_budget: int | None = None,
    max_batch_size: int | None = None,
) -> States:
    """States of `texts`, from the content cache where they are, computed (and cached under
    `shard_name`) where they are not; written into `out` (texts, layers, hidden) when given —
    a mapped file, say — else into a new array. With `fill_only`, only the cache is filled:
    nothing is read from it and the returned `states` is empty (0, layers, hidden). Batches
    are planned within `token_budget` and `max_batch_size` (default: the worker's settings)."""
    worker = context.runtime
    settings = worker.settings
    model, adapter, layers = request.model, request.adapter, request.layers
    shas = [text_sha256(text) for text in texts]
    unique_shas = list(dict.fromkeys(shas))
    text_of = dict(zip(shas, texts, strict=True))
    cache = state_cache_of(context, request)
    space = cache.space
    hits = cache.lookup(unique_shas, layers) if settings.extraction_cache else {}
    missing = [sha for sha in unique_shas if any((sha, layer) not in hits for layer in layers)]
    context.progress("loading model", 0, len(missing))

    positions: dict[str, list[int]] = defaultdict(list)
    for index, sha in enumerate(shas):
        positions[sha].append(index)
    slots = {layer: slot for slot, layer in enumerate(layers)}
    if fill_only:
        out = np.empty((0, len(layers), model.hidden_size), dtype=np.float32)
    elif out is None:
        out = np.empty((len(shas), len(layers), model.hidden_size), dtype=np.float32)
    truncated_by_sha: dict[str, bool] = {}
    batches_run = 0
    if missing:
        loaded = worker.resident(model, adapter)
        tokenized = tokenize(
            loaded.tokenizer,
            [text_of[sha] for sha in missing],
            request.max_length or model_token_limit(loaded),
            request.prompt_format,
        )
        context.progress("forward", 0, len(missing))

        def on_batch(done: int) -> None:
            nonlocal batches_run
            batches_run += 1
            context.progress("forward", done, len(missing))

        with worker.running(loaded, model, adapter):
            computed = compute(
                loaded,
                tokenized.token_ids,
                layers,
                request.token_position,
                device=worker.models.device,
                token_budget=token_budget or settings.extraction_token_budget,
                max_batch_size=max_batch_size or settings.extraction_max_batch_size,
                on_batch=on_batch,
            )
        if settings.extraction_cache:
            # one shard per attempt: an attempt taken back must not overwrite the next one's
            context.clear_earlier_attempts(
                *(cache.shard_key(f"{shard_name}-{earlier}") for earlier in range(1, context.attempt))
            )
            claim_space(worker.sessions, space, model.id)
            cache.add(f"{shard_name}-{context.attempt}", missing, layers, computed, tokenized.truncated)
        for row, sha in enumerate(missing):
            truncated_by_sha[sha] = tokenized.truncated[row]
            if not fill_only:
                out[positions[sha]] = computed[row]
        del computed
    served = [sha for sha in unique_shas if sha not in truncated_by_sha]
    if not fill_only:
        cache.read_into([hits[(sha, layer)] for sha in served for layer in layers], out, positions, slots)
    truncated_by_sha.update((sha, hits[(sha, layers[0])].truncated) for sha in served)
    served_set = set(served)
    return States(
        states=out,
        truncated=[truncated_by_sha[sha] for sha in shas],
        cache_hits=sum(1 for sha in shas if sha in served_set),
        computed_texts=len(missing),
        batches_run=batches_run,
    )
