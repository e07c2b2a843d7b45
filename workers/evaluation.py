"""The `probe_evaluation` job: a trained probe scored on a labelled dataset, perhaps under
another variant of its model (docs/concepts.md#evaluations).

Labels are the dataset's (statements) or the evaluated variant's own answers (multiple
choice); the states are the evaluated variant's at the probe's layer and token position,
through the content cache; the report is the one a probe's own test split gets. Rows:
every row of the dataset, or only the test split of the probe's run when the dataset,
variant and prompt format are the probe's own.
"""

import json
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import update

from app.calibration.reporting import baseline_comparison, calibration_report
from app.inputs.prompt_formats import rendered_rows
from app.job_kinds import ProbeEvaluationParameters
from app.registry.datasets import read_rows
from app.registry.tables import Adapter, Dataset, Model, Probe, ProbeEvaluation, ProbeRun, utcnow
from workers import fanout
from workers.context import subject_row
from workers.errors import JobFailed
from workers.probes import load_probe, probability_of_correct
from workers.state_cache import StatesRequest
from workers.training import labels_for, self_label_summary

if TYPE_CHECKING:
    from workers.context import JobContext


def run(context: "JobContext[ProbeEvaluationParameters]") -> dict[str, Any]:
    worker = context.runtime
    store, settings = worker.artifacts, worker.settings
    with worker.sessions() as session:
        evaluation = subject_row(session, ProbeEvaluation, context.params.evaluation_id, "evaluation")
        probe = subject_row(session, Probe, evaluation.probe_id, "probe")
        run_row = subject_row(session, ProbeRun, probe.run_id, "probe run")
        model = subject_row(session, Model, evaluation.model_id, "model")
        adapter = session.get(Adapter, evaluation.adapter_id) if evaluation.adapter_id else None
        dataset = session.get(Dataset, evaluation.dataset_id)
    if dataset is None or (evaluation.adapter_id and adapter is None):
        raise JobFailed("not_found", "the dataset or adapter of this evaluation was deleted")

    rows = read_rows(store, dataset)
    indices = np.arange(len(rows))
    if evaluation.rows == "test":
        stored = json.loads(store.read_bytes(f"{run_row.artifact}/labels.json"))
        indices = np.asarray(stored["split"]["test"], dtype=np.int64)
        rows = [rows[i] for i in indices]
    labels = labels_for(context, model, adapter, dataset, rows, evaluation.prompt_format)
    request = StatesRequest(
        model, adapter, [probe.layer], probe.token_position, probe.max_length, evaluation.prompt_format
    )
    texts = rendered_rows(rows, dataset.kind, evaluation.prompt_format)
    states = fanout.dataset_states(context, request, texts, dataset, evaluation.id, rows=indices.tolist()).states[:, 0]
    trained, recalibrator = load_probe(store.local_folder(probe.artifact))
    confidences = probability_of_correct(trained, recalibrator, states)

    context.progress("reporting", 0, 1)
    resamples, seed = settings.bootstrap_resamples, run_row.split["seed"]
    report = calibration_report(labels.y, confidences, resamples=resamples, seed=seed).to_dict()
    compared = baseline_comparison(labels.y, confidences, labels.baselines, resamples=resamples, seed=seed)
    stored_report = {
        "probe": report,
        "baseline": compared["baselines"].get("own_probability"),
        **compared,
        # a recalibrated probe is reported before its recalibration too, on the same rows
        "uncalibrated": calibration_report(
            labels.y, trained.predict_proba(states)[:, 1], resamples=resamples, seed=seed
        ).to_dict()
        if recalibrator is not None
        else None,
    }
    folder = f"evaluations/{evaluation.id}"
    try:
        with store.scratch(folder) as scratch:
            (scratch / "report.json").write_text(json.dumps(stored_report))
            (scratch / "predictions.json").write_text(
                json.dumps(
                    {
                        "indices": indices.tolist(),
                        "labels": labels.y.tolist(),
                        "confidences": confidences.tolist(),
                        "baselines": {name: values.tolist() for name, values in labels.baselines.items()},
                        "chosen": labels.chosen.tolist() if labels.chosen is not None else None,
                    }
                )
            )
            store.publish_folder(folder, scratch)
        metrics = {
            name: {"value": entry["value"], "interval": entry["interval"]} for name, entry in report["metrics"].items()
        }
        with worker.sessions() as session, session.begin():
            session.execute(
                update(ProbeEvaluation)
                .where(ProbeEvaluation.id == evaluation.id)
                .values(artifact=folder, n=len(labels.y), metrics=metrics, finished_at=utcnow())
            )
    except BaseException:
        store.delete_prefix(folder)  # no report without its row
        raise
    context.progress("reporting", 1, 1)
    result: dict[str, Any] = {
        "evaluation_id": evaluation.id,
        "probe_id": probe.id,
        "n": len(labels.y),
        "auroc": report["metrics"]["auroc"]["value"],
    }
    if labels.chosen is not None:
        result["self_labels"] = self_label_summary(labels, rows)
    return result
