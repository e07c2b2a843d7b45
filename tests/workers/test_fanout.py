"""One extraction spread over every live worker (`workers/fanout.py`): parts on the shared
queue, taken by every worker, the parent working on parts too, a result byte for byte the
same as a run in one piece, progress summed, cancel and lost workers handled part by part."""

import random
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import redis
from sqlalchemy import delete

from app import broker
from app.job_kinds import NoParameters
from app.registry.tables import CachedText, CacheShard, Job, utcnow
from app.settings import Settings
from tests.api.test_jobs import run_queued_jobs
from tests.api.test_models import register
from tests.api.test_probes import upload_rows
from tests.conftest import start_worker, stop_process, wait_for_job, wait_until
from workers import fanout, runtime
from workers.context import JobContext
from workers.errors import JobFailed
from workers.fanout import cut_plan
from workers.hidden_states import packed_size, plan_batches
from workers.state_cache import BatchPlan

WORDS = ["Paris", "city", "France", "of", "is", "the", "Tokyo", "Japan", "river", "north", "capital", "large"]


def statements(count: int, seed: int = 7) -> list[str]:
    """Distinct texts of lengths from a few tokens to a few dozen, so batches differ in size."""
    rng = random.Random(seed)
    return [f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 24))) for i in range(count)]


def split(settings: Settings, **more: Any) -> Settings:
    """Settings that split an extraction into parts of about `part_texts` texts, in small batches."""
    return settings.model_copy(update={"extraction_part_texts": 60, "extraction_max_batch_size": 4} | more)


@pytest.fixture
def dataset_and_model(api: Any, tiny_llama: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    dataset = upload_rows(api, [{"text": text, "label": i % 2} for i, text in enumerate(statements(480))], "many")
    return dataset, register(api, tiny_llama).json()


def extract(api: Any, dataset: dict[str, Any], model: dict[str, Any]) -> tuple[str, str]:
    """Submit an extraction of the dataset at layers 1 and 2; its job's and its own id."""
    created = api.post("/v1/extractions", json={"model": model["id"], "layers": [1, 2], "dataset": dataset["id"]})
    assert created.status_code == 202, created.json()
    return created.json()["job"]["id"], created.json()["extraction"]["id"]


def result_file(api: Any, extraction_id: str) -> bytes:
    response = api.get(f"/v1/extractions/{extraction_id}/hidden-states", params={"format": "safetensors"})
    assert response.status_code == 200, response.json()
    return bytes(response.content)


def unsplit_reference(
    api: Any,
    settings: Settings,
    dataset: dict[str, Any],
    model: dict[str, Any],
    batch_size: int = 4,
    computed: int | None = None,
) -> bytes:
    """The result file of the extraction run in one piece (EXTRACTION_PART_TEXTS above the
    text count) by one worker in this process, on an empty cache; the cache is emptied again
    after, so the split run computes every text."""
    job_id, extraction_id = extract(api, dataset, model)
    one_piece = {"extraction_part_texts": 10**6, "extraction_max_batch_size": batch_size}
    run_queued_jobs(settings.model_copy(update=one_piece))
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    assert "parts" not in job["result"] and job["parts"] is None
    assert job["result"]["computed_texts"] == (dataset["rows"] if computed is None else computed)
    with runtime.build_runtime(settings).sessions() as session, session.begin():
        session.execute(delete(CachedText))
        session.execute(delete(CacheShard))
    return result_file(api, extraction_id)


def job_rows(settings: Settings, *job_ids: str) -> list[Job]:
    with runtime.build_runtime(settings).sessions() as session:
        return [session.get_one(Job, job_id) for job_id in job_ids]


@contextmanager
def workers(settings: Settings, *names: str) -> Iterator[dict[str, Any]]:
    started: dict[str, Any] = {}
    try:
        for name in names:
            started[name] = start_worker(settings, name)
        yield started
    finally:
        for process in started.values():
            stop_process(process)


def test_a_run_of_whole_batches_is_planned_into_the_same_batches_again() -> None:
    """What makes a split result the same bytes: each part, planned on its own, runs exactly
    the batches of the plan for all texts. The parts are as many as parts of `part_texts` it
    takes, about equal in padded tokens (the first hold the longest texts), but the last cut
    in two halves, so that workers taking parts in order finish close together."""
    rng = random.Random(3)
    lengths = [rng.randint(1, 40) for _ in range(500)]
    missing = list(range(0, 1000, 2))  # positions of the texts to compute in a longer list
    whole = plan_batches(lengths, token_budget=120, max_batch_size=8)
    plan = BatchPlan(
        missing=missing,
        batches=whole,
        cache_hits=0,
        lengths=lengths,
        missing_shas=[f"{position:064x}" for position in missing],
        token_budget=120,
        max_batch_size=8,
    )
    parts = cut_plan(plan, part_texts=45)
    assert sorted(position for part in parts for position in part) == missing
    assert len(parts) == 13  # ⌈500 / 45⌉, the last in two
    expected = [[missing[index] for index in batch] for batch in whole]
    replanned = []
    for part in parts:
        part_lengths = [lengths[missing.index(position)] for position in part]
        batches = plan_batches(part_lengths, 120, 8)
        replanned += [[part[index] for index in batch] for batch in batches]
    assert replanned == expected

    def cost(part: list[int]) -> int:
        batches = [batch for batch in expected if batch[0] in part]
        return sum(len(batch) * max(lengths[missing.index(position)] for position in batch) for batch in batches)

    total, biggest_batch = sum(cost(part) for part in parts), 8 * 40
    assert all(abs(cost(part) - total / 12) <= biggest_batch for part in parts[:-2])
    assert all(abs(cost(part) - total / 24) <= biggest_batch for part in parts[-2:])
    assert len(parts[0]) < len(parts[-3])  # fewer of the longest texts, as many tokens


def test_a_packed_plan_is_cut_by_the_tokens_its_batches_compute() -> None:
    """A packed batch of one long text and many short ones computes a row for the long one
    and a row for the rest, far fewer tokens than rows × longest: parts of a packed plan are
    balanced by what their batches compute."""
    mixed, even = [40] + [5] * 7, [10] * 8  # packed: 2 rows of 40 and 8 rows of 10, 80 tokens each
    batches: list[list[int]] = []
    lengths: list[int] = []
    for number in range(48):
        batches.append(list(range(len(lengths), len(lengths) + 8)))
        lengths += mixed if number < 24 else even  # the longest texts first, as a plan has them
    assert packed_size(mixed) == packed_size(even) == 80

    def cut(packed: bool) -> list[int]:
        plan = BatchPlan(
            missing=list(range(len(lengths))),
            batches=batches,
            cache_hits=0,
            lengths=lengths,
            missing_shas=[f"{index:064x}" for index in range(len(lengths))],
            token_budget=400,
            max_batch_size=8,
            packed=packed,
        )
        return [len(part) // 8 for part in cut_plan(plan, part_texts=64)]  # batches per part

    # 48 batches of equal work in 6 parts, the last two halves: 8 batches a part, 4 in each half
    assert cut(packed=True) == [8, 8, 8, 8, 8, 4, 4]
    # weighed as rows × longest, a mixed batch (320) counts 4 times an even one (80): parts of
    # 1,600 take 5 mixed batches each, the fifth the last 4 and 4 even ones, the halves 10 even
    assert cut(packed=False) == [5, 5, 5, 5, 8, 10, 10]


@pytest.mark.slow
def test_a_split_extraction_runs_on_both_workers_and_equals_one_run_in_one_piece(
    api: Any, settings: Settings, dataset_and_model: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    dataset, model = dataset_and_model
    reference = unsplit_reference(api, settings, dataset, model)
    spread = split(settings)
    names = [f"left-{settings.queue_prefix}", f"right-{settings.queue_prefix}"]
    with workers(spread, *names):
        job_id, extraction_id = extract(api, dataset, model)
        seen: list[dict[str, Any]] = []

        def finished() -> bool:
            job = api.get(f"/v1/jobs/{job_id}").json()
            seen.append(job["progress"])
            return job["status"] in ("succeeded", "failed", "cancelled")

        wait_until(finished, 180, "the split extraction to finish", interval=0.05)
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    assert result_file(api, extraction_id) == reference

    texts = dataset["rows"]
    parts = job["parts"]
    rows = job_rows(settings, *(part["id"] for part in parts))
    assert len(parts) == job["result"]["parts"] > 2
    assert {part["status"] for part in parts} == {"succeeded"}
    # each text computed by exactly one part, each part a job on the shared queue under the parent
    assert sorted(index for row in rows for index in row.params["rows"]) == list(range(texts))
    assert {(row.parent_id, row.kind, row.queue) for row in rows} == {
        (job_id, "states_part", broker.default_queue(settings))
    }
    assert {part["worker"] for part in parts} == set(names)  # both workers ran parts
    assert job["result"]["computed_texts"] == sum((row.result or {})["computed_texts"] for row in rows) == texts
    assert job["result"]["cache_hits"] == 0
    # the parent's progress: the parts' summed, over every text, ending with every text done
    forward = [point for point in seen if point["stage"] == "forward"]
    assert forward and all(point["total"] == texts and 0 <= point["done"] <= texts for point in forward)
    assert (job["progress"]["done"], job["progress"]["total"]) == (texts, texts)

    # parts are jobs of their own in listings, and only the parent can be cancelled
    listed = api.get("/v1/jobs", params={"kind": "states_part"}).json()["items"]
    assert sorted(item["id"] for item in listed) == sorted(part["id"] for part in parts)
    assert all(item["parent_id"] == job_id for item in listed)
    refused = api.post(f"/v1/jobs/{parts[0]['id']}/cancel")
    assert refused.status_code == 409 and job_id in refused.json()["error"]["message"]
    assert refused.json()["error"]["details"]["parent_id"] == job_id


def test_one_worker_alone_runs_every_part_itself(
    api: Any, settings: Settings, dataset_and_model: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    """The parent takes queued parts with the runner's own start, so a lone worker never waits
    for a part nobody runs; RQ's copies of those parts are skipped."""
    dataset, model = dataset_and_model
    reference = unsplit_reference(api, settings, dataset, model)
    job_id, extraction_id = extract(api, dataset, model)
    run_queued_jobs(split(settings, worker_name="alone"))
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    assert {(part["status"], part["worker"], part["attempts"]) for part in job["parts"]} == {("succeeded", "alone", 1)}
    assert result_file(api, extraction_id) == reference


@pytest.mark.slow
def test_cancelling_the_parent_cancels_every_part(
    api: Any, settings: Settings, dataset_and_model: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    dataset, model = dataset_and_model
    slow = split(settings, extraction_part_texts=120, extraction_max_batch_size=1)
    with workers(slow, f"one-{settings.queue_prefix}", f"two-{settings.queue_prefix}"):
        job_id, extraction_id = extract(api, dataset, model)
        wait_until(
            lambda: any(
                part["status"] == "running" and part["progress"]["done"] > 0
                for part in api.get(f"/v1/jobs/{job_id}").json()["parts"] or []
            ),
            120,
            "a part to make progress",
            interval=0.05,
        )
        assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        job = wait_for_job(api, job_id)
        wait_until(
            lambda: all(part["status"] == "cancelled" for part in api.get(f"/v1/jobs/{job_id}").json()["parts"]),
            60,
            "every part to stop",
        )
    assert job["status"] == "cancelled"
    rows = job_rows(settings, *(part["id"] for part in api.get(f"/v1/jobs/{job_id}").json()["parts"]))
    assert len(rows) == 5  # four parts, the last in two
    assert all(row.finished_at is not None and row.result is None for row in rows)
    assert api.get(f"/v1/extractions/{extraction_id}/hidden-states").status_code == 409


@pytest.mark.slow
def test_a_part_whose_worker_is_killed_is_retried_alone_and_the_result_is_unchanged(
    api: Any, settings: Settings, dataset_and_model: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    dataset, model = dataset_and_model
    reference = unsplit_reference(api, settings, dataset, model, batch_size=1)
    slow = split(settings, extraction_part_texts=120, extraction_max_batch_size=1, heartbeat_ttl_s=2.0)
    names = [f"first-{settings.queue_prefix}", f"second-{settings.queue_prefix}"]
    with workers(slow, *names) as started:
        job_id, extraction_id = extract(api, dataset, model)
        parent_worker = wait_until(lambda: api.get(f"/v1/jobs/{job_id}").json()["worker"], 120, "the parent to start")
        other = next(name for name in names if name != parent_worker)

        def a_part_of_the_other_worker_in_progress() -> str | None:
            for part in api.get(f"/v1/jobs/{job_id}").json()["parts"] or []:
                if part["worker"] == other and part["status"] == "running" and part["progress"]["done"] > 0:
                    return str(part["id"])
            return None

        doomed_part = wait_until(a_part_of_the_other_worker_in_progress, 120, "the other worker to run a part", 0.02)
        started[other].send_signal(signal.SIGKILL)
        started[other].wait(10)
        job = wait_for_job(api, job_id, timeout=180)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 1  # the parent kept waiting
    attempts = {part["id"]: (part["attempts"], part["worker"]) for part in job["parts"]}
    assert attempts[doomed_part] == (2, parent_worker)  # taken back and run again, here by the survivor
    assert all(count == 1 for part_id, (count, _) in attempts.items() if part_id != doomed_part)
    assert result_file(api, extraction_id) == reference
    connection = redis.Redis.from_url(settings.resolved_redis_url)
    assert not connection.exists(broker.heartbeat_key(settings, other))


def add_parent_with_parts(settings: Settings, parts: list[dict[str, Any]]) -> list[str]:
    """A running `extraction` job of `parent-worker` and its `states_part` rows, each part's
    `values` as given; the parts' ids."""
    with runtime.build_runtime(settings).sessions() as session, session.begin():
        shared = broker.default_queue(settings)
        session.add(
            Job(
                id="job_parent",
                kind="extraction",
                params={"extraction_id": "ext_x"},
                status="running",
                queue=shared,
                worker="parent-worker",
                attempts=1,
                started_at=utcnow() - timedelta(seconds=60),
            )
        )
        session.flush()
        for number, values in enumerate(parts):
            params = {
                "group": "rows-0",
                "part": number,
                "dataset_id": "dst_x",
                "prompt_format": "raw",
                "model_id": "mdl_x",
                "layers": [1],
                "token_position": "last",
                "rows": [number],
                "token_budget": 8,
                "max_batch_size": 1,
            }
            session.add(
                Job(
                    id=f"job_part{number}",
                    kind="states_part",
                    params=params,
                    queue=shared,
                    parent_id="job_parent",
                    **values,
                )
            )
    return [f"job_part{number}" for number in range(len(parts))]


def test_a_failed_part_fails_its_parent_with_its_error_and_the_other_parts_are_cancelled(
    api: Any, settings: Settings
) -> None:
    failure = {"code": "empty_text", "message": "text 0 has no tokens", "details": {"text_index": 0}}
    ids = add_parent_with_parts(
        settings,
        [
            {"status": "succeeded", "attempts": 1, "result": {"computed_texts": 1}},
            {"status": "failed", "attempts": 1, "error": failure},
            {"status": "queued"},
        ],
    )
    parent = runtime.build_runtime(settings.model_copy(update={"worker_name": "parent-worker"}))
    context = JobContext(job_id="job_parent", params=NoParameters(), runtime=parent, attempt=1)
    with pytest.raises(JobFailed) as failed:
        fanout.spread_states(context, cast(Any, None), ["a", "b", "c"], cast(Any, None), "rows-0")
    assert failed.value.code == "empty_text"
    assert failed.value.message == f"part 2 of 3 ({ids[1]}) failed: text 0 has no tokens"
    assert failed.value.details == {"part_id": ids[1], "part": 1, "part_details": {"text_index": 0}}
    statuses = [api.get(f"/v1/jobs/{part_id}").json()["status"] for part_id in ids]
    assert statuses == ["succeeded", "failed", "cancelled"]  # the queued part never runs


def test_a_part_a_worker_runs_inside_its_job_is_not_taken_for_lost(api: Any, settings: Settings) -> None:
    """The worker's heartbeat names the parent as its `current_job` and the part it runs in
    the parent's place as its `current_part`: neither is suspect, a part of a dead worker is."""
    ids = add_parent_with_parts(
        settings,
        [
            {
                "status": "running",
                "worker": "parent-worker",
                "attempts": 1,
                "started_at": utcnow() - timedelta(seconds=60),
            },
            {
                "status": "running",
                "worker": "gone-worker",
                "attempts": 1,
                "started_at": utcnow() - timedelta(seconds=60),
            },
        ],
    )
    connection = redis.Redis.from_url(settings.resolved_redis_url)
    broker.beat(
        connection,
        settings,
        {"name": "parent-worker", "device": "cpu", "current_job": "job_parent", "current_part": ids[0]},
    )
    assert runtime.build_runtime(settings).recover_jobs_of_lost_workers(suspect_for_s=0) == [ids[1]]
    parent = api.get("/v1/jobs/job_parent").json()
    assert parent["status"] == "running"
    assert [(part["id"], part["status"]) for part in parent["parts"]] == [(ids[0], "running"), (ids[1], "queued")]


def test_a_retried_parent_goes_on_with_the_parts_it_created(api: Any, settings: Settings) -> None:
    """Its second attempt finds the parts by `parent_id`, plans nothing and creates none."""
    add_parent_with_parts(
        settings,
        [
            {"status": "succeeded", "attempts": 2, "result": {"computed_texts": 1, "batches_run": 1}},
            {"status": "succeeded", "attempts": 1, "result": {"computed_texts": 1, "batches_run": 1}},
        ],
    )
    with runtime.build_runtime(settings).sessions() as session, session.begin():
        session.get_one(Job, "job_parent").attempts = 2
    parent = runtime.build_runtime(settings.model_copy(update={"worker_name": "parent-worker"}))
    context = JobContext(job_id="job_parent", params=NoParameters(), runtime=parent, attempt=2)
    outcome = fanout.spread_states(context, cast(Any, None), ["a", "b", "c"], cast(Any, None), "rows-0")
    assert outcome == fanout.PartsOutcome(parts=2, cache_hits=1, computed_texts=2, batches_run=2)
    assert len(api.get("/v1/jobs", params={"kind": "states_part"}).json()["items"]) == 2
    assert api.get("/v1/jobs/job_parent").json()["progress"] == {
        "stage": "forward",
        "done": 2,
        "total": 2,
        "details": None,
    }


def windows(settings: Settings, **more: Any) -> Settings:
    """`split` settings that also read, plan and write an extraction 100 rows at a time."""
    return split(settings, extraction_window_texts=100, **more)


def test_an_extraction_read_in_windows_and_split_equals_the_same_windows_in_one_piece(
    api: Any, settings: Settings, dataset_and_model: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    """Each window of rows is planned on its own, into parts of its own group; the result is
    the bytes of a one-worker run over the same windows, and within 1e-5 of a run in one
    window (batches differ, so the sums do in their last bits)."""
    dataset, model = dataset_and_model
    reference = unsplit_reference(api, windows(settings), dataset, model)
    one_window = unsplit_reference(api, settings, dataset, model)
    job_id, extraction_id = extract(api, dataset, model)
    run_queued_jobs(windows(settings, worker_name="alone"))
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    assert result_file(api, extraction_id) == reference
    rows = job_rows(settings, *(part["id"] for part in job["parts"]))
    groups: dict[str, list[int]] = {}
    for row in rows:
        groups.setdefault(row.params["group"], []).extend(row.params["rows"])
    assert sorted(groups) == sorted(f"rows-{start}" for start in range(0, 480, 100))
    for group, positions in groups.items():
        start = int(group.removeprefix("rows-"))
        assert sorted(positions) == list(range(start, min(start + 100, 480)))
    assert job["result"]["computed_texts"] == 480

    def array(content: bytes) -> Any:
        from safetensors.numpy import load

        return load(content)["hidden_states"]

    assert np.allclose(array(result_file(api, extraction_id)), array(one_window), atol=1e-5)


def test_a_text_repeated_in_a_later_window_is_computed_once_and_read_from_the_cache(
    api: Any, settings: Settings, tiny_llama: Path
) -> None:
    texts = statements(300)
    texts[250] = texts[10]  # a repeat in the third window of the first
    texts[251] = texts[150]  # and of the second
    dataset = upload_rows(api, [{"text": text, "label": i % 2} for i, text in enumerate(texts)], "repeats")
    model = register(api, tiny_llama).json()
    reference = unsplit_reference(api, windows(settings), dataset, model, computed=298)
    job_id, extraction_id = extract(api, dataset, model)
    run_queued_jobs(windows(settings, worker_name="alone"))
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["computed_texts"] == 298  # every distinct text once, by the parts
    planned = [row for part in job_rows(settings, *(p["id"] for p in job["parts"])) for row in part.params["rows"]]
    assert 250 not in planned and 251 not in planned and len(planned) == 298
    assert result_file(api, extraction_id) == reference


def test_a_probe_runs_states_are_spread_over_parts_and_train_the_same_probes(
    api: Any, settings: Settings, dataset_and_model: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    """Probe runs (as comparisons, evaluations and transfers) read their states through the
    same parts: a group named by the run, rows of its dataset."""
    dataset, model = dataset_and_model
    body = {"model": model["id"], "dataset": dataset["id"], "layers": [1, 2], "method": ["logistic"], "seed": 3}

    def probes(part_texts: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        created = api.post("/v1/probes", json=body)
        assert created.status_code == 202, created.json()
        run_queued_jobs(split(settings, extraction_part_texts=part_texts, worker_name="alone"))
        job = api.get(f"/v1/jobs/{created.json()['job']['id']}").json()
        assert job["status"] == "succeeded", job["error"]
        run = api.get(f"/v1/probe-runs/{job['result']['run_id']}").json()
        with runtime.build_runtime(settings).sessions() as session, session.begin():
            session.execute(delete(CachedText))
            session.execute(delete(CacheShard))
        return job, run["probes"]

    whole_job, whole = probes(10**6)
    split_job, spread = probes(60)
    assert whole_job["parts"] is None
    rows = job_rows(settings, *(part["id"] for part in split_job["parts"]))
    assert len(rows) == 9 and {row.kind for row in rows} == {"states_part"}
    assert {row.params["group"] for row in rows} == {split_job["result"]["run_id"]}
    assert sorted(index for row in rows for index in row.params["rows"]) == list(range(480))
    assert [(p["layer"], p["validation"], p["metrics"]) for p in spread] == [
        (p["layer"], p["validation"], p["metrics"]) for p in whole
    ]


def test_the_texts_planned_in_earlier_windows_are_the_ones_found_again() -> None:
    rng = random.Random(7)
    pool = [f"{rng.getrandbits(256):064x}" for _ in range(3000)]
    planned, reference = fanout.Planned(), set()
    for _ in range(12):  # windows that overlap earlier ones and repeat texts within themselves
        window = [rng.choice(pool) for _ in range(400)]
        assert fanout.Planned.prefixes(window).dtype == np.uint64
        assert planned.holds(window).tolist() == [sha in reference for sha in window]
        planned.add(window)
        reference.update(window)
    assert planned.keys.tolist() == sorted({int(sha[:16], 16) for sha in reference})
    assert planned.holds([]).tolist() == []
