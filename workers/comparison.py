"""The `comparison` job: the base model and each adapter on the same texts, split and
layers. Each model gets its own labels (its own answers, for multiple choice) and its own
probe per layer; the reported layer is chosen on the base's validation split and used for
every model, so the curves compare like with like. Each model's own confidences (its
baselines, docs/concepts.md#baselines) are reported beside its probe."""

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import update

from app.calibration.binned import ece
from app.calibration.reporting import (
    baseline_comparison,
    calibration_report,
    paired_differences,
    paired_rate_difference,
)
from app.calibration.scoring import auroc, brier
from app.inputs.prompt_formats import rendered_rows
from app.job_kinds import ComparisonParameters
from app.registry.datasets import read_rows
from app.registry.tables import Adapter, Comparison, Dataset, Model, utcnow
from workers import fanout
from workers.context import subject_row
from workers.errors import JobFailed
from workers.probes import probability_of_correct
from workers.splits import stratified_split
from workers.state_cache import StatesRequest
from workers.training import Labels, labels_for, self_label_summary, train_probe, validation_summary

if TYPE_CHECKING:
    from workers.context import JobContext


@dataclass
class Variant:
    label: str
    model: Model
    adapter: Adapter | None
    labels: Labels | None = None
    states: np.ndarray | None = None


def _variants(session: Any, comparison: Comparison) -> list[Variant]:
    base = subject_row(session, Model, comparison.model_id, "model")
    variants = [Variant("base", base, None)]
    for adapter_id in comparison.adapter_ids:
        adapter = session.get(Adapter, adapter_id)
        if adapter is None:
            raise JobFailed("not_found", f"adapter {adapter_id} was deleted")
        variants.append(
            Variant(
                f"adapter {adapter.name} ({adapter.id})",
                subject_row(session, Model, adapter.base_model_id, "model"),
                adapter,
            )
        )
    return variants


def _transfer(probe: Any, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    p = probability_of_correct(probe, None, x)
    return {"auroc": auroc(y, p).value, "ece": ece(y, p).value, "brier": brier(y, p).value, "n": len(y)}


def _answers(variants: list[Variant], rows: list[dict[str, Any]], resamples: int, seed: int) -> dict[str, Any]:
    """How each model answered the multiple-choice questions, and by how much each adapter's
    accuracy and letter picks differ from the base's on the same questions."""
    summaries = {}
    for variant in variants:
        assert variant.labels is not None
        summaries[variant.label] = self_label_summary(variant.labels, rows)
    base = variants[0]
    assert base.labels is not None
    differences = {}
    for variant in variants[1:]:
        assert variant.labels is not None
        own, theirs = summaries[variant.label]["picks"], summaries[base.label]["picks"]
        differences[variant.label] = {
            "accuracy": paired_rate_difference(base.labels.y, variant.labels.y, resamples=resamples, seed=seed),
            "picks_total_variation": 0.5 * sum(abs(own[letter] - theirs[letter]) for letter in own) / len(rows),
        }
    return {"answers": summaries, "answer_differences": differences}


def _per_layer_test(
    variants: list[Variant],
    probes: dict[tuple[int, int], Any],
    layers: list[int],
    test: np.ndarray,
    resamples: int,
    seed: int,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Each model's test AUROC and ECE at every layer, with their intervals: the layer sweep a
    comparison's page draws, one curve per model."""
    sweep: dict[str, dict[str, dict[str, Any]]] = {}
    for number, variant in enumerate(variants):
        assert variant.labels is not None and variant.states is not None
        for slot, layer in enumerate(layers):
            p = probability_of_correct(probes[(number, slot)], None, variant.states[test, slot])
            metrics = calibration_report(variant.labels.y[test], p, resamples=resamples, seed=seed).to_dict()["metrics"]
            sweep.setdefault(str(layer), {})[variant.label] = {"auroc": metrics["auroc"], "ece": metrics["ece"]}
    return sweep


def run(context: "JobContext[ComparisonParameters]") -> dict[str, Any]:
    worker = context.runtime
    store, sessions, settings = worker.artifacts, worker.sessions, worker.settings
    params = context.params
    with sessions() as session:
        comparison = subject_row(session, Comparison, params.comparison_id, "comparison")
        dataset = session.get(Dataset, comparison.dataset_id)
        variants = _variants(session, comparison)
    if dataset is None:
        raise JobFailed("not_found", "the dataset of this comparison was deleted")
    rows = read_rows(store, dataset)
    texts = rendered_rows(rows, dataset.kind, comparison.prompt_format)
    layers = list(comparison.layers)
    flags = [
        f"{v.label} runs on {v.model.dtype}{'/' + v.model.quantization if v.model.quantization else ''}, the base on "
        f"{variants[0].model.dtype}{'/' + variants[0].model.quantization if variants[0].model.quantization else ''}"
        for v in variants[1:]
        if (v.model.dtype, v.model.quantization) != (variants[0].model.dtype, variants[0].model.quantization)
    ]
    for number, variant in enumerate(variants):
        context.progress(f"states of {variant.label}", number, len(variants))
        variant.labels = labels_for(context, variant.model, variant.adapter, dataset, rows, comparison.prompt_format)
        request = StatesRequest(
            variant.model,
            variant.adapter,
            layers,
            comparison.token_position,
            params.max_length,
            comparison.prompt_format,
        )
        variant.states = fanout.dataset_states(context, request, texts, dataset, f"{comparison.id}-{number}").states

    spec = params.split
    base_labels = variants[0].labels
    assert base_labels is not None
    try:  # one split for every model, stratified on the base's labels, so differences are paired
        split = stratified_split(base_labels.y, fractions=(spec.train, spec.validation, spec.test), seed=spec.seed)
    except ValueError as exc:
        raise JobFailed("unsplittable", f"cannot split the base's labels: {exc}") from exc

    context.progress("training", 0, len(variants) * len(layers))
    probes: dict[tuple[int, int], Any] = {}
    per_layer: dict[str, dict[str, Any]] = {}
    for number, variant in enumerate(variants):
        assert variant.labels is not None and variant.states is not None
        y = variant.labels.y
        for slot, layer in enumerate(layers):
            x = variant.states[:, slot]
            try:
                probe, _, _ = train_probe(comparison.method, x, y, split, False, None)
            except ValueError as exc:
                raise JobFailed("unsplittable", f"{variant.label}: {exc}") from exc
            probes[(number, slot)] = probe
            per_layer.setdefault(str(layer), {})[variant.label] = validation_summary(
                y[split.validation], probability_of_correct(probe, None, x[split.validation])
            )
    best_slot = max(range(len(layers)), key=lambda slot: per_layer[str(layers[slot])]["base"]["auroc"] or -1)

    context.progress("reporting", 0, len(variants))
    resamples, seed = settings.bootstrap_resamples, spec.seed
    per_layer_test = _per_layer_test(variants, probes, layers, split.test, resamples, seed)
    test_probabilities = []
    reports: list[dict[str, Any]] = []
    for number, variant in enumerate(variants):
        assert variant.labels is not None and variant.states is not None
        p = probability_of_correct(probes[(number, best_slot)], None, variant.states[split.test, best_slot])
        test_probabilities.append(p)
        y_test = variant.labels.y[split.test]
        own = {name: confidence[split.test] for name, confidence in variant.labels.baselines.items()}
        reports.append(
            {
                "label": variant.label,
                "model_id": variant.model.id,
                "adapter_id": variant.adapter.id if variant.adapter else None,
                "precision": {"dtype": variant.model.dtype, "quantization": variant.model.quantization},
                "report": calibration_report(y_test, p, resamples=resamples, seed=seed).to_dict(),
                **baseline_comparison(y_test, p, own, resamples=resamples, seed=seed),
            }
        )
    differences: dict[str, Any] = {}
    base_y = base_labels.y[split.test]
    for number, variant in enumerate(variants[1:], start=1):
        assert variant.labels is not None
        if np.array_equal(variant.labels.y[split.test], base_y):
            differences[variant.label] = paired_differences(
                base_y, test_probabilities[0], test_probabilities[number], resamples=resamples, seed=seed
            ).to_dict()
        else:
            flags.append(
                f"{variant.label} answers differently from the base, so its differences are unpaired point estimates"
            )
            own = reports[number]["report"]["metrics"]
            differences[variant.label] = {
                name: {"value": own[name]["value"] - reports[0]["report"]["metrics"][name]["value"], "interval": None}
                for name in own
                if own[name]["value"] is not None and reports[0]["report"]["metrics"][name]["value"] is not None
            }
    cross_transfer: dict[str, Any] = {}
    base_states = variants[0].states
    assert base_states is not None
    for number, variant in enumerate(variants[1:], start=1):
        assert variant.labels is not None and variant.states is not None
        cross_transfer[f"base probe on {variant.label}"] = _transfer(
            probes[(0, best_slot)], variant.states[split.test, best_slot], variant.labels.y[split.test]
        )
        cross_transfer[f"{variant.label} probe on base"] = _transfer(
            probes[(number, best_slot)], base_states[split.test, best_slot], base_y
        )

    answers = _answers(variants, rows, resamples, seed) if dataset.kind == "multiple_choice" else {}
    report = {
        **answers,
        "layer": layers[best_slot],
        "variants": reports,
        "differences": differences,
        "cross_transfer": cross_transfer,
        "per_layer_validation": per_layer,
        "per_layer_test": per_layer_test,
        "flags": flags,
        "test_n": len(split.test),
    }
    artifact = f"comparisons/{comparison.id}/report.json"
    store.write_bytes(artifact, json.dumps(report).encode())
    with sessions() as session, session.begin():
        session.execute(
            update(Comparison).where(Comparison.id == comparison.id).values(artifact=artifact, finished_at=utcnow())
        )
    return {"comparison_id": comparison.id, "layer": layers[best_slot], "flags": flags}
