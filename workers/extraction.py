"""The `extraction` job: hidden states of texts at layers, shaped (texts, layers, hidden),
written in place as one safetensors file while they come from the content cache or are
computed (`workers/state_cache.py`)."""

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import update

from app.inputs.prompt_formats import render, rendered_rows
from app.job_kinds import ExtractionParameters, ExtractionPartParameters
from app.registry.datasets import rows_at
from app.registry.tables import Adapter, Dataset, Extraction, Model, utcnow
from workers import arrays, fanout
from workers.context import subject_row
from workers.errors import JobFailed
from workers.state_cache import STATES_TENSOR, StatesRequest, cached_states

if TYPE_CHECKING:
    from workers.context import JobContext


@dataclass(frozen=True)
class ExtractionInputs:
    """An extraction's row, its texts as the model reads them, and what its states depend on."""

    extraction: Extraction
    dataset: Dataset | None
    texts: list[str]
    request: StatesRequest


def load_inputs(
    context: "JobContext[Any]", extraction_id: str, inline_texts: list[str] | None, rows: list[int] | None = None
) -> ExtractionInputs:
    """The extraction's inputs. Of a dataset, only the texts of its rows at positions `rows`,
    in that order (a part reads just its own rows; `run` reads its windows itself)."""
    worker = context.runtime
    store, sessions = worker.artifacts, worker.sessions
    with sessions() as session:
        extraction = subject_row(session, Extraction, extraction_id, "extraction")
        model = subject_row(session, Model, extraction.model_id, "model")
        dataset = session.get(Dataset, extraction.dataset_id) if extraction.dataset_id else None
        adapter = session.get(Adapter, extraction.adapter_id) if extraction.adapter_id else None
    if extraction.adapter_id and adapter is None:
        raise JobFailed("not_found", f"adapter {extraction.adapter_id} was deleted")
    if dataset is not None:
        try:
            texts = rendered_rows(rows_at(store, dataset, rows or []), dataset.kind, extraction.prompt_format)
        except IndexError as exc:
            raise JobFailed("invalid_parameters", f"extraction {extraction.id}: {exc}") from None
    elif inline_texts is not None:
        texts = render(extraction.prompt_format, "text", inline_texts)
    else:
        raise JobFailed("invalid_parameters", f"extraction {extraction.id} has neither a dataset nor texts")
    request = StatesRequest(
        model,
        adapter,
        list(extraction.layers),
        extraction.token_position,
        extraction.max_length,
        extraction.prompt_format,
    )
    return ExtractionInputs(extraction=extraction, dataset=dataset, texts=list(texts), request=request)


def run(context: "JobContext[ExtractionParameters]") -> dict[str, Any]:
    """The extraction's states, written window by window: a dataset's rows are read, planned
    and written EXTRACTION_WINDOW_TEXTS at a time, each window through the content cache into
    its rows of the result file, so the worker's memory does not grow with the dataset."""
    worker = context.runtime
    store, sessions = worker.artifacts, worker.sessions
    inputs = load_inputs(context, context.params.extraction_id, context.params.texts)
    extraction, dataset, request = inputs.extraction, inputs.dataset, inputs.request
    model, layers = request.model, request.layers
    parts = None
    if dataset is not None:
        texts_between = fanout.dataset_texts(context, dataset, extraction.prompt_format)
        count, window = dataset.rows, worker.settings.extraction_window_texts
        # many texts are spread over every live worker in parts (`workers/fanout.py`); the
        # parts fill the cache, and the windows below read them from it
        parts = fanout.spread_extraction(context, request, dataset, texts_between)
    else:
        inline = inputs.texts
        count, window = len(inline), max(1, len(inline))

        def texts_between(start: int, stop: int) -> list[str]:
            return inline[start:stop]

    artifact = f"extractions/{extraction.id}/hidden_states.safetensors"
    metadata = {"layers": json.dumps(layers), "token_position": extraction.token_position, "model_id": model.id}
    truncated_count = cache_hits = computed_texts = batches_run = 0
    # the result is written in place as it is computed: never held whole in memory
    context.clear_earlier_attempts(artifact)
    assembling = time.monotonic()
    with store.temporary_path(artifact) as path:
        arrays.allocate(path, STATES_TENSOR, (count, len(layers), model.hidden_size), metadata)  # unmapped at once
        for start in range(0, count, window):
            stop = min(start + window, count)
            texts = texts_between(start, stop)
            if len(texts) != stop - start:
                raise JobFailed("invalid_parameters", f"dataset {extraction.dataset_id} has fewer rows than it says")

            def report(stage: str, done: int, total: int | None, start: int = start, stop: int = stop) -> None:
                within = (stop - start) * done // total if total else 0
                context.progress(stage, start + within, count)

            out = arrays.mapped_rows(path, STATES_TENSOR, start, stop)
            shard = extraction.id if start == 0 else f"{extraction.id}-r{start}"
            result = cached_states(context, request, texts, shard_name=shard, out=out, progress=report)
            del out
            truncated_count += sum(result.truncated)
            cache_hits += result.cache_hits
            computed_texts += result.computed_texts
            batches_run += result.batches_run
        context.progress("writing", count, count)
        shape = [count, len(layers), model.hidden_size]
    assembling_s = time.monotonic() - assembling
    if parts is not None:
        cache_hits = parts.cache_hits
    with sessions() as session, session.begin():
        session.execute(
            update(Extraction)
            .where(Extraction.id == extraction.id)
            .values(
                artifact=artifact,
                shape=shape,
                dtype="float32",
                truncated_count=truncated_count,
                cache_hits=cache_hits,
                finished_at=utcnow(),
            )
        )
    figures = {
        "extraction_id": extraction.id,
        "shape": shape,
        "truncated_count": truncated_count,
        "cache_hits": cache_hits,
        "computed_texts": computed_texts,
        "batches_run": batches_run,
        "model_loads": worker.models.loads,
        "adapter_loads": worker.models.adapter_loads,
    }
    if parts is not None:  # what the parts computed, and what assembling computed (nothing, unless evicted)
        figures |= {
            "parts": parts.parts,
            "computed_texts": parts.computed_texts + computed_texts,
            "batches_run": parts.batches_run + batches_run,
            # where a split extraction's time went: planning its parts, waiting for them
            # (running some here), reading the result out of the cache
            "seconds": {
                "planning": round(parts.planning_s, 3),
                "parts": round(parts.parts_s, 3),
                "assembling": round(assembling_s, 3),
            },
        }
    return figures


def run_part(context: "JobContext[ExtractionPartParameters]") -> dict[str, Any]:
    """An `extraction_part` an earlier version queued: the states of its texts into the content cache, planned into the
    batches its parent planned for them; no array is kept."""
    params = context.params
    if params.indices and min(params.indices) < 0:
        raise JobFailed("invalid_parameters", f"part {params.part} names texts the extraction does not have")
    inputs = load_inputs(context, params.extraction_id, None, rows=params.indices)
    if inputs.dataset is None:
        raise JobFailed("invalid_parameters", f"extraction {params.extraction_id} has no dataset to compute parts of")
    texts = inputs.texts
    result = cached_states(
        context,
        inputs.request,
        texts,
        shard_name=context.job_id,
        fill_only=True,
        token_budget=params.token_budget,
        max_batch_size=params.max_batch_size,
    )
    return {
        "extraction_id": params.extraction_id,
        "part": params.part,
        "texts": len(texts),
        "cache_hits": result.cache_hits,
        "computed_texts": result.computed_texts,
        "batches_run": result.batches_run,
    }
