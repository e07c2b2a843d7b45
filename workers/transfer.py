"""The `transfer` job: a transfer matrix (the maths: `workers/transfer_matrix.py`).

Every dataset named on either side is labelled (given, or the model's own answers for
multiple choice) and its states read once at every layer through the content cache; the
matrix is then fitted and scored on those arrays alone, and written as one report.
"""

import json
from typing import TYPE_CHECKING, Any

from sqlalchemy import update

from app.inputs.prompt_formats import rendered_rows
from app.job_kinds import TransferParameters
from app.registry.datasets import read_rows
from app.registry.tables import Adapter, Dataset, Model, Transfer, utcnow
from workers import fanout
from workers.context import subject_row
from workers.errors import JobFailed
from workers.state_cache import StatesRequest
from workers.training import labels_for
from workers.transfer_matrix import LabelledStates, transfer_matrix

if TYPE_CHECKING:
    from workers.context import JobContext


def run(context: "JobContext[TransferParameters]") -> dict[str, Any]:
    worker = context.runtime
    store, settings = worker.artifacts, worker.settings
    with worker.sessions() as session:
        transfer = subject_row(session, Transfer, context.params.transfer_id, "transfer")
        model = subject_row(session, Model, transfer.model_id, "model")
        adapter = session.get(Adapter, transfer.adapter_id) if transfer.adapter_id else None
        dataset_ids = list(dict.fromkeys([*transfer.train_dataset_ids, *transfer.test_dataset_ids]))
        datasets = {dataset_id: session.get(Dataset, dataset_id) for dataset_id in dataset_ids}
    if transfer.adapter_id and adapter is None:
        raise JobFailed("not_found", f"adapter {transfer.adapter_id} of this transfer was deleted")
    request = StatesRequest(
        model, adapter, list(transfer.layers), transfer.token_position, transfer.max_length, transfer.prompt_format
    )
    sets = []
    for number, (dataset_id, dataset) in enumerate(datasets.items()):
        if dataset is None:
            raise JobFailed("not_found", f"dataset {dataset_id} of this transfer was deleted")
        context.progress("reading states", number, len(datasets))
        rows = read_rows(store, dataset)
        labels = labels_for(context, model, adapter, dataset, rows, transfer.prompt_format, baselines=False)
        texts = rendered_rows(rows, dataset.kind, transfer.prompt_format)
        states = fanout.dataset_states(context, request, texts, dataset, f"{transfer.id}-{number}").states
        sets.append(LabelledStates(dataset_id, dataset.name, labels.y, states))
    split = transfer.split
    try:
        matrix = transfer_matrix(
            sets,
            transfer.train_dataset_ids,
            transfer.test_dataset_ids,
            transfer.layers,
            transfer.method,
            union=transfer.union_train,
            fractions=(split["train"], split["validation"], split["test"]),
            seed=split["seed"],
            resamples=settings.bootstrap_resamples,
            progress=lambda done, total: context.progress("training and scoring", done, total),
        )
    except ValueError as exc:  # a training set whose labels cannot be split
        raise JobFailed("unsplittable", f"cannot split a training set: {exc}") from exc
    folder = f"transfers/{transfer.id}"
    try:
        store.write_bytes(f"{folder}/matrix.json", json.dumps(matrix).encode())
        with worker.sessions() as session, session.begin():
            session.execute(
                update(Transfer).where(Transfer.id == transfer.id).values(artifact=folder, finished_at=utcnow())
            )
    except BaseException:
        store.delete_prefix(folder)
        raise
    return {
        "transfer_id": transfer.id,
        "auroc": [[cell["metrics"]["auroc"]["value"] for cell in row] for row in matrix["cells"]],
    }
