"""Comparison requests: a base model and its adapters on the same texts and layers. An
adapter imported for another dtype or quantization of the same weights is refused, or run
and flagged, as the request says — never mixed silently."""

from sqlalchemy.orm import Session

from app.errors import invalid_field, not_found
from app.inputs.prompt_formats import data_kind
from app.registry.datasets import labelled_dataset
from app.registry.models import checked_model_and_adapter, checked_prompt_format, get_model, resolve_layers
from app.registry.tables import Adapter, Comparison, new_id
from app.schemas.comparisons import ComparisonCreate


def _precision(model_dtype: str, quantization: str | None) -> str:
    return f"{model_dtype}{'/' + quantization if quantization else ''}"


def new_comparison(session: Session, request: ComparisonCreate, job_id: str) -> Comparison:
    model, _ = checked_model_and_adapter(session, request.model, None)
    dataset = labelled_dataset(session, request.dataset)
    prompt_format = checked_prompt_format(model, request.prompt_format, data_kind(dataset.kind))
    if len(set(request.adapters)) != len(request.adapters):
        raise invalid_field("adapters", "an adapter is listed twice")
    if abs(request.split.train + request.split.validation + request.split.test - 1) > 1e-6:
        raise invalid_field("split", "train, validation and test must add up to 1")
    mixed = []
    for adapter_id in request.adapters:
        adapter = session.get(Adapter, adapter_id)
        if adapter is None:
            raise not_found("adapter", adapter_id)
        base = get_model(session, adapter.base_model_id)
        if base.source != model.source or base.revision != model.revision:
            raise invalid_field(
                "adapters", f"adapter {adapter_id} belongs to {base.source}, not {model.source}", adapter=adapter_id
            )
        if (base.dtype, base.quantization) != (model.dtype, model.quantization):
            mixed.append(f"{adapter_id} ({_precision(base.dtype, base.quantization)})")
    if mixed and request.on_mixed_precision == "fail":
        raise invalid_field(
            "adapters",
            f"the base is {_precision(model.dtype, model.quantization)} but these adapters were imported for another precision: "
            f"{', '.join(mixed)}; pass on_mixed_precision=flag to compare anyway",
        )
    return Comparison(
        id=new_id("cmp"),
        job_id=job_id,
        model_id=model.id,
        adapter_ids=list(request.adapters),
        dataset_id=request.dataset,
        layers=resolve_layers(request.layers, model.num_layers),
        method=request.method,
        token_position=request.token_position,
        prompt_format=prompt_format,
    )
