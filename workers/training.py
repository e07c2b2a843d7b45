"""Training probes on hidden states, shared by the jobs that train them (`probe_training`,
`comparison`): labels for a dataset (given, or the model's own for multiple choice) with the
model's own confidences to compare probes against, a probe per layer and method with its
recalibration, point metrics on the validation split, and the choice of the best probe there."""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from threadpoolctl import threadpool_limits

from app.calibration.scoring import auroc, brier, nll
from app.inputs.datasets import CHOICE_LETTERS
from app.registry.tables import Adapter, Dataset, Model
from workers.errors import JobFailed
from workers.labelling import P_TRUE, p_true, self_label
from workers.probes import RECALIBRATOR_KINDS, MassMeanProbe, fit_logistic_probe

if TYPE_CHECKING:
    from workers.context import JobContext


@dataclass
class Labels:
    y: np.ndarray
    # the model's own confidences that each item is correct, by name (docs/concepts.md#baselines):
    # `own_probability`, `entropy` and `margin` for multiple choice, `p_true` for statements
    baselines: dict[str, np.ndarray]
    chosen: np.ndarray | None

    @property
    def baseline(self) -> np.ndarray | None:
        """The model's own probability of its answer (multiple choice): a report's `baseline`."""
        return self.baselines.get("own_probability")


@dataclass
class TrainedProbe:
    layer: int
    method: str
    probe: Any
    recalibrator: Any
    validation: dict[str, Any]
    test_probabilities: np.ndarray
    # the probe's own probabilities on the test split, before its recalibration (None without one)
    uncalibrated_test_probabilities: np.ndarray | None = None


def labels_for(
    context: "JobContext[Any]",
    model: Model,
    adapter: Adapter | None,
    dataset: Dataset,
    rows: list[dict[str, Any]],
    prompt_format: str,
    baselines: bool = True,
) -> Labels:
    """Statements' own labels, or the model's (with its adapter) for multiple choice, asked
    under `prompt_format`, with the model's baseline confidences. `baselines=False` skips
    the statements' P(True) pass (multiple choice has its baselines from labelling anyway)."""
    worker = context.runtime
    if dataset.kind == "statements":
        y = np.array([row["label"] for row in rows], dtype=np.int64)
        found = _statement_baselines(context, model, adapter, rows, prompt_format) if baselines else {}
        return Labels(y=y, baselines=found, chosen=None)
    loaded = worker.resident(model, adapter)
    context.progress("labelling", 0, len(rows))
    with worker.running(loaded, model, adapter):
        labelled = self_label(
            loaded,
            rows,
            device=worker.models.device,
            token_budget=worker.settings.extraction_token_budget,
            max_batch_size=worker.settings.extraction_max_batch_size,
            prompt_format=prompt_format,
            progress=lambda done: context.progress("labelling", done, len(rows)),
        )
    context.progress("labelling", len(rows), len(rows))
    return Labels(y=labelled.labels, baselines=labelled.baselines, chosen=labelled.chosen)


def _statement_baselines(
    context: "JobContext[Any]", model: Model, adapter: Adapter | None, rows: list[dict[str, Any]], prompt_format: str
) -> dict[str, np.ndarray]:
    """`p_true` where the model is a causal language model whose tokenizer gives `True` and
    `False` first tokens of their own; none otherwise (an encoder has no next-token logits)."""
    worker = context.runtime
    loaded = worker.resident(model, adapter)
    if not loaded.is_causal_lm:
        return {}
    context.progress("baselines", 0, len(rows))
    with worker.running(loaded, model, adapter):
        try:
            confidence = p_true(
                loaded,
                [row["text"] for row in rows],
                device=worker.models.device,
                token_budget=worker.settings.extraction_token_budget,
                max_batch_size=worker.settings.extraction_max_batch_size,
                prompt_format=prompt_format,
                progress=lambda done: context.progress("baselines", done, len(rows)),
            )
        except JobFailed as failure:
            if failure.code != "unsupported_model":  # the answers' tokens not found: no P(True) to report
                raise
            return {}
    context.progress("baselines", len(rows), len(rows))
    return {P_TRUE: confidence}


def self_label_summary(labels: Labels, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How the model answered a multiple-choice set, over all its rows: the fraction it got
    right, and how often it picked each letter beside how often each letter is the gold
    answer (a model that favours one letter shows it here)."""
    assert labels.chosen is not None
    letters = CHOICE_LETTERS[: max(len(row["choices"]) for row in rows)]
    picks = dict.fromkeys(letters, 0)
    answers = dict.fromkeys(letters, 0)
    for chosen, row in zip(labels.chosen.tolist(), rows, strict=True):
        picks[letters[chosen]] += 1
        answers[letters[row["answer"]]] += 1
    return {"n": len(rows), "accuracy": float(labels.y.mean()), "picks": picks, "answers": answers}


def validation_summary(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """Point metrics for choices on the validation split (no intervals needed there)."""
    return {"n": len(y), "auroc": auroc(y, p).value, "nll": nll(y, p).value, "brier": brier(y, p).value}


# Probes fit on one BLAS thread. Their matrix products are small for BLAS (lbfgs runs
# matrix-vector products over a few thousand rows), and in a worker, whose torch keeps its
# own thread pool, more threads only contend: measured on a 2-core machine, one logistic
# probe with its strength search took 0.07 s on one thread and 0.33-0.40 s on two (900 × 576
# features), and 0.53-0.59 s against 0.94-1.08 s at 8,000 × 2,048.
PROBE_BLAS_THREADS = 1


def train_probe(
    method: str, x: np.ndarray, y: np.ndarray, split: Any, whiten: bool, recalibration: str | None
) -> tuple[Any, Any, dict[str, Any]]:
    """A probe of `method` fitted on the train split (a logistic probe's L2 strength chosen
    on validation), its recalibrator fitted on validation, and the strength search."""
    with threadpool_limits(PROBE_BLAS_THREADS, user_api="blas"):
        return _train_probe(method, x, y, split, whiten, recalibration)


def _train_probe(
    method: str, x: np.ndarray, y: np.ndarray, split: Any, whiten: bool, recalibration: str | None
) -> tuple[Any, Any, dict[str, Any]]:
    if method == "logistic":
        probe, search = fit_logistic_probe(x[split.train], y[split.train], x[split.validation], y[split.validation])
    else:
        probe, search = MassMeanProbe(whiten=whiten).fit(x[split.train], y[split.train]), {}
    recalibrator = None
    if recalibration:
        recalibrator = RECALIBRATOR_KINDS[recalibration]().fit(
            probe.decision_function(x[split.validation]), y[split.validation]
        )
    return probe, recalibrator, search


def best_candidate(candidates: list[TrainedProbe]) -> TrainedProbe:
    """Highest validation AUROC; ties go to the lower validation log loss."""
    return max(
        candidates,
        key=lambda c: (c.validation["auroc"] if c.validation["auroc"] is not None else -1, -c.validation["nll"]),
    )
