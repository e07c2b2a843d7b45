"""The `extraction` job: hidden states of texts at layers, shaped (texts, layers, hidden),
written in place as one safetensors file while they come from the content cache or are
computed (`workers/state_cache.py`)."""

import json
from typing import TYPE_CHECKING, Any

from sqlalchemy import update

from app.inputs.prompt_formats import render, rendered_rows
from app.job_kinds import ExtractionParameters
from app.registry.datasets import read_rows
from app.registry.tables import Adapter, Dataset, Extraction, Model, utcnow
from workers import arrays
from workers.context import subject_row
from workers.errors import JobFailed
from workers.state_cache import STATES_TENSOR, StatesRequest, cached_states

if TYPE_CHECKING:
    from workers.context import JobContext


def run(context: "JobContext[ExtractionParameters]") -> dict[str, Any]:
    worker = context.runtime
    store, sessions = worker.artifacts, worker.sessions
    with sessions() as session:
        extraction = subject_row(session, Extraction, context.params.extraction_id, "extraction")
        model = subject_row(session, Model, extraction.model_id, "model")
        dataset = session.get(Dataset, extraction.dataset_id) if extraction.dataset_id else None
        adapter = session.get(Adapter, extraction.adapter_id) if extraction.adapter_id else None
    if extraction.adapter_id and adapter is None:
        raise JobFailed("not_found", f"adapter {extraction.adapter_id} was deleted")
    if dataset is not None:
        texts = rendered_rows(read_rows(store, dataset), dataset.kind, extraction.prompt_format)
    elif context.params.texts is not None:
        texts = render(extraction.prompt_format, "text", context.params.texts)
    else:
        raise JobFailed("invalid_parameters", f"extraction {extraction.id} has neither a dataset nor texts")
    layers = list(extraction.layers)
    request = StatesRequest(
        model, adapter, layers, extraction.token_position, extraction.max_length, extraction.prompt_format
    )
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
    with sessions() as session, session.begin():
        session.execute(
            update(Extraction)
            .where(Extraction.id == extraction.id)
            .values(
                artifact=artifact,
                shape=shape,
                dtype="float32",
                truncated_count=truncated_count,
                cache_hits=result.cache_hits,
                finished_at=utcnow(),
            )
        )
    return {
        "extraction_id": extraction.id,
        "shape": shape,
        "truncated_count": truncated_count,
        "cache_hits": result.cache_hits,
        "computed_texts": result.computed_texts,
        "batches_run": result.batches_run,
        "model_loads": worker.models.loads,
        "adapter_loads": worker.models.adapter_loads,
    }
