"""The `extraction` job: hidden states of texts at layers, shaped (texts, layers, hidden),
written in place as one safetensors file while they come from the content cache or are
computed (`workers/state_cache.py`)."""

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import update

from app.inputs.prompt_formats import render, rendered_rows
from app.job_kinds import ExtractionParameters, ExtractionPartParameters
from app.registry.datasets import read_rows, rows_at
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
    """The extraction's inputs; with `rows`, only the texts of the dataset's rows at those
    positions, in that order (a part reads just its own rows, whatever the dataset's size)."""
    worker = context.runtime
    store, sessions = worker.artifacts, worker.sessions
    with sessions() as session:
        extraction = subject_row(session, Extraction, extraction_id, "extraction")
        model = subject_row(session, Model, extraction.model_id, "model")
        dataset = session.get(Dataset, extraction.dataset_id) if extraction.dataset_id else None
        adapter = session.get(Adapter, extraction.adapter_id) if extraction.adapter_id else None
    if extraction.adapter_id and adapter is None:
        raise JobFailed("not_found", f"adapter {extraction.adapter_id} was deleted")
    if dataset is not None and rows is not None:
        try:
            texts = rendered_rows(rows_at(store, dataset, rows), dataset.kind, extraction.prompt_format)
        except IndexError as exc:
            raise JobFailed("invalid_parameters", f"extraction {extraction.id}: {exc}") from None
    elif dataset is not None:
        texts = rendered_rows(read_rows(store, dataset), dataset.kind, extraction.prompt_format)
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
    worker = context.runtime
    store, sessions = worker.artifacts, worker.sessions
    inputs = load_inputs(context, context.params.extraction_id, context.params.texts)
    extraction, texts, request = inputs.extraction, inputs.texts, inputs.request
    model, layers = request.model, request.layers
    # a dataset's texts are spread over every live worker in parts when they are many
    # (`workers/fanout.py`); the parts fill the cache, and the result is assembled from it
    parts = None
    if inputs.dataset is not None and worker.settings.extraction_cache:
        parts = fanout.compute_in_parts(context, request, texts, extraction.id)
    artifact = f"extractions/{extraction.id}/hidden_states.safetensors"
    metadata = {"layers": json.dumps(layers), "token_position": extraction.token_position, "model_id": model.id}
    # the result is written in place as it is computed: never held whole in memory
    context.clear_earlier_attempts(artifact)
    with store.temporary_path(artifact) as path:
        out = arrays.allocate(path, STATES_TENSOR, (len(texts), len(layers), model.hidden_size), metadata)
        result = cached_states(context, request, texts, shard_name=extraction.id, out=out)
        context.progress("writing", len(texts), len(texts))
        shape = list(out.shape)
        del out
    truncated_count = sum(result.truncated)
    cache_hits = result.cache_hits if parts is None else parts.cache_hits
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
        "computed_texts": result.computed_texts,
        "batches_run": result.batches_run,
        "model_loads": worker.models.loads,
        "adapter_loads": worker.models.adapter_loads,
    }
    if parts is not None:  # what the parts computed, and what assembling computed (nothing, unless evicted)
        figures |= {
            "parts": parts.parts,
            "computed_texts": parts.computed_texts + result.computed_texts,
            "batches_run": parts.batches_run + result.batches_run,
        }
    return figures


def run_part(context: "JobContext[ExtractionPartParameters]") -> dict[str, Any]:
    """An `extraction_part`: the states of its texts into the content cache, planned into the
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
