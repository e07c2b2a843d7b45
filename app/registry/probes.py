"""Probe training requests, checked against the registry before a job is queued."""

from typing import Any

from sqlalchemy.orm import Session

from app.errors import invalid_field
from app.inputs.prompt_formats import data_kind
from app.registry.datasets import labelled_dataset
from app.registry.models import checked_model_and_adapter, checked_prompt_format, resolve_layers
from app.registry.tables import Probe, ProbeRun, new_id
from app.schemas.probes import MIN_PER_CLASS, ProbeCreate, ProbeOut, ProbeRunOut


def new_probe_run(session: Session, request: ProbeCreate, job_id: str) -> ProbeRun:
    model, adapter = checked_model_and_adapter(session, request.model, request.adapter)
    dataset = labelled_dataset(session, request.dataset)
    fractions = request.split
    if abs(fractions.train + fractions.validation + fractions.test - 1) > 1e-6:
        raise invalid_field("split", "train, validation and test must add up to 1")
    if (
        dataset.kind == "statements"
        and min(dataset.label_balance.get("0", 0), dataset.label_balance.get("1", 0)) < MIN_PER_CLASS
    ):
        raise invalid_field(
            "dataset", f"each label needs at least {MIN_PER_CLASS} statements to split: {dataset.label_balance}"
        )
    prompt_format = checked_prompt_format(model, request.prompt_format, data_kind(dataset.kind))
    methods = request.method if isinstance(request.method, list) else [request.method]
    if len(set(methods)) != len(methods):
        raise invalid_field("method", "a method is listed twice")
    return ProbeRun(
        id=new_id("prr"),
        job_id=job_id,
        model_id=model.id,
        adapter_id=adapter.id if adapter else None,
        dataset_id=dataset.id,
        layers=resolve_layers(request.layers, model.num_layers),
        methods=methods,
        token_position=request.token_position,
        max_length=request.max_length,
        prompt_format=prompt_format,
        split={
            "train": fractions.train,
            "validation": fractions.validation,
            "test": fractions.test,
            "seed": request.seed,
            "whiten": request.whiten,
            "baselines": request.baselines,
        },
        recalibration=request.recalibration,
    )


def run_view(run: ProbeRun, status: str, probes: list[Probe]) -> ProbeRunOut:
    fields: dict[str, Any] = {
        name: getattr(run, name) for name in ProbeRunOut.model_fields if name not in {"status", "probes", "baselines"}
    }
    # the run's options live in its `split` record; runs made before baselines could be skipped computed them
    baselines = bool(run.split.get("baselines", True))
    return ProbeRunOut(**fields, status=status, baselines=baselines, probes=[ProbeOut.of(probe) for probe in probes])
