"""One extraction spread over every live worker: its texts are computed in parts, each part a
job of its own (`extraction_part`) on the shared queue, and the extraction's job assembles the
result from the content cache once every part has succeeded.

- Parts: the extraction's job (the *parent*) plans the batches one worker would run for the
  texts the cache lacks (`state_cache.plan_missing`), and cuts that plan, in its order, into
  runs of whole batches: as many as parts of EXTRACTION_PART_TEXTS texts it takes, each about
  the same work by padded tokens (`cut_plan`). Each run is a part: its texts' positions in the extraction's list, with the plan's token
  budget and batch size. A part plans its texts into exactly those batches again, so every
  vector is the same bytes a one-worker run computes (`plan_missing` says why). A plan with no
  more texts to compute than EXTRACTION_PART_TEXTS is not split: the job runs as one.
- Queue: the parts are committed with `parent_id` naming the parent, in the transaction that
  checks the parent is still this attempt's, and handed to RQ together (`enqueue_many`) on
  the shared queue, which every worker listens on. A retried parent finds its parts by
  `parent_id` and creates none.
- Waiting: the parent runs queued parts itself, taking each with the same compare-and-set
  start RQ's workers use (`runner.run_part`), so its worker computes too; the heartbeat names
  the part as the worker's `current_part`. With no part left to take, it polls the parts' rows.
  Its progress (`forward`, done/total) is the sum of its parts': a part that succeeded counts
  whole, a running one its own `forward` progress.
- Failure: a part whose worker dies is taken back and queued again alone by the lost-worker
  sweep (its attempts are its own); the parent keeps waiting. A part that fails, or is lost
  with no attempt left, fails the parent with the part's error, and the parent cancels the
  parts still unfinished. Cancelling the parent cancels its parts (`app.jobs.cancel`).
"""

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import update

from app import broker, jobs
from app.job_kinds import ExtractionPartParameters
from app.registry.database import changed_rows
from app.registry.tables import Job
from workers.context import this_attempt
from workers.errors import AttemptSuperseded, JobCancelled, JobFailed
from workers.state_cache import BatchPlan, StatesRequest, plan_missing

if TYPE_CHECKING:
    from collections.abc import Sequence

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


def cut_plan(plan: BatchPlan, part_texts: int) -> list[list[int]]:
    """The plan's batches, in order, cut into runs of whole batches: as many runs as parts of
    `part_texts` texts it takes to hold them all, each about as much work as the others (by
    padded tokens, rows × longest: the plan puts the longest texts first, and a run of them
    costs more than as many short ones). Each run as the texts' positions in the
    extraction's list, ascending."""
    count = math.ceil(len(plan.missing) / part_texts)
    costs = [len(batch) * max(plan.lengths[index] for index in batch) for batch in plan.batches]
    total = sum(costs)
    parts: list[list[int]] = []
    current: list[int] = []
    spent = 0
    for batch, cost in zip(plan.batches, costs, strict=True):
        current.extend(plan.missing[index] for index in batch)
        spent += cost
        if len(parts) < count - 1 and spent * count >= total * (len(parts) + 1):
            parts.append(sorted(current))
            current = []
    if current:
        parts.append(sorted(current))
    return parts


def _create_parts(
    context: "JobContext[Any]", extraction_id: str, model_id: str, runs: list[list[int]], budget: int, size: int
) -> None:
    """Commit the parts, unless this attempt at the parent was taken back meanwhile, and hand
    them to RQ on the shared queue."""
    worker = context.runtime
    shared = broker.default_queue(worker.settings)
    with worker.sessions() as session, session.begin():
        still_ours = changed_rows(
            session,
            update(Job)
            .where(*this_attempt(context.job_id, worker.name, context.attempt))
            .values(progress_stage="forward", progress_done=0, progress_total=sum(len(run) for run in runs)),
        )
        if not still_ours:
            raise AttemptSuperseded()
        parts = [
            jobs.new_job(
                "extraction_part",
                ExtractionPartParameters(
                    extraction_id=extraction_id, part=number, indices=run, token_budget=budget, max_batch_size=size
                ),
                shared,
                model_id,
            )
            for number, run in enumerate(runs)
        ]
        for part in parts:
            part.parent_id = context.job_id
        session.add_all(parts)
    jobs.put_all_on_queue(worker.redis, worker.settings, parts)
    log.info("extraction split into %d parts", len(parts), extra={"parts": [part.id for part in parts]})


def _size(part: Job) -> int:
    return len(part.params.get("indices", []))


def _done(part: Job) -> int:
    """Texts of the part computed so far."""
    if part.status == "succeeded":
        return _size(part)
    if part.status == "running" and part.progress_stage == "forward":
        return min(part.progress_done, _size(part))
    return 0


def _read_parts(context: "JobContext[Any]") -> list[Job]:
    with context.runtime.sessions() as session:
        return jobs.parts_of(session, context.job_id)


def compute_in_parts(
    context: "JobContext[Any]", request: StatesRequest, texts: "Sequence[str]", extraction_id: str
) -> PartsOutcome | None:
    """Fill the content cache with the states of `texts`, spread over every live worker in
    parts; None (nothing done) when the texts to compute are too few to split. A retried
    parent goes on with the parts its earlier attempt created."""
    worker = context.runtime
    settings = worker.settings
    parts = _read_parts(context)
    cache_hits = 0
    if not parts:
        if len(texts) <= settings.extraction_part_texts:
            return None
        budget, size = settings.extraction_token_budget, settings.extraction_max_batch_size
        context.progress("planning", 0, len(texts))
        plan = plan_missing(context, request, texts, budget, size)
        if len(plan.missing) <= settings.extraction_part_texts:
            return None
        cache_hits = plan.cache_hits
        runs = cut_plan(plan, settings.extraction_part_texts)
        _create_parts(context, extraction_id, request.model.id, runs, budget, size)
        parts = _read_parts(context)
    else:
        cache_hits = len(texts) - sum(_size(part) for part in parts)
    try:
        _wait_for(context, parts)
    except AttemptSuperseded:
        raise  # the next attempt at the parent carries on with the parts
    except Exception:  # the parent ends here for good; a worker stopped at once (SystemExit) leaves them to its retry
        try:
            jobs.cancel_parts(worker.sessions, worker.redis, worker.settings, context.job_id)
        except Exception:
            log.exception("the unfinished parts could not be cancelled")
        raise
    finished = _read_parts(context)
    results = [part.result or {} for part in finished]
    return PartsOutcome(
        parts=len(finished),
        cache_hits=cache_hits,
        computed_texts=sum(int(result.get("computed_texts", 0)) for result in results),
        batches_run=sum(int(result.get("batches_run", 0)) for result in results),
    )


def _wait_for(context: "JobContext[Any]", parts: list[Job]) -> None:
    """Run queued parts here and wait for the others, reporting the parts' summed progress,
    until every part has succeeded; a part that failed fails the parent with its error."""
    from workers import runner  # the runner imports this module's callers

    worker = context.runtime
    total = sum(_size(part) for part in parts)
    reported: list[Any] = [None, 0.0]  # the last (done) reported, and when

    def report(parts: list[Job], force: bool) -> None:
        done = sum(_done(part) for part in parts)
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
            report(_read_parts(context), force=False)
        except (AttemptSuperseded, JobCancelled):
            pass  # the part runs on; the parent stops once it is back in its own loop

    worker.on_part_progress = while_running_a_part
    try:
        while True:
            parts = _read_parts(context)
            report(parts, force=True)
            ended = [part for part in parts if part.status in ("failed", "cancelled")]
            if ended:
                _fail_with(ended[0], len(parts))
            if all(part.status == "succeeded" for part in parts):
                return
            queued = [part for part in parts if part.status == "queued"]
            # the last queued part: RQ's workers take theirs from the front of the queue
            if not (queued and runner.run_part(worker, queued[-1].id)):
                time.sleep(POLL_S)
    finally:
        worker.on_part_progress = None


def _fail_with(part: Job, count: int) -> None:
    error = part.error or {}
    number = int(part.params.get("part", 0))
    if part.status == "cancelled":
        code, message = "part_cancelled", f"part {number + 1} of {count} ({part.id}) was cancelled"
    else:
        code = str(error.get("code", "internal"))
        message = f"part {number + 1} of {count} ({part.id}) failed: {error.get('message', '')}"
    raise JobFailed(code, message, part_id=part.id, part=number, part_details=error.get("details", {}))
