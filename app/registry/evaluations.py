"""Probe evaluation requests, checked against the probe and the registry before a job is
queued: the dataset labelled, the adapter the probe's model's own, the prompt format one the
model can apply to the dataset's kind."""

from sqlalchemy.orm import Session

from app.errors import invalid_field, not_found
from app.inputs.prompt_formats import InvalidPromptFormat, check_prompt_format, data_kind
from app.registry.datasets import labelled_dataset
from app.registry.models import checked_model_and_adapter, checked_prompt_format
from app.registry.tables import Probe, ProbeEvaluation, new_id
from app.schemas.evaluations import EvaluationCreate


def get_probe(session: Session, probe_id: str) -> Probe:
    probe = session.get(Probe, probe_id)
    if probe is None:
        raise not_found("probe", probe_id)
    return probe


def new_evaluation(session: Session, probe_id: str, request: EvaluationCreate, job_id: str) -> ProbeEvaluation:
    probe = get_probe(session, probe_id)
    adapter_id = request.adapter if "adapter" in request.model_fields_set else probe.adapter_id
    model, adapter = checked_model_and_adapter(session, probe.model_id, adapter_id)
    dataset = labelled_dataset(session, request.dataset)
    kind = data_kind(dataset.kind)
    if request.prompt_format is None:
        try:
            check_prompt_format(probe.prompt_format, kind)
        except InvalidPromptFormat:
            raise invalid_field(
                "prompt_format",
                f"probe {probe.id} was read under a template that does not fit a {dataset.kind} dataset; "
                "give a prompt_format for it",
            ) from None
    prompt_format = checked_prompt_format(model, request.prompt_format or probe.prompt_format, kind)
    variant = adapter.id if adapter else None
    own_rows = dataset.id == probe.dataset_id and variant == probe.adapter_id and prompt_format == probe.prompt_format
    return ProbeEvaluation(
        id=new_id("evl"),
        job_id=job_id,
        probe_id=probe.id,
        model_id=model.id,
        adapter_id=variant,
        dataset_id=dataset.id,
        prompt_format=prompt_format,
        rows="test" if own_rows else "all",
    )
