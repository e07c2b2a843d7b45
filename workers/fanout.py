"""The hidden states of a dataset's rows spread over every live worker: the texts are computed
in parts, each part a job of its own (`states_part`) on the shared queue, and the job that
needs the states (the *parent*: an extraction, a probe run, a comparison, an evaluation, a
transfer) reads them from the content cache once every part has succeeded.

- Parts: the parent plans the batches one worker would run for the texts the cache lacks
  (`state_cache.plan_missing`), and cuts that plan, in its order, into runs of whole batches:
  as many as parts of EXTRACTION_PART_TEXTS texts it takes, each about the same work by
  padded tokens (`cut_plan`). Each run is a part: the dataset rows it renders into texts,
  with the plan's token budget and batch size. A part plans its texts into exactly those
  batches again, so every vector is the same bytes a one-worker run computes (`plan_missing`
  says why). Texts to compute no more than EXTRACTION_PART_TEXTS are not split: the parent
  computes them itself.
- Groups: each set of states a parent needs is a *group* of parts (a variant of a
  comparison, a dataset of a transfer). An extraction plans its dataset a window of
  EXTRACTION_WINDOW_TEXTS rows at a time (`spread_extraction`), a group per window, so its
  memory does not grow with the dataset; a text already planned in an earlier window is not
  planned again, as a one-worker run would find it in the cache by then.
- Queue: the parts are committed with `parent_id` naming the parent, in the transaction that
  checks the parent is still this attempt's, and handed to RQ together (`enqueue_many`) on
  the shared queue, which every worker listens on. A retried parent finds its parts by
  `parent_id` and group, and creates only the groups it lacks.
- Waiting: the parent runs queued parts itself, taking each with the same compare-and-set
  start RQ's workers use (`runner.run_part`), so its worker computes too; the heartbeat names
  the part as the worker's `current_part`. With no part left to take, it polls the parts'
  statuses. Its progress (`forward`, done/total) is the sum of its parts': a part that
  succeeded counts whole, a running one its own `forward` progress.
- Failure: a part whose worker dies is taken back and queued again alone by the lost-worker
  sweep (its attempts are its own); the parent keeps waiting. A part that fails, or is lost
  with no attempt left, fails the parent with the part's error, and the parent cancels the
  parts still unfinished. Cancelling the parent cancels its parts (`app.jobs.cancel`).
"""

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select, update

from app import broker, jobs
from app.inputs.prompt_formats import rendered_rows
from app.job_kinds import StatesPartParameters
from app.registry.database import changed_rows
from app.registry.datasets import rows_at, rows_between
from app.registry.tables import Adapter, Dataset, Job, Model, utcnow
from workers.context import subject_row, this_attempt
from workers.errors import AttemptSuperseded, JobCancelled, JobFailed
from workers.state_cache import BatchPlan, States, StatesRequest, cached_states, plan_missing, text_sha256

if TYPE_CHECKING:
    from workers.context import JobContext

log = logging.getLogger("workers.fanout")
# how often a parent with no part left to take looks at its parts
POLL_S = 0.2
# the least time between two progress points of a parent while it runs a part itself
PROGRESS_EVERY_S = 0.5


@dataclass(frozen=True)
class PartsOutcome:
    """What the parts did, for the parent's result: texts served from the cache before the
    parts ran, and the parts' own figures summed."""

    parts: int
    cache_hits: int
    computed_texts: int
    batches_run: int
    # seconds planning the parts, and waiting for them (running them here included)
    planning_s: float = field(default=0.0, compare=False)
    parts_s: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class PartRow:
    """A part as its parent follows it: its id, group, number and how many texts it computes."""

    id: str
    group: str
    number: int
    size: int


def cut_plan(plan: BatchPlan, part_texts: int) -> list[list[int]]:
    """The plan's batches, in order, cut into runs of whole batches: a run for every
    `part_texts` texts it takes to hold them all, each about as much work as the others (by
    the tokens its batches compute, pads included, `BatchPlan.batch_tokens`: the plan puts the
    longest texts first, and a run of them costs more than as many short ones) — but the last
    of them cut in two halves, so that workers taking runs in order end within half a run of
    each other. Each run as the texts' positions in the list the plan was made for, ascending."""
    count = math.ceil(len(plan.missing) / part_texts)
    shares = [1.0] * (count - 1) + ([0.5, 0.5] if count > 1 else [1.0])
    costs = [plan.batch_tokens(batch) for batch in plan.batches]
    total = sum(costs)
    ends = [total * sum(shares[: number + 1]) / count for number in range(len(shares) - 1)]
    parts: list[list[int]] = []
    current: list[int] = []
    spent = 0
    for batch, cost in zip(plan.batches, costs, strict=True):
        current.extend(plan.missing[index] for index in batch)
        spent += cost
        if len(parts) < len(ends) and spent >= ends[len(parts)]:
            parts.append(sorted(current))
            current = []
    if current:
        parts.append(sorted(current))
    return parts


class Planned:
    """The texts planned into parts so far, by the first 64 bits of their sha256 (a sorted
    array: 8 bytes a text). A text whose prefix matches is not planned again; were two
    texts ever to share a prefix, the second would be computed by the parent instead. Each
    window's texts are looked up by binary search and merged in without sorting the whole
    array again: the cost of a window does not grow with the windows before it."""

    def __init__(self) -> None:
        self.keys = np.empty(0, dtype=np.uint64)

    @staticmethod
    def prefixes(shas: Sequence[str]) -> np.ndarray:
        return np.fromiter((int(sha[:16], 16) for sha in shas), dtype=np.uint64, count=len(shas))

    def _contains(self, values: np.ndarray) -> np.ndarray:
        at = np.searchsorted(self.keys, values)
        inside = at < len(self.keys)
        found = np.zeros(len(values), dtype=bool)
        found[inside] = self.keys[at[inside]] == values[inside]
        return found

    def add(self, shas: Sequence[str]) -> None:
        new = np.unique(self.prefixes(shas))
        new = new[~self._contains(new)]
        self.keys = np.insert(self.keys, np.searchsorted(self.keys, new), new)

    def holds(self, shas: Sequence[str]) -> np.ndarray:
        return self._contains(self.prefixes(shas))


def _known_parts(context: "JobContext[Any]") -> list[PartRow]:
    """The parts of this parent its earlier attempts (or earlier calls) created."""
    with context.runtime.sessions() as session:
        found = session.execute(select(Job.id, Job.params).where(Job.parent_id == context.job_id)).all()
    return sorted(
        (
            PartRow(
                id=job_id,
                group=str(params.get("group", "")),
                number=int(params.get("part", 0)),
                size=len(params.get("rows", params.get("indices", []))),
            )
            for job_id, params in found
        ),
        key=lambda part: part.number,
    )


def _create_parts(
    context: "JobContext[Any]",
    request: StatesRequest,
    dataset: Dataset,
    group: str,
    runs: list[list[int]],
    first_number: int,
    plan: BatchPlan,
) -> list[PartRow]:
    """Commit the parts of `runs` (dataset rows), unless this attempt at the parent was taken
    back meanwhile, and hand them to RQ on the shared queue."""
    worker = context.runtime
    shared = broker.default_queue(worker.settings)
    parts = [
        jobs.new_job(
            "states_part",
            StatesPartParameters(
                group=group,
                part=first_number + offset,
                dataset_id=dataset.id,
                prompt_format=request.prompt_format,
                model_id=request.model.id,
                adapter_id=request.adapter.id if request.adapter else None,
                layers=request.layers,
                token_position=request.token_position,
                max_length=request.max_length,
                rows=run,
                token_budget=plan.token_budget,
                max_batch_size=plan.max_batch_size,
            ),
            shared,
            request.model.id,
        )
        for offset, run in enumerate(runs)
    ]
    created = utcnow()
    for offset, part in enumerate(parts):
        part.parent_id = context.job_id
        part.created_at = created + timedelta(microseconds=offset)  # their order, for listings
    with worker.sessions() as session, session.begin():
        ours = (
            update(Job).where(*this_attempt(context.job_id, worker.name, context.attempt)).values(attempts=Job.attempts)
        )
        if not changed_rows(session, ours):
            raise AttemptSuperseded()
        session.add_all(parts)
    jobs.put_all_on_queue(worker.redis, worker.settings, parts)
    log.info("states split into %d parts", len(parts), extra={"group": group, "parts": [part.id for part in parts]})
    return [
        PartRow(id=part.id, group=group, number=first_number + offset, size=len(run))
        for offset, (part, run) in enumerate(zip(parts, runs, strict=True))
    ]


def spread_states(
    context: "JobContext[Any]",
    request: StatesRequest,
    texts: Sequence[str],
    dataset: Dataset,
    group: str,
    rows: Sequence[int] | None = None,
) -> PartsOutcome | None:
    """Fill the content cache with the states of `texts` — the dataset's rows at positions
    `rows` (default: every row), rendered under the request's prompt format — spread over
    every live worker in parts of the group `group`; None (nothing done) when the texts to
    compute are too few to split. A retried parent goes on with the group's parts its
    earlier attempt created."""
    settings = context.runtime.settings
    if not settings.extraction_cache:
        return None
    known = _known_parts(context)
    mine = [part for part in known if part.group == group]
    if mine:
        cache_hits = len(texts) - sum(part.size for part in mine)
    else:
        if len(texts) <= settings.extraction_part_texts:
            return None
        plan = plan_missing(
            context, request, texts, settings.extraction_token_budget, settings.extraction_max_batch_size
        )
        if len(plan.missing) <= settings.extraction_part_texts:
            return None
        cache_hits = plan.cache_hits
        runs = cut_plan(plan, settings.extraction_part_texts)
        if rows is not None:
            runs = [[int(rows[index]) for index in run] for run in runs]
        first = max((part.number for part in known), default=-1) + 1
        mine = _create_parts(context, request, dataset, group, runs, first, plan)
    return _follow(context, mine, cache_hits)


def dataset_states(
    context: "JobContext[Any]",
    request: StatesRequest,
    texts: Sequence[str],
    dataset: Dataset,
    shard_name: str,
    rows: Sequence[int] | None = None,
) -> States:
    """`cached_states` of a dataset's rows (`texts`: the rows at positions `rows`, default
    every row, rendered under the request's prompt format), their missing states first
    spread over every live worker when they are many (`spread_states`, a group named
    `shard_name`)."""
    spread_states(context, request, texts, dataset, shard_name, rows)
    return cached_states(context, request, texts, shard_name=shard_name)


def spread_extraction(
    context: "JobContext[Any]", request: StatesRequest, dataset: Dataset, texts_between: Callable[[int, int], list[str]]
) -> PartsOutcome | None:
    """`spread_states` for a whole dataset read a window of EXTRACTION_WINDOW_TEXTS rows at
    a time (`texts_between(start, stop)`): each window is planned on its own, as the
    extraction computes it in one piece, its parts a group named by its first row. Parts are
    queued as soon as the texts to compute are known to be more than EXTRACTION_PART_TEXTS,
    so workers start while later windows are still planned."""
    settings = context.runtime.settings
    rows, window, part_texts = dataset.rows, settings.extraction_window_texts, settings.extraction_part_texts
    if not settings.extraction_cache or rows <= part_texts:
        return None
    started = time.monotonic()
    known = _known_parts(context)
    by_group: dict[str, list[PartRow]] = {}
    for part in known:
        by_group.setdefault(part.group, []).append(part)
    planned = Planned()
    followed: list[PartRow] = [part for part in known if part.group.startswith("rows-")]
    pending: list[tuple[str, list[list[int]], BatchPlan]] = []
    splitting = bool(followed)
    to_compute = sum(part.size for part in followed)
    cache_hits = 0
    number = max((part.number for part in known), default=-1) + 1
    # a window that fails to plan (a text with no tokens, say) stops the parts queued before it
    with _parts_cancelled_on_failure(context):
        for start in range(0, rows, window):
            stop = min(start + window, rows)
            group = f"rows-{start}"
            texts = texts_between(start, stop)
            earlier = by_group.get(group)
            if earlier is not None:  # planned by an earlier attempt: its texts count as planned
                with context.runtime.sessions() as session:
                    part_rows = session.scalars(
                        select(Job.params).where(Job.id.in_([part.id for part in earlier]))
                    ).all()
                planned.add([text_sha256(texts[row - start]) for params in part_rows for row in params["rows"]])
                cache_hits += len(texts) - sum(part.size for part in earlier)
                continue
            context.progress("planning", start, rows)
            plan = plan_missing(
                context,
                request,
                texts,
                settings.extraction_token_budget,
                settings.extraction_max_batch_size,
                planned=planned.holds,
            )
            cache_hits += plan.cache_hits
            if plan.missing:
                planned.add(plan.missing_shas)
                pending.append((group, [[start + index for index in run] for run in cut_plan(plan, part_texts)], plan))
                to_compute += len(plan.missing)
            if to_compute > part_texts:
                splitting = True
            if splitting:
                for pending_group, runs, pending_plan in pending:
                    followed += _create_parts(context, request, dataset, pending_group, runs, number, pending_plan)
                    number += len(runs)
                pending = []
    if not splitting:
        return None
    planned_at = time.monotonic()
    outcome = _follow(context, followed, cache_hits)
    return replace(outcome, planning_s=planned_at - started, parts_s=time.monotonic() - planned_at)


@contextmanager
def _parts_cancelled_on_failure(context: "JobContext[Any]") -> Iterator[None]:
    """The parent's unfinished parts cancelled when it ends here for good (failed, cancelled);
    not when this attempt was taken back (the next carries on with them), nor when the worker
    stops at once (SystemExit: the retry does)."""
    worker = context.runtime
    try:
        yield
    except AttemptSuperseded:
        raise
    except Exception:
        try:
            jobs.cancel_parts(worker.sessions, worker.redis, worker.settings, context.job_id)
        except Exception:
            log.exception("the unfinished parts could not be cancelled")
        raise


def _follow(context: "JobContext[Any]", parts: list[PartRow], cache_hits: int) -> PartsOutcome:
    """Wait for `parts` (running queued ones here), then their figures summed; on a failure
    the parent's other unfinished parts are cancelled."""
    with _parts_cancelled_on_failure(context):
        _wait_for(context, parts)
    with context.runtime.sessions() as session:
        results = session.scalars(select(Job.result).where(Job.id.in_([part.id for part in parts]))).all()
    return PartsOutcome(
        parts=len(parts),
        cache_hits=cache_hits,
        computed_texts=sum(int((result or {}).get("computed_texts", 0)) for result in results),
        batches_run=sum(int((result or {}).get("batches_run", 0)) for result in results),
    )


@dataclass(frozen=True)
class _Status:
    status: str
    stage: str | None
    done: int


def _statuses(context: "JobContext[Any]") -> dict[str, _Status]:
    """Every part's status and progress, without its parameters."""
    with context.runtime.sessions() as session:
        found = session.execute(
            select(Job.id, Job.status, Job.progress_stage, Job.progress_done).where(Job.parent_id == context.job_id)
        ).all()
    return {job_id: _Status(status, stage, done or 0) for job_id, status, stage, done in found}


def _done(part: PartRow, status: _Status | None) -> int:
    """Texts of the part computed so far."""
    if status is None:
        return 0
    if status.status == "succeeded":
        return part.size
    if status.status == "running" and status.stage == "forward":
        return min(status.done, part.size)
    return 0


def _wait_for(context: "JobContext[Any]", parts: list[PartRow]) -> None:
    """Run queued parts here and wait for the others, reporting the parts' summed progress,
    until every part has succeeded; a part that failed fails the parent with its error."""
    from workers import runner  # the runner imports this module's callers

    worker = context.runtime
    total = sum(part.size for part in parts)
    reported: list[Any] = [None, 0.0]  # the last (done) reported, and when

    def report(statuses: dict[str, _Status], force: bool) -> None:
        done = sum(_done(part, statuses.get(part.id)) for part in parts)
        now = time.monotonic()
        if done != reported[0] and (force or now - reported[1] >= PROGRESS_EVERY_S):
            context.progress("forward", done, total)
            reported[:] = [done, now]
        else:
            context.check()

    def while_running_a_part() -> None:
        if time.monotonic() - reported[1] < PROGRESS_EVERY_S:
            return
        try:
            report(_statuses(context), force=False)
        except (AttemptSuperseded, JobCancelled):
            pass  # the part runs on; the parent stops once it is back in its own loop

    worker.on_part_progress = while_running_a_part
    try:
        while True:
            statuses = _statuses(context)
            report(statuses, force=True)
            ended = [
                part for part in parts if part.id in statuses and statuses[part.id].status in ("failed", "cancelled")
            ]
            if ended:
                _fail_with(context, ended[0], len(parts))
            if all(part.id in statuses and statuses[part.id].status == "succeeded" for part in parts):
                return
            queued = [part for part in parts if part.id in statuses and statuses[part.id].status == "queued"]
            # the first queued part, as RQ's workers take theirs: the longest texts go first,
            # and the last parts, the smallest, even out the end (`cut_plan`)
            if not (queued and runner.run_part(worker, queued[0].id)):
                time.sleep(POLL_S)
    finally:
        worker.on_part_progress = None


def _fail_with(context: "JobContext[Any]", part: PartRow, count: int) -> None:
    with context.runtime.sessions() as session:
        row = session.get(Job, part.id)
    status, error = (row.status, row.error or {}) if row is not None else ("cancelled", {})
    if status == "cancelled":
        code, message = "part_cancelled", f"part {part.number + 1} of {count} ({part.id}) was cancelled"
    else:
        code = str(error.get("code", "internal"))
        message = f"part {part.number + 1} of {count} ({part.id}) failed: {error.get('message', '')}"
    raise JobFailed(code, message, part_id=part.id, part=part.number, part_details=error.get("details", {}))


def run_part(context: "JobContext[StatesPartParameters]") -> dict[str, Any]:
    """A `states_part`: the states of its rows' texts into the content cache, planned into the
    batches its parent planned for them; no array is kept."""
    params = context.params
    worker = context.runtime
    with worker.sessions() as session:
        dataset = subject_row(session, Dataset, params.dataset_id, "dataset")
        model = subject_row(session, Model, params.model_id, "model")
        adapter = subject_row(session, Adapter, params.adapter_id, "adapter") if params.adapter_id else None
    if params.rows and min(params.rows) < 0:
        raise JobFailed("invalid_parameters", f"part {params.part} names rows the dataset does not have")
    try:
        rows = rows_at(worker.artifacts, dataset, params.rows)
    except IndexError as exc:
        raise JobFailed("invalid_parameters", f"part {params.part}: {exc}") from None
    texts = rendered_rows(rows, dataset.kind, params.prompt_format)
    request = StatesRequest(
        model, adapter, list(params.layers), params.token_position, params.max_length, params.prompt_format
    )
    result = cached_states(
        context,
        request,
        texts,
        shard_name=context.job_id,
        fill_only=True,
        token_budget=params.token_budget,
        max_batch_size=params.max_batch_size,
    )
    return {
        "group": params.group,
        "part": params.part,
        "texts": len(texts),
        "cache_hits": result.cache_hits,
        "computed_texts": result.computed_texts,
        "batches_run": result.batches_run,
    }


def dataset_texts(context: "JobContext[Any]", dataset: Dataset, prompt_format: str) -> Callable[[int, int], list[str]]:
    """Texts of rows `start` to `stop` of `dataset`, rendered under `prompt_format`."""
    store = context.runtime.artifacts

    def between(start: int, stop: int) -> list[str]:
        return rendered_rows(rows_between(store, dataset, start, stop), dataset.kind, prompt_format)

    return between
