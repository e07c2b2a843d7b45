"""Transfer matrix requests, checked against the registry before a job is queued: the model
and adapter, every dataset labelled and named once per side, the prompt format fitting each
dataset's kind, the layers within the model."""

from sqlalchemy.orm import Session

from app.errors import invalid_field
from app.inputs.prompt_formats import data_kind
from app.registry.datasets import labelled_dataset
from app.registry.models import checked_model_and_adapter, checked_prompt_format, resolve_layers
from app.registry.tables import Transfer, new_id
from app.schemas.probes import MIN_PER_CLASS
from app.schemas.transfers import TransferCreate


def new_transfer(session: Session, request: TransferCreate, job_id: str) -> Transfer:
    model, adapter = checked_model_and_adapter(session, request.model, request.adapter)
    fractions = request.split
    if abs(fractions.train + fractions.validation + fractions.test - 1) > 1e-6:
        raise invalid_field("split", "train, validation and test must add up to 1")
    for field, dataset_ids in (("train", request.train), ("test", request.test)):
        if len(set(dataset_ids)) != len(dataset_ids):
            raise invalid_field(field, "a dataset is listed twice")
        for dataset_id in dataset_ids:
            dataset = labelled_dataset(session, dataset_id, field)
            checked_prompt_format(model, request.prompt_format, data_kind(dataset.kind))
            balance = dataset.label_balance
            if (
                field == "train"
                and dataset.kind == "statements"
                and min(balance.get("0", 0), balance.get("1", 0)) < MIN_PER_CLASS
            ):
                raise invalid_field(
                    "train",
                    f"dataset {dataset.id}: each label needs at least {MIN_PER_CLASS} statements to split: {balance}",
                )
    return Transfer(
        id=new_id("trf"),
        job_id=job_id,
        model_id=model.id,
        adapter_id=adapter.id if adapter else None,
        train_dataset_ids=list(request.train),
        test_dataset_ids=list(request.test),
        union_train=request.union,
        layers=resolve_layers(request.layers, model.num_layers),
        method=request.method,
        token_position=request.token_position,
        max_length=request.max_length,
        prompt_format=request.prompt_format,
        split={
            "train": fractions.train,
            "validation": fractions.validation,
            "test": fractions.test,
            "seed": request.seed,
        },
    )
