"""The `probe_training` and `probe_scoring` jobs (the training itself: `workers/training.py`).

Training: labels (given by statements, or the model's own for multiple choice), hidden
states at every requested layer (through the content cache), a seeded stratified split,
one probe per layer and method fitted on train, recalibration and the best probe chosen on
validation, and the calibration report on the test split — which no choice ever sees — with
the model's own confidences reported beside it and compared with it (`baseline_comparison`).
"""

import json
from typing import TYPE_CHECKING, Any

from sqlalchemy import update

from app.calibration.reporting import Baselines, calibration_report
from app.inputs.prompt_formats import render, rendered_rows
from app.job_kinds import ProbeScoringParameters, ProbeTrainingParameters
from app.registry.datasets import read_rows
from app.registry.tables import Adapter, Dataset, Model, Probe, ProbeRun, new_id, utcnow
from workers import fanout
from workers.context import subject_row
from workers.errors import JobFailed
from workers.probes import load_probe, probability_of_correct, save_probe
from workers.splits import stratified_split
from workers.state_cache import StatesRequest, cached_states
from workers.training import (
    Labels,
    TrainedProbe,
    best_candidate,
    labels_for,
    self_label_summary,
    train_probe,
    validation_summary,
)

if TYPE_CHECKING:
    from workers.context import JobContext


def run(context: "JobContext[ProbeTrainingParameters]") -> dict[str, Any]:
    worker = context.runtime
    store, sessions, settings = worker.artifacts, worker.sessions, worker.settings
    with sessions() as session:
        run_row = subject_row(session, ProbeRun, context.params.run_id, "probe run")
        model = subject_row(session, Model, run_row.model_id, "model")
        adapter = session.get(Adapter, run_row.adapter_id) if run_row.adapter_id else None
        dataset = session.get(Dataset, run_row.dataset_id)
    if dataset is None or (run_row.adapter_id and adapter is None):
        raise JobFailed("not_found", "the dataset or adapter of this run was deleted")

    rows = read_rows(store, dataset)
    labels = labels_for(
        context, model, adapter, dataset, rows, run_row.prompt_format, baselines=run_row.split.get("baselines", True)
    )
    split_spec = run_row.split
    try:
        split = stratified_split(
            labels.y,
            fractions=(split_spec["train"], split_spec["validation"], split_spec["test"]),
            seed=split_spec["seed"],
        )
    except ValueError as exc:
        raise JobFailed(
            "unsplittable",
            f"cannot split the labels for training: {exc}",
            positives=int(labels.y.sum()),
            n=len(labels.y),
        ) from exc
    layers = list(run_row.layers)
    request = StatesRequest(model, adapter, layers, run_row.token_position, run_row.max_length, run_row.prompt_format)
    texts = rendered_rows(rows, dataset.kind, run_row.prompt_format)
    states = fanout.dataset_states(context, request, texts, dataset, run_row.id).states

    candidates: list[TrainedProbe] = []
    total = len(layers) * len(run_row.methods)
    for slot, layer in enumerate(layers):
        for method in run_row.methods:
            context.progress("training", len(candidates), total)
            x = states[:, slot]
            probe, recalibrator, search = train_probe(
                method, x, labels.y, split, bool(split_spec.get("whiten")), run_row.recalibration
            )
            validation = validation_summary(
                labels.y[split.validation], probability_of_correct(probe, recalibrator, x[split.validation])
            ) | {"search": search}
            candidates.append(
                TrainedProbe(
                    layer,
                    method,
                    probe,
                    recalibrator,
                    validation,
                    probability_of_correct(probe, recalibrator, x[split.test]),
                    probability_of_correct(probe, None, x[split.test]) if recalibrator is not None else None,
                )
            )
    best = best_candidate(candidates)

    context.progress("reporting", 0, len(candidates))
    baselines = Baselines.of(
        labels.y[split.test],
        {name: confidence[split.test] for name, confidence in labels.baselines.items()},
        resamples=settings.bootstrap_resamples,
        seed=split_spec["seed"],
    )
    run_artifact = f"probe_runs/{run_row.id}"
    written = [run_artifact]
    try:
        probe_rows = _write_probes(context, run_row, candidates, best, labels, split, baselines, written)
        best_row = next(row for row in probe_rows if row.is_best)
        with sessions() as session, session.begin():
            session.add_all(probe_rows)
            session.flush()
            session.execute(
                update(ProbeRun)
                .where(ProbeRun.id == run_row.id)
                .values(artifact=run_artifact, best_probe_id=best_row.id, finished_at=utcnow())
            )
    except BaseException:
        for folder in written:  # no probe files without their rows
            store.delete_prefix(folder)
        raise
    result: dict[str, Any] = {
        "run_id": run_row.id,
        "probe_ids": [row.id for row in probe_rows],
        "best_probe_id": best_row.id,
        "best_layer": best_row.layer,
        "best_method": best_row.method,
        "test_n": len(split.test),
        "test_auroc": best_row.metrics["auroc"]["value"],
    }
    if labels.chosen is not None:
        result["self_labels"] = self_label_summary(labels, rows)
    return result


def _write_probes(
    context: "JobContext[ProbeTrainingParameters]",
    run_row: ProbeRun,
    candidates: list[TrainedProbe],
    best: TrainedProbe,
    labels: Labels,
    split: Any,
    baselines: Baselines,
    written: list[str],
) -> list[Probe]:
    """Probe folders (weights, report, test predictions) and their rows, not yet added. Each
    folder is made locally and published whole, so no reader finds half a probe. A report
    has the probe's calibration (`probe`), each baseline's (`baselines`; `baseline`, the own
    probability, as before baselines had names) and the probe's differences from each
    (`versus_baselines`)."""
    store, settings = context.runtime.artifacts, context.runtime.settings
    y_test = labels.y[split.test]
    seed = run_row.split["seed"]
    baseline_reports = {name: report.to_dict() for name, report in baselines.reports().items()}
    store.write_bytes(
        f"probe_runs/{run_row.id}/labels.json",
        json.dumps(
            {
                "labels": labels.y.tolist(),
                "baseline_confidence": labels.baseline.tolist() if labels.baseline is not None else None,
                "baselines": {name: confidence.tolist() for name, confidence in labels.baselines.items()},
                "chosen": labels.chosen.tolist() if labels.chosen is not None else None,
                "split": {
                    "train": split.train.tolist(),
                    "validation": split.validation.tolist(),
                    "test": split.test.tolist(),
                },
            }
        ).encode(),
    )
    rows: list[Probe] = []
    for number, candidate in enumerate(candidates):
        probe_id = new_id("prb")
        folder = f"probes/{probe_id}"
        written.append(folder)
        report = calibration_report(
            y_test, candidate.test_probabilities, resamples=settings.bootstrap_resamples, seed=seed
        ).to_dict()
        # a recalibrated probe is reported before its recalibration too, on the same test split
        uncalibrated_report = (
            calibration_report(
                y_test, candidate.uncalibrated_test_probabilities, resamples=settings.bootstrap_resamples, seed=seed
            ).to_dict()
            if candidate.uncalibrated_test_probabilities is not None
            else None
        )
        with store.scratch(folder) as scratch:
            save_probe(scratch, candidate.probe, candidate.recalibrator)
            (scratch / "report.json").write_text(
                json.dumps(
                    {
                        "probe": report,
                        "baseline": baseline_reports.get("own_probability"),
                        "baselines": baseline_reports,
                        "versus_baselines": baselines.versus(candidate.test_probabilities),
                        "uncalibrated": uncalibrated_report,
                    }
                )
            )
            (scratch / "predictions.json").write_text(
                json.dumps(
                    {
                        "test_indices": split.test.tolist(),
                        "labels": y_test.tolist(),
                        "confidences": candidate.test_probabilities.tolist(),
                    }
                )
            )
            store.publish_folder(folder, scratch)
        rows.append(
            Probe(
                id=probe_id,
                run_id=run_row.id,
                model_id=run_row.model_id,
                adapter_id=run_row.adapter_id,
                dataset_id=run_row.dataset_id,
                layer=candidate.layer,
                method=candidate.method,
                token_position=run_row.token_position,
                max_length=run_row.max_length,
                prompt_format=run_row.prompt_format,
                recalibration=run_row.recalibration,
                is_best=candidate is best,
                artifact=folder,
                validation=candidate.validation,
                metrics={
                    name: {key: entry[key] for key in ("value", "interval", "interval_method")}
                    for name, entry in report["metrics"].items()
                },
            )
        )
        context.progress("reporting", number + 1, len(candidates))
    return rows


def score(context: "JobContext[ProbeScoringParameters]") -> dict[str, Any]:
    worker = context.runtime
    with worker.sessions() as session:
        probe_row = subject_row(session, Probe, context.params.probe_id, "probe")
        model = subject_row(session, Model, probe_row.model_id, "model")
        adapter = session.get(Adapter, probe_row.adapter_id) if probe_row.adapter_id else None
    prompt_format = context.params.prompt_format
    request = StatesRequest(
        model, adapter, [probe_row.layer], probe_row.token_position, probe_row.max_length, prompt_format
    )
    texts = render(prompt_format, "text", context.params.texts)
    states = cached_states(context, request, texts, shard_name=context.job_id).states[:, 0]
    probe, recalibrator = load_probe(worker.artifacts.local_folder(probe_row.artifact))
    return {"confidences": [float(p) for p in probability_of_correct(probe, recalibrator, states)]}
