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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import groupby, pairwise
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sqlalchemy import String, any_, bindparam, delete, select, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from app.inputs.prompt_formats import RAW
from app.registry.cache_spaces import claim_space
from app.registry.tables import Adapter, CachedText, CacheShard, Model, utcnow
from app.storage import ArtifactStore
from workers import arrays
from workers.errors import JobFailed
from workers.hidden_states import packed_size, packs, plan_batches, read_texts
from workers.model_loading import LoadedModel
from workers.prompts import prompt_strings

if TYPE_CHECKING:
    from workers.context import JobContext

STATES_TENSOR = "hidden_states"
LOOKUP_CHUNK = 5000  # values in one IN (…) list: well under SQLite's 32,766 variables
LOOKUP_ARRAY = 2000  # hashes in one array parameter on PostgreSQL
INSERT_CHUNK = 5000  # index rows in one INSERT
READ_BLOCK_BYTES = 32 << 20  # shard rows copied by one indexing operation
MIN_RUN = 8  # consecutive rows, on average, that make slice copies worth it
WRITE_BLOCK_ROWS = 4096  # computed rows copied into the output by one indexing operation


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
    loaded: LoadedModel,
    token_ids: list[list[int]],
    layers: Sequence[int],
    token_position: str,
    device: str,
    compiled: bool = False,
) -> torch.Tensor:
    """One batch, its vectors left on `device` (a GPU's still being computed: nothing here
    waits for them); on an out-of-memory error the batch is split in two and retried. With
    `compiled`, the blocks run compiled (`hidden_states.compiled_blocks`)."""
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    try:
        return read_texts(
            loaded.model, token_ids, layers, token_position, pad_id=pad_id, device=device, compiled=compiled
        )
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
                _forward(loaded, token_ids[:half], layers, token_position, device, compiled),
                _forward(loaded, token_ids[half:], layers, token_position, device, compiled),
            ]
        )


def _to_host(states: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """A GPU batch's vectors copied into pinned host memory without waiting, and the event
    that marks the copy done; a CPU batch's as they are."""
    if states.device.type != "cuda":
        return states, None
    host = torch.empty(states.shape, dtype=states.dtype, pin_memory=True)
    host.copy_(states, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


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
    compiled: bool = False,
) -> np.ndarray:
    """(texts, layers, hidden) float32 for every text, computed in length-sorted batches. On
    a GPU one batch is queued before the one before it is read back, so padding and copying
    in the next batch overlap the GPU's work on the last one."""
    result: np.ndarray | None = None
    done = 0
    pending: list[tuple[list[int], torch.Tensor, Any]] = []

    def collect() -> None:
        nonlocal result, done
        indices, host, copied = pending.pop(0)
        if copied is not None:
            copied.synchronize()
        states = host.numpy()
        if result is None:
            result = np.empty((len(token_ids), len(layers), states.shape[-1]), dtype=np.float32)
        result[indices] = states
        done += len(indices)
        on_batch(done)

    lengths = [len(ids) for ids in token_ids]
    for indices in plan_batches(lengths, token_budget, max_batch_size, packed=packs(loaded.model)):
        states = _forward(loaded, [token_ids[index] for index in indices], layers, token_position, device, compiled)
        pending.append((indices, *_to_host(states)))
        if len(pending) > 1:
            collect()
    while pending:
        collect()
    assert result is not None, "compute() needs at least one text"
    return result


@dataclass(frozen=True)
class Positions:
    """Where each distinct text goes in a request's output: distinct text `u` (an index into
    the distinct hashes) is at output rows `order[starts[u] : starts[u] + counts[u]]`."""

    order: np.ndarray
    starts: np.ndarray
    counts: np.ndarray

    @classmethod
    def of(cls, inverse: np.ndarray, distinct: int) -> "Positions":
        """From `inverse`: per output row, the index of its distinct text."""
        counts = np.bincount(inverse, minlength=distinct)
        starts = np.zeros(distinct, dtype=np.int64)
        np.cumsum(counts[:-1], out=starts[1:])
        return cls(order=np.argsort(inverse, kind="stable"), starts=starts, counts=counts)

    def expand(self, texts: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(output rows, source rows): every output row of each of `texts`, with the source
        row (`rows`, one per text) it takes."""
        counts = self.counts[texts]
        if len(counts) == 0 or counts.max() == 1:
            return self.order[self.starts[texts]], rows
        ends = np.cumsum(counts)
        within = np.arange(int(ends[-1]), dtype=np.int64) - np.repeat(ends - counts, counts)
        return self.order[np.repeat(self.starts[texts], counts) + within], np.repeat(rows, counts)


@dataclass(frozen=True)
class ShardRead:
    """Vectors to copy out of one shard: row `rows[i]` of it at slots `from_slots` holds text
    `texts[i]` (an index into the hashes looked up) at the request's slots `to_slots`."""

    shard: str
    from_slots: np.ndarray
    to_slots: np.ndarray
    texts: np.ndarray
    rows: np.ndarray


@dataclass(frozen=True)
class Hits:
    """What the cache holds of the texts looked up (by index): `found`, every requested layer
    of it; `truncated`, whether it was truncated (where found); `reads`, where each layer of
    each found text is, one shard — the earliest that holds the layer — per text and layer."""

    found: np.ndarray
    truncated: np.ndarray
    reads: list[ShardRead]

    @classmethod
    def none(cls, texts: int) -> "Hits":
        return cls(found=np.zeros(texts, dtype=bool), truncated=np.zeros(texts, dtype=bool), reads=[])


class HiddenStateCache:
    """Per-text, per-layer vectors in safetensors shards, indexed in the registry: one
    `CacheShard` per file, one `CachedText` per text in it (whatever its layer count)."""

    def __init__(self, sessions: sessionmaker[Session], store: ArtifactStore, space: str) -> None:
        self.sessions = sessions
        self.store = store
        self.space = space

    def lookup(self, shas: Sequence[str], layers: Sequence[int]) -> Hits:
        """Where the vectors of `shas` (distinct) at `layers` are: a query a chunk of texts
        for their rows in any shard (by the index's first column alone: no join for the
        planner to misjudge while the table's statistics lag behind its growth), then one for
        which of those shards are this space's, with their paths and layers; read as plain
        tuples, the choice of shards made on arrays."""
        index = {sha: position for position, sha in enumerate(shas)}
        candidates: list[Any] = []
        with self.sessions() as session:
            postgresql = session.get_bind().dialect.name == "postgresql"
            if postgresql:
                # Point lookups by the primary key: an index probe is always the right plan, but
                # while the table grows faster than autovacuum refreshes its statistics the
                # planner chooses a sequential scan of the whole index table for every chunk
                # (2 to 3.5 s for 32,768 texts among 1.1 million rows, against 0.5 s by the
                # index). Until the transaction ends, this session does not scan sequentially.
                session.execute(text("SET LOCAL enable_seqscan = off"))
            chunk = LOOKUP_ARRAY if postgresql else LOOKUP_CHUNK
            for start in range(0, len(shas), chunk):
                wanted = list(shas[start : start + chunk])
                query = select(CachedText.text_sha256, CachedText.shard_id, CachedText.row, CachedText.truncated).where(
                    # PostgreSQL: one array parameter rather than thousands of bound values
                    CachedText.text_sha256 == any_(bindparam("shas", wanted, type_=ARRAY(String(64))))
                    if postgresql
                    else CachedText.text_sha256.in_(wanted)
                )
                candidates.extend(session.execute(query).all())
            if not candidates:
                return Hits.none(len(shas))
            all_shards = sorted({entry[1] for entry in candidates})
            shards: dict[int, tuple[str, list[int | None]]] = {}
            for start in range(0, len(all_shards), LOOKUP_CHUNK):
                listed = select(CacheShard.id, CacheShard.path, CacheShard.layers).where(
                    CacheShard.id.in_(all_shards[start : start + LOOKUP_CHUNK]), CacheShard.space == self.space
                )
                shards.update(
                    (shard_id, (path, shard_layers)) for shard_id, path, shard_layers in session.execute(listed)
                )
        found = [entry for entry in candidates if entry[1] in shards]
        if not found:
            return Hits.none(len(shas))
        shard_ids = sorted(shards)
        count = len(found)
        texts = np.fromiter((index[entry[0]] for entry in found), dtype=np.int64, count=count)
        ids = np.fromiter((entry[1] for entry in found), dtype=np.int64, count=count)
        rows = np.fromiter((entry[2] for entry in found), dtype=np.int64, count=count)
        truncated = np.zeros(len(shas), dtype=bool)
        truncated[texts] = np.fromiter((bool(entry[3]) for entry in found), dtype=bool, count=count)
        # candidates (a text in a shard) by text, then by shard: the earliest shard comes first
        order = np.lexsort((ids, texts))
        texts, ids, rows = texts[order], ids[order], rows[order]
        shard_of = np.searchsorted(np.asarray(shard_ids, dtype=np.int64), ids)
        # per shard and requested slot, the shard's slot of that layer (-1: not in the shard)
        slot_in = np.full((len(shard_ids), len(layers)), -1, dtype=np.int64)
        for position, shard_id in enumerate(shard_ids):
            held = {layer: slot for slot, layer in enumerate(shards[shard_id][1]) if layer is not None}
            slot_in[position] = [held.get(layer, -1) for layer in layers]
        candidate_slots = slot_in[shard_of]  # (candidates, requested slots)
        serves = np.zeros(candidate_slots.shape, dtype=bool)
        have = np.zeros((len(shas), len(layers)), dtype=bool)
        for to_slot in range(len(layers)):
            holding = np.flatnonzero(candidate_slots[:, to_slot] >= 0)
            first = holding[np.r_[True, texts[holding][1:] != texts[holding][:-1]]] if len(holding) else holding
            serves[first, to_slot] = True
            have[texts[first], to_slot] = True
        complete = np.asarray(have.all(axis=1), dtype=bool)
        # one read per shard and set of slots it serves, for the texts found whole
        useful = np.flatnonzero(serves.any(axis=1) & complete[texts])
        if not len(useful):
            return Hits(found=complete, truncated=truncated, reads=[])
        patterns, pattern_of = np.unique(serves[useful], axis=0, return_inverse=True)
        group = shard_of[useful] * len(patterns) + pattern_of.reshape(-1)
        by_group = np.argsort(group, kind="stable")
        reads: list[ShardRead] = []
        bounds = np.flatnonzero(np.r_[True, group[by_group][1:] != group[by_group][:-1], True])
        for begin, end in pairwise(bounds):
            members = useful[by_group[begin:end]]
            to_slots = np.flatnonzero(serves[members[0]])
            reads.append(
                ShardRead(
                    shard=shards[shard_ids[shard_of[members[0]]]][0],
                    from_slots=candidate_slots[members[0], to_slots],
                    to_slots=to_slots,
                    texts=texts[members],
                    rows=rows[members],
                )
            )
        return Hits(found=complete, truncated=truncated, reads=reads)

    def read_into(self, hits: Hits, out: np.ndarray, positions: Positions) -> None:
        """Copy every vector `hits` reads into `out` at each output row of its text and the
        slot of its layer, each shard mapped once. Where whole shard rows go to whole output
        rows in runs (consecutive rows to consecutive output rows, as a request the shard was
        computed for reads them), each run is one slice copy; otherwise the rows are read in
        ascending order, a block of them at a time, by array indexing."""
        for shard, reads in groupby(hits.reads, key=lambda read: read.shard):
            states = np.asarray(arrays.mapped(self.store.local_path(shard), STATES_TENSOR))
            block = max(1, READ_BLOCK_BYTES // max(1, states.shape[1] * states.shape[2] * 4))
            for read in reads:
                targets, rows = positions.expand(read.texts, read.rows)
                whole = np.array_equal(read.from_slots, np.arange(states.shape[1])) and np.array_equal(
                    read.to_slots, np.arange(out.shape[1])
                )
                if whole:
                    by_target = np.argsort(targets, kind="stable")
                    targets, rows = targets[by_target], rows[by_target]
                    runs = np.flatnonzero((np.diff(rows) != 1) | (np.diff(targets) != 1)) + 1
                    if len(runs) < len(rows) // MIN_RUN:
                        for begin, end in pairwise([0, *runs.tolist(), len(rows)]):
                            first, target = int(rows[begin]), int(targets[begin])
                            out[target : target + end - begin] = states[first : first + end - begin]
                        continue
                by_row = np.argsort(rows, kind="stable")
                targets, rows = targets[by_row], rows[by_row]
                for start in range(0, len(rows), block):
                    into, taken = targets[start : start + block], rows[start : start + block]
                    if whole:
                        out[into] = states[taken]
                    else:
                        out[into[:, None], read.to_slots] = states[taken[:, None], read.from_slots]
            del states

    def shard_key(self, shard_name: str) -> str:
        return f"cache/{self.space[:2]}/{self.space}/{shard_name}.safetensors"

    def add(
        self, shard_name: str, shas: Sequence[str], layers: Sequence[int], states: np.ndarray, truncated: Sequence[bool]
    ) -> None:
        """Write a shard, then index it — its `CacheShard` and a `CachedText` per text, in one
        transaction; an index that fails to commit takes its shard away. A shard written
        again under its name replaces the index of the earlier one."""
        shard = self.shard_key(shard_name)
        with self.store.temporary_path(shard) as path:
            arrays.write(path, STATES_TENSOR, states, metadata={"layers": json.dumps(list(layers))})
        try:
            with self.sessions() as session, session.begin():
                insert = postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
                earlier = select(CacheShard.id).where(CacheShard.path == shard).scalar_subquery()
                session.execute(delete(CachedText).where(CachedText.shard_id == earlier))
                session.execute(delete(CacheShard).where(CacheShard.path == shard))
                shard_id = session.execute(
                    insert(CacheShard)
                    .values(space=self.space, path=shard, layers=list(layers), rows=len(shas), created_at=utcnow())
                    .returning(CacheShard.id)
                ).scalar_one()
                for start in range(0, len(shas), INSERT_CHUNK):
                    session.execute(
                        insert(CachedText).on_conflict_do_nothing(),
                        [
                            {"text_sha256": shas[row], "shard_id": shard_id, "row": row, "truncated": truncated[row]}
                            for row in range(start, min(start + INSERT_CHUNK, len(shas)))
                        ],
                    )
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
    the list's order; `batches` hold indices into `missing`, as `compute` runs them, planned
    within `token_budget` and `max_batch_size` (`packed`: texts sharing rows)."""

    missing: list[int]
    batches: list[list[int]]
    cache_hits: int  # texts of the list served from the cache
    lengths: list[int]  # tokens of each missing text, as `missing`
    missing_shas: list[str]  # the sha256 of each missing text, as `missing`
    token_budget: int
    max_batch_size: int
    packed: bool = False

    def batch_tokens(self, batch: Sequence[int]) -> int:
        """Tokens a batch of the plan computes, pads included: rows × longest, or packed."""
        lengths = [self.lengths[index] for index in batch]
        return packed_size(lengths) if self.packed else len(lengths) * max(lengths)


def plan_missing(
    context: "JobContext[Any]",
    request: StatesRequest,
    texts: Sequence[str],
    token_budget: int,
    max_batch_size: int,
    planned: Callable[[Sequence[str]], np.ndarray] | None = None,
) -> BatchPlan:
    """The batches `cached_states` would run for `texts` now, with the same planning: the
    texts the cache lacks are tokenized (the model's tokenizer is loaded for it) and grouped
    by `plan_batches`. A run of whole batches of this plan, passed to `cached_states` in the
    list's order, is planned by it into exactly those batches again (the plan sorts stably
    and closes a batch by what it holds and what comes next alone), so its vectors are the
    same bytes as the whole list's would be. Texts `planned` says (by their hashes) are
    computed elsewhere are left out, as if the cache held them."""
    distinct: dict[str, int] = {}
    inverse = np.fromiter(
        (distinct.setdefault(text_sha256(text), len(distinct)) for text in texts), dtype=np.int64, count=len(texts)
    )
    unique = list(distinct)
    first = np.full(len(unique), len(texts), dtype=np.int64)
    np.minimum.at(first, inverse, np.arange(len(texts), dtype=np.int64))
    found = state_cache_of(context, request).lookup(unique, request.layers).found
    skipped = found | planned(unique) if planned is not None and len(unique) else found
    missing_unique = np.flatnonzero(~skipped)
    served = int(found[inverse].sum())
    if not len(missing_unique):
        return BatchPlan([], [], served, [], [], token_budget, max_batch_size)
    # the list's order: first occurrences ascend with the distinct texts' numbering
    missing = first[missing_unique].tolist()
    loaded = context.runtime.resident(request.model, request.adapter)
    tokenized = tokenize(
        loaded.tokenizer,
        [texts[index] for index in missing],
        request.max_length or model_token_limit(loaded),
        request.prompt_format,
    )
    lengths = [len(ids) for ids in tokenized.token_ids]
    packed = packs(loaded.model)
    batches = plan_batches(lengths, token_budget, max_batch_size, packed=packed)
    return BatchPlan(
        missing=missing,
        batches=batches,
        cache_hits=served,
        lengths=lengths,
        missing_shas=[unique[index] for index in missing_unique],
        token_budget=token_budget,
        max_batch_size=max_batch_size,
        packed=packed,
    )


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
    progress: Callable[[str, int, int | None], None] | None = None,
) -> States:
    """States of `texts`, from the content cache where they are, computed (and cached under
    `shard_name`) where they are not; written into `out` (texts, layers, hidden) when given —
    a mapped file, say — else into a new array. With `fill_only`, only the cache is filled:
    nothing is read from it and the returned `states` is empty (0, layers, hidden). Batches
    are planned within `token_budget` and `max_batch_size` (default: the worker's settings).
    Progress goes to `progress` (default: the job's own), as texts computed of those missing."""
    worker = context.runtime
    settings = worker.settings
    model, adapter, layers = request.model, request.adapter, request.layers
    distinct: dict[str, int] = {}
    inverse = np.fromiter(
        (distinct.setdefault(text_sha256(text), len(distinct)) for text in texts), dtype=np.int64, count=len(texts)
    )
    unique_shas = list(distinct)
    first_text = np.full(len(unique_shas), len(texts), dtype=np.int64)
    np.minimum.at(first_text, inverse, np.arange(len(texts), dtype=np.int64))
    cache = state_cache_of(context, request)
    space = cache.space
    hits = cache.lookup(unique_shas, layers) if settings.extraction_cache else Hits.none(len(unique_shas))
    missing = np.flatnonzero(~hits.found)
    report = progress or context.progress
    report("loading model", 0, len(missing))

    positions = Positions.of(inverse, len(unique_shas))
    if fill_only:
        out = np.empty((0, len(layers), model.hidden_size), dtype=np.float32)
    elif out is None:
        out = np.empty((len(texts), len(layers), model.hidden_size), dtype=np.float32)
    truncated = hits.truncated.copy()
    batches_run = 0
    if len(missing):
        loaded = worker.resident(model, adapter)
        tokenized = tokenize(
            loaded.tokenizer,
            [texts[index] for index in first_text[missing]],
            request.max_length or model_token_limit(loaded),
            request.prompt_format,
        )
        report("forward", 0, len(missing))

        def on_batch(done: int) -> None:
            nonlocal batches_run
            batches_run += 1
            report("forward", done, len(missing))

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
                compiled=settings.extraction_compile,
            )
        if settings.extraction_cache:
            # one shard per attempt: an attempt taken back must not overwrite the next one's
            context.clear_earlier_attempts(
                *(cache.shard_key(f"{shard_name}-{earlier}") for earlier in range(1, context.attempt))
            )
            claim_space(worker.sessions, space, model.id)
            cache.add(
                f"{shard_name}-{context.attempt}",
                [unique_shas[index] for index in missing],
                layers,
                computed,
                tokenized.truncated,
            )
        truncated[missing] = tokenized.truncated
        if not fill_only:
            targets, rows = positions.expand(missing, np.arange(len(missing), dtype=np.int64))
            for start in range(0, len(rows), WRITE_BLOCK_ROWS):
                out[targets[start : start + WRITE_BLOCK_ROWS]] = computed[rows[start : start + WRITE_BLOCK_ROWS]]
        del computed
    if not fill_only:
        cache.read_into(hits, out, positions)
    return States(
        states=out,
        truncated=truncated[inverse].tolist(),
        cache_hits=int(hits.found[inverse].sum()),
        computed_texts=len(missing),
        batches_run=batches_run,
    )
