"""Metrics of binary correctness probes, each naming the estimator it implements.

`y` ∈ {0, 1} says whether the answer or statement is correct (1 = correct) and `p` is the
probe's P(y = 1). A prediction says "correct" when p ≥ 0.5.

Every function returns a small frozen dataclass whose docstring names the definition and
its source; calibration errors also carry an `Estimator` that says which variant they are
(ECE has many). `calibration_report` computes them all with percentile bootstrap intervals
and `paired_differences` compares two probes on the same items. The bootstrap is
vectorised: each resample is reduced to how often it drew each item, and every metric
of every resample follows from prefix sums over the items sorted by p.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt

Binning = Literal["equal_width", "equal_mass", "kernel"]
Norm = Literal["l1", "l2", "max"]
Form = Literal["binary", "max_probability"]
Interval = tuple[float, float]

THRESHOLD = 0.5
LOG_LOSS_CLIP = 1e-15
# Resamples are processed in blocks of about this many drawn items (at least one
# resample): each block's arrays then stay in the CPU cache, which is 2-3 times faster
# than larger blocks, and memory stays bounded whatever the number of resamples.
BOOTSTRAP_BLOCK_ITEMS = 2**16
# Smooth ECE: the kernel acts on a grid of this many cells over [0, 1] (a cell is 6.1e-5,
# a sixteenth of the smallest bandwidth); bandwidths below that floor are not resolved
# (the floor `relplot.smECE` also uses); the bandwidth search stops at this width.
SMOOTH_GRID_CELLS = 2**14
SMALLEST_BANDWIDTH = 1e-3
BANDWIDTH_TOLERANCE = 1e-7
# Periodic images of the reflected kernel that matter up to σ = 1 (the next adds < 1e-10).
KERNEL_IMAGES = range(-4, 5)

_TITLES = {"ece": "ECE", "mce": "MCE", "ace": "ACE", "smooth_ece": "Smooth ECE", "debiased_ece": "Debiased ECE"}
_NORM_WORDS = {"l1": "L1", "l2": "L2", "max": "max gap"}
_FORM_WORDS = {"binary": "binary P(y=1)", "max_probability": "max-probability confidence"}


@dataclass(frozen=True)
class Estimator:
    """Which calibration-error estimator a value comes from.

    `binning`: "equal_width" bins [0, 1/B), …, [(B-1)/B, 1]; "equal_mass" bins split the
    predictions sorted by (confidence, outcome) into B groups of sizes as
    `numpy.array_split` makes them; "kernel" (smooth ECE, `bins` None) smooths instead of
    binning. `norm`: "l1" and "l2" average the per-bin gaps (weighted by count unless the
    name says otherwise), "max" takes the largest. `form`: "binary" compares P(y=1) with
    the frequency of y = 1; "max_probability" compares the confidence max(p, 1 − p) with
    the accuracy of the thresholded prediction.
    """

    name: str
    bins: int | None
    binning: Binning
    norm: Norm
    form: Form

    @property
    def label(self) -> str:
        if self.bins is None:
            partition = "reflected Gaussian kernel, self-consistent bandwidth"
        else:
            partition = f"{self.bins} {self.binning.replace('_', '-')} bins"
        return f"{_TITLES[self.name]} — {partition}, {_NORM_WORDS[self.norm]}, {_FORM_WORDS[self.form]}"


# --- Metric values ---------------------------------------------------------------------


@dataclass(frozen=True)
class Accuracy:
    """Fraction of thresholded predictions (p ≥ 0.5 says "correct") that match y:
    scikit-learn's `accuracy_score(y, p >= 0.5)`."""

    value: float
    label: ClassVar[str] = "Accuracy (threshold 0.5)"


@dataclass(frozen=True)
class BaseRate:
    """Fraction of items that are correct (y = 1); the chance level of AUPRC."""

    value: float
    label: ClassVar[str] = "Base rate"


@dataclass(frozen=True)
class Auroc:
    """Area under the ROC curve as the Mann–Whitney U statistic over n₁·n₀ with average
    ranks, so a tied positive–negative pair counts one half (Hanley & McNeil 1982, "The
    meaning and use of the area under a ROC curve"): scikit-learn's `roc_auc_score`.
    None when y holds one class."""

    value: float | None
    label: ClassVar[str] = "AUROC (ties count half)"


@dataclass(frozen=True)
class Auprc:
    """Average precision Σₖ (Rₖ − Rₖ₋₁)·Pₖ over the distinct thresholds, a step-wise area
    under the precision–recall curve without the linear interpolation that overstates it
    (Davis & Goadrich 2006, "The relationship between precision-recall and ROC curves"):
    scikit-learn's `average_precision_score`. None when y holds one class."""

    value: float | None
    label: ClassVar[str] = "AUPRC (average precision)"


@dataclass(frozen=True)
class BrierScore:
    """Mean of (p − y)² (Brier 1950, "Verification of forecasts expressed in terms of
    probability"): scikit-learn's `brier_score_loss`."""

    value: float
    label: ClassVar[str] = "Brier score"


@dataclass(frozen=True)
class LogLoss:
    """Mean negative log-likelihood −[y·ln p + (1 − y)·ln(1 − p)] in nats, p clipped to
    [1e-15, 1 − 1e-15] so one confident mistake costs at most 34.5: scikit-learn's
    `log_loss` with its former fixed clipping (it now clips at machine epsilon, which
    differs only for p within 1e-15 of 0 or 1)."""

    value: float
    label: ClassVar[str] = "NLL (log loss)"


class _LabelledByEstimator:
    estimator: Estimator

    @property
    def label(self) -> str:
        return self.estimator.label


@dataclass(frozen=True)
class ExpectedCalibrationError(_LabelledByEstimator):
    """Binned expected calibration error. L1: Σ_b (n_b/n)·|conf_b − acc_b| (Naeini, Cooper
    & Hauskrecht 2015, "Obtaining well calibrated probabilities using Bayesian binning";
    Guo et al. 2017, "On calibration of modern neural networks"). L2: the root of the
    count-weighted mean squared gap, √(Σ_b (n_b/n)·(conf_b − acc_b)²) (Kumar, Liang & Ma
    2019, "Verified uncertainty calibration"). conf_b is a bin's mean confidence, acc_b its
    frequency of the outcome; `estimator` says which bins and form."""

    value: float
    estimator: Estimator


@dataclass(frozen=True)
class MaximumCalibrationError(_LabelledByEstimator):
    """The largest |conf_b − acc_b| over the non-empty equal-width bins (Naeini, Cooper &
    Hauskrecht 2015, "Obtaining well calibrated probabilities using Bayesian binning")."""

    value: float
    estimator: Estimator


@dataclass(frozen=True)
class AdaptiveCalibrationError(_LabelledByEstimator):
    """Adaptive calibration error: the unweighted mean of |conf_b − acc_b| over non-empty
    equal-mass bins (Nixon et al. 2019, "Measuring calibration in deep learning"), here
    for the one binary P(y=1) column rather than averaged over classes."""

    value: float
    estimator: Estimator


@dataclass(frozen=True)
class SmoothCalibrationError(_LabelledByEstimator):
    """Smooth ECE (Błasiok & Nakkiran 2023, "Smooth ECE: Principled reliability diagrams
    via kernel smoothing"): smECE_σ = ∫₀¹ |(1/n)·Σᵢ K_σ(t, pᵢ)·(pᵢ − yᵢ)| dt, where K_σ is
    the Gaussian kernel of width σ reflected at 0 and 1, taken at the bandwidth σ* where
    smECE_σ* = σ*. The kernel acts on a fine grid (`SMOOTH_GRID_CELLS`) and σ* is not
    resolved below `SMALLEST_BANDWIDTH`, as in the authors' `relplot.smECE`, which this
    matches to about 1e-3 where its coarser discretisation is exact enough: it truncates
    the kernel at distance 0.5, which shows when σ* is large and p − y changes sign along
    [0, 1], and gives predictions at exactly 0 or 1 half their weight. Reports give it no bootstrap interval: the bandwidth
    search per resample would cost more than every other metric together."""

    value: float
    bandwidth: float
    estimator: Estimator


@dataclass(frozen=True)
class DebiasedCalibrationError(_LabelledByEstimator):
    """Debiased L2 calibration error (Kumar, Liang & Ma 2019, "Verified uncertainty
    calibration"): √max(0, Σ_b (n_b/n)·[(conf_b − acc_b)² − acc_b(1 − acc_b)/(n_b − 1)]),
    bins with fewer than two items adding nothing. It removes the upward bias that label
    noise gives the plug-in squared gap; it is what their `calibration` package's
    `get_calibration_error(p, y, debias=True)` computes, by default on 15 equal-mass bins."""

    value: float
    estimator: Estimator


Metric = (
    Accuracy | Auroc | Auprc | BrierScore | LogLoss | ExpectedCalibrationError | MaximumCalibrationError
    | AdaptiveCalibrationError | SmoothCalibrationError | DebiasedCalibrationError
)  # fmt: skip


@dataclass(frozen=True)
class ReliabilityBin:
    """One bin of a reliability diagram. Equal-width bins span their edges; equal-mass bins
    span their smallest and largest prediction. The means are None for an empty bin."""

    lower: float
    upper: float
    count: int
    mean_confidence: float | None
    accuracy: float | None


@dataclass(frozen=True)
class ConfidenceHistogram:
    """Counts of P(y=1) in the equal-width bins whose `edges` are given (bins + 1 values)."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]


# --- Point metrics -----------------------------------------------------------------------


def accuracy(y: npt.ArrayLike, p: npt.ArrayLike) -> Accuracy:
    labels, probabilities = _checked(y, p)
    return Accuracy(float(np.mean((probabilities >= THRESHOLD) == (labels == 1))))


def base_rate(y: npt.ArrayLike) -> BaseRate:
    labels = _checked_labels(y)
    return BaseRate(float(np.mean(labels)))


def auroc(y: npt.ArrayLike, p: npt.ArrayLike) -> Auroc:
    return Auroc(_finite_or_none(_auroc_of_tie_prefixes(*_tie_prefixes(*_checked(y, p)))))


def auprc(y: npt.ArrayLike, p: npt.ArrayLike) -> Auprc:
    return Auprc(_finite_or_none(_average_precision_of_tie_prefixes(*_tie_prefixes(*_checked(y, p)))))


def brier(y: npt.ArrayLike, p: npt.ArrayLike) -> BrierScore:
    labels, probabilities = _checked(y, p)
    return BrierScore(float(np.mean((probabilities - labels) ** 2)))


def nll(y: npt.ArrayLike, p: npt.ArrayLike) -> LogLoss:
    labels, probabilities = _checked(y, p)
    return LogLoss(float(np.mean(_item_log_loss(labels, probabilities))))


def ece(
    y: npt.ArrayLike, p: npt.ArrayLike, bins: int = 15,
    binning: Literal["equal_width", "equal_mass"] = "equal_width",
    norm: Literal["l1", "l2"] = "l1", form: Form = "binary",
) -> ExpectedCalibrationError:  # fmt: skip
    _check_choice("norm", norm, ("l1", "l2"))
    sums = _bin_sums(*_checked(y, p), bins, binning, form)
    return ExpectedCalibrationError(float(_count_weighted_gap(sums, norm)), Estimator("ece", bins, binning, norm, form))


def mce(y: npt.ArrayLike, p: npt.ArrayLike, bins: int = 15) -> MaximumCalibrationError:
    sums = _bin_sums(*_checked(y, p), bins, "equal_width", "binary")
    return MaximumCalibrationError(float(_largest_gap(sums)), Estimator("mce", bins, "equal_width", "max", "binary"))


def ace(y: npt.ArrayLike, p: npt.ArrayLike, bins: int = 15) -> AdaptiveCalibrationError:
    sums = _bin_sums(*_checked(y, p), bins, "equal_mass", "binary")
    return AdaptiveCalibrationError(float(_bin_averaged_gap(sums)), Estimator("ace", bins, "equal_mass", "l1", "binary"))


def debiased_ece(
    y: npt.ArrayLike, p: npt.ArrayLike, bins: int = 15, binning: Literal["equal_width", "equal_mass"] = "equal_mass"
) -> DebiasedCalibrationError:
    sums = _bin_sums(*_checked(y, p), bins, binning, "binary")
    return DebiasedCalibrationError(float(_debiased_l2_gap(sums)), Estimator("debiased_ece", bins, binning, "l2", "binary"))


def smooth_ece(y: npt.ArrayLike, p: npt.ArrayLike) -> SmoothCalibrationError:
    labels, probabilities = _checked(y, p)
    residual_spectrum = _reflected_spectrum(_grid_masses(probabilities, probabilities - labels))
    density_spectrum = _reflected_spectrum(_grid_masses(probabilities, np.ones_like(probabilities)))

    def smooth_ece_at(bandwidth: float) -> float:
        kernel_spectrum = np.fft.rfft(_periodic_kernel(bandwidth))
        residual = _on_unit_interval(residual_spectrum * kernel_spectrum)
        density = _on_unit_interval(density_spectrum * kernel_spectrum)
        # The ratio of two trapezoid integrals: the density integrates to 1 exactly, so
        # dividing by its discrete integral cancels the kernel's discretisation error.
        return float(_trapezoid(np.abs(residual)) / _trapezoid(density))

    bandwidth = _self_consistent_bandwidth(smooth_ece_at)
    estimator = Estimator("smooth_ece", None, "kernel", "l1", "binary")
    return SmoothCalibrationError(smooth_ece_at(bandwidth), bandwidth, estimator)


def reliability_bins(
    y: npt.ArrayLike, p: npt.ArrayLike, bins: int = 15, binning: Literal["equal_width", "equal_mass"] = "equal_width"
) -> list[ReliabilityBin]:
    """The binary-form bins behind `ece`: every equal-width bin, empty ones included; the
    non-empty equal-mass bins (some are empty only when there are fewer items than bins)."""
    labels, probabilities = _checked(y, p)
    sums = _sums_by_bin(_bin_ids(labels, probabilities, bins, binning), probabilities, labels, bins)
    if binning == "equal_width":
        edges = np.linspace(0.0, 1.0, bins + 1)
        lowers, uppers = edges[:-1], edges[1:]
    else:
        # Equal-mass bins are consecutive runs of the sorted predictions.
        ordered = np.sort(probabilities)
        cuts = np.concatenate([[0], np.cumsum(_equal_mass_sizes(len(ordered), bins))])
        lowers, uppers = ordered[np.minimum(cuts[:-1], len(ordered) - 1)], ordered[np.maximum(cuts[1:] - 1, 0)]
    return [
        ReliabilityBin(
            lower=float(lowers[b]),
            upper=float(uppers[b]),
            count=int(sums.count[b]),
            mean_confidence=_mean_or_none(sums.confidence[b], sums.count[b]),
            accuracy=_mean_or_none(sums.outcome[b], sums.count[b]),
        )
        for b in range(bins)
        if binning == "equal_width" or sums.count[b] > 0
    ]


def confidence_histogram(p: npt.ArrayLike, bins: int = 15) -> ConfidenceHistogram:
    probabilities = _checked_probabilities(p)
    counts = np.bincount(_equal_width_ids(probabilities, bins), minlength=bins)
    return ConfidenceHistogram(tuple(np.linspace(0.0, 1.0, bins + 1).tolist()), tuple(counts.tolist()))


# --- Reports -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A value with its percentile bootstrap interval (None when it was not bootstrapped or
    no resample defined it) and the label and estimator of the metric it measures."""

    value: float | None
    interval: Interval | None
    label: str
    estimator: Estimator | None = None

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "value": _finite_or_none(self.value),
            "interval": None if self.interval is None else [float(bound) for bound in self.interval],
            "label": self.label,
        }
        if self.estimator is not None:
            entry["estimator"] = asdict(self.estimator)
        return entry


@dataclass(frozen=True)
class BootstrapSettings:
    """Percentile bootstrap: `resamples` rows of `numpy.random.default_rng(seed).integers(0,
    n, size=(resamples, n))`, each a resample of the items; the interval holds the central
    `level` of the resampled values."""

    resamples: int
    seed: int
    level: float


@dataclass(frozen=True)
class CalibrationReport:
    """Every metric of one probe on one set of items (§5), with bootstrap intervals."""

    n: int
    base_rate: float
    metrics: Mapping[str, Estimate]
    bins: Mapping[str, tuple[ReliabilityBin, ...]]
    histogram: ConfidenceHistogram
    bootstrap: BootstrapSettings

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values only: no numpy types, and None where a value is undefined."""
        return {
            "n": self.n,
            "base_rate": self.base_rate,
            "metrics": {name: estimate.to_dict() for name, estimate in self.metrics.items()},
            "bins": {binning: [asdict(bin_) for bin_ in bins] for binning, bins in self.bins.items()},
            "histogram": {"edges": list(self.histogram.edges), "counts": list(self.histogram.counts)},
            "bootstrap": asdict(self.bootstrap),
        }


@dataclass(frozen=True)
class PairedDifferences:
    """For each metric, b − a on the same items, with a paired percentile bootstrap
    interval: both predictions are scored on the same resamples, so the interval measures
    the difference's own variability rather than the two metrics' separate ones."""

    n: int
    metrics: Mapping[str, Estimate]
    bootstrap: BootstrapSettings

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """`{metric name: {"value", "interval", "label"[, "estimator"]}}`, the shape a
        report's "metrics" has and the renderer's differences take."""
        return {name: estimate.to_dict() for name, estimate in self.metrics.items()}


def calibration_report(
    y: npt.ArrayLike, p: npt.ArrayLike, *, bins: int = 15, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> CalibrationReport:
    """All metrics of §5 with percentile bootstrap intervals; `resamples=0` skips them."""
    labels, probabilities = _checked(y, p)
    settings = _bootstrap_settings(resamples, seed, level)
    values = _point_metrics(labels, probabilities, bins)
    resampled = _resampled_values(labels, [probabilities], bins, settings)[0]
    return CalibrationReport(
        n=len(labels),
        base_rate=base_rate(labels).value,
        metrics={name: _estimate(metric, _percentile_interval(resampled.get(name), level)) for name, metric in values.items()},
        bins={
            "equal_width": tuple(reliability_bins(labels, probabilities, bins, "equal_width")),
            "equal_mass": tuple(reliability_bins(labels, probabilities, bins, "equal_mass")),
        },
        histogram=confidence_histogram(probabilities, bins),
        bootstrap=settings,
    )


def paired_differences(
    y: npt.ArrayLike, p_a: npt.ArrayLike, p_b: npt.ArrayLike, *,
    bins: int = 15, resamples: int = 1000, seed: int = 0, level: float = 0.95,
) -> PairedDifferences:  # fmt: skip
    """Each metric of `p_b` minus the same metric of `p_a` on the same items and labels."""
    labels, first = _checked(y, p_a)
    second = _checked(labels, p_b)[1]
    settings = _bootstrap_settings(resamples, seed, level)
    values_a, values_b = _point_metrics(labels, first, bins), _point_metrics(labels, second, bins)
    resampled_a, resampled_b = _resampled_values(labels, [first, second], bins, settings)
    differences = {}
    for name, metric in values_b.items():
        value_a, value_b = values_a[name].value, metric.value
        difference = None if value_a is None or value_b is None else value_b - value_a
        rows = resampled_b[name] - resampled_a[name] if name in resampled_b else None
        differences[name] = Estimate(difference, _percentile_interval(rows, level), metric.label, getattr(metric, "estimator", None))
    return PairedDifferences(len(labels), differences, settings)


def resampled_metrics(y: npt.ArrayLike, p: npt.ArrayLike, indices: npt.ArrayLike, *, bins: int = 15) -> dict[str, np.ndarray]:
    """Every bootstrapped metric (all but smooth ECE) of each row of `indices`, a
    (resamples, n) matrix of item indices: row r is the data set (y[indices[r]],
    p[indices[r]]). AUROC and AUPRC are NaN for a row that holds one class only."""
    labels, probabilities = _checked(y, p)
    index_matrix = np.asarray(indices)
    if index_matrix.ndim != 2 or index_matrix.shape[1] != len(labels) or not np.issubdtype(index_matrix.dtype, np.integer):
        raise ValueError(f"indices must be an integer matrix of shape (resamples, {len(labels)})")
    if index_matrix.size and (index_matrix.min() < 0 or index_matrix.max() >= len(labels)):
        raise ValueError(f"indices must lie in [0, {len(labels)})")
    plan = _ResamplingPlan.of(labels, probabilities, bins)
    rows_per_block = _rows_per_block(len(labels))
    blocks = [plan.metrics_of(index_matrix[start : start + rows_per_block]) for start in range(0, len(index_matrix), rows_per_block)]
    return _concatenated(blocks, plan)


# --- Inputs ---------------------------------------------------------------------------------


def _checked_labels(y: npt.ArrayLike) -> np.ndarray:
    labels = np.asarray(y)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError("y must be a non-empty 1-D array")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("y must hold only 0 and 1")
    return labels.astype(np.float64)


def _checked_probabilities(p: npt.ArrayLike) -> np.ndarray:
    probabilities = np.asarray(p, dtype=np.float64)
    if probabilities.ndim != 1 or probabilities.size == 0:
        raise ValueError("p must be a non-empty 1-D array")
    if not (np.isfinite(probabilities).all() and probabilities.min() >= 0.0 and probabilities.max() <= 1.0):
        raise ValueError("p must hold probabilities in [0, 1]")
    return probabilities


def _checked(y: npt.ArrayLike, p: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    labels, probabilities = _checked_labels(y), _checked_probabilities(p)
    if len(labels) != len(probabilities):
        raise ValueError(f"y and p must have the same length, not {len(labels)} and {len(probabilities)}")
    return labels, probabilities


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


def _bootstrap_settings(resamples: int, seed: int, level: float) -> BootstrapSettings:
    if resamples < 0:
        raise ValueError("resamples must be 0 or more")
    if not 0.0 < level < 1.0:
        raise ValueError("level must lie strictly between 0 and 1")
    return BootstrapSettings(int(resamples), int(seed), float(level))


# --- Discrimination ----------------------------------------------------------------------


def _tie_prefixes(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positives and items with p below each distinct p, in increasing order, then the totals."""
    values, group = np.unique(probabilities, return_inverse=True)
    positives = np.bincount(group, weights=labels, minlength=len(values))
    counts = np.bincount(group, minlength=len(values))
    return np.concatenate([[0.0], np.cumsum(positives)]), np.concatenate([[0.0], np.cumsum(counts)])


def _auroc_of_tie_prefixes(positive_prefix: np.ndarray, count_prefix: np.ndarray) -> np.ndarray:
    """U / (n₁·n₀) along the last axis, from `_tie_prefixes`-shaped arrays. Each positive
    beats the negatives below its p and ties half of those at its p, so it scores the mean
    of the negatives below its p and those at or below it. NaN without both classes."""
    positives = np.diff(positive_prefix, axis=-1)
    negative_prefix = count_prefix - positive_prefix
    u = 0.5 * np.sum(positives * (negative_prefix[..., :-1] + negative_prefix[..., 1:]), axis=-1)
    pairs = positive_prefix[..., -1] * negative_prefix[..., -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, u / pairs, np.nan)


def _average_precision_of_tie_prefixes(positive_prefix: np.ndarray, count_prefix: np.ndarray) -> np.ndarray:
    """Σ over thresholds at each distinct p of (recall gained)·(precision there), along the
    last axis; a threshold keeps the items with p at or above it. NaN without both classes."""
    positives = np.diff(positive_prefix, axis=-1)
    positive_total, total = positive_prefix[..., -1:], count_prefix[..., -1:]
    kept_positives = positive_total - positive_prefix[..., :-1]
    # A threshold that keeps nothing gains no recall, so any non-zero denominator will do.
    precision = kept_positives / np.maximum(total - count_prefix[..., :-1], 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        average = np.sum(positives * precision, axis=-1) / positive_total[..., 0]
    has_both_classes = (positive_total[..., 0] > 0) & (positive_total[..., 0] < total[..., 0])
    return np.where(has_both_classes, average, np.nan)


def _item_log_loss(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    clipped = np.clip(probabilities, LOG_LOSS_CLIP, 1.0 - LOG_LOSS_CLIP)
    return -(labels * np.log(clipped) + (1.0 - labels) * np.log1p(-clipped))


# --- Binned calibration error ----------------------------------------------------------------


@dataclass(frozen=True)
class _BinSums:
    """Per bin (last axis): item count, sum of confidences, sum of outcomes."""

    count: np.ndarray
    confidence: np.ndarray
    outcome: np.ndarray


def _confidence_and_outcome(labels: np.ndarray, probabilities: np.ndarray, form: Form) -> tuple[np.ndarray, np.ndarray]:
    _check_choice("form", form, ("binary", "max_probability"))
    if form == "binary":
        return probabilities, labels
    says_correct = probabilities >= THRESHOLD
    return np.where(says_correct, probabilities, 1.0 - probabilities), (says_correct == (labels == 1)).astype(np.float64)


def _equal_width_ids(confidences: np.ndarray, bins: int) -> np.ndarray:
    """Bin b holds [b/B, (b+1)/B) by the published edges; 1.0 goes in the last bin."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.minimum(np.searchsorted(edges, confidences, side="right") - 1, bins - 1)


def _equal_mass_sizes(count: int, bins: int) -> np.ndarray:
    """The group sizes of `numpy.array_split(range(count), bins)`: the first `count % bins`
    groups hold one more."""
    sizes = np.full(bins, count // bins)
    sizes[: count % bins] += 1
    return sizes


def _equal_mass_ids(confidences: np.ndarray, outcomes: np.ndarray, bins: int) -> np.ndarray:
    # Sorting by (confidence, outcome) makes tied items interchangeable, so the bins depend
    # only on the data, not on the order the items came in.
    order = np.lexsort((outcomes, confidences))
    ids = np.empty(len(order), dtype=np.intp)
    ids[order] = np.repeat(np.arange(bins), _equal_mass_sizes(len(order), bins))
    return ids


def _bin_ids(labels: np.ndarray, probabilities: np.ndarray, bins: int, binning: str, form: Form = "binary") -> np.ndarray:
    if bins < 1:
        raise ValueError("bins must be 1 or more")
    _check_choice("binning", binning, ("equal_width", "equal_mass"))
    confidences, outcomes = _confidence_and_outcome(labels, probabilities, form)
    if binning == "equal_width":
        return _equal_width_ids(confidences, bins)
    return _equal_mass_ids(confidences, outcomes, bins)


def _bin_sums(labels: np.ndarray, probabilities: np.ndarray, bins: int, binning: str, form: Form) -> _BinSums:
    confidences, outcomes = _confidence_and_outcome(labels, probabilities, form)
    return _sums_by_bin(_bin_ids(labels, probabilities, bins, binning, form), confidences, outcomes, bins)


def _sums_by_bin(ids: np.ndarray, confidences: np.ndarray, outcomes: np.ndarray, bins: int) -> _BinSums:
    return _BinSums(
        np.bincount(ids, minlength=bins).astype(np.float64),
        np.bincount(ids, weights=confidences, minlength=bins),
        np.bincount(ids, weights=outcomes, minlength=bins),
    )


def _gaps(sums: _BinSums) -> np.ndarray:
    """|mean confidence − mean outcome| per bin; 0 for an empty bin."""
    return np.divide(np.abs(sums.confidence - sums.outcome), sums.count, out=np.zeros_like(sums.count), where=sums.count > 0)


def _count_weighted_gap(sums: _BinSums, norm: str) -> np.ndarray:
    total = sums.count.sum(axis=-1)
    if norm == "l1":
        return np.abs(sums.confidence - sums.outcome).sum(axis=-1) / total
    return np.sqrt(np.sum(sums.count * _gaps(sums) ** 2, axis=-1) / total)


def _largest_gap(sums: _BinSums) -> np.ndarray:
    return np.max(np.where(sums.count > 0, _gaps(sums), -np.inf), axis=-1)


def _bin_averaged_gap(sums: _BinSums) -> np.ndarray:
    return _gaps(sums).sum(axis=-1) / np.count_nonzero(sums.count, axis=-1)


def _debiased_l2_gap(sums: _BinSums) -> np.ndarray:
    total = sums.count.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        frequency = sums.outcome / sums.count
        noise = frequency * (1.0 - frequency) / (sums.count - 1.0)
    per_bin = np.where(sums.count >= 2, _gaps(sums) ** 2 - noise, 0.0)
    return np.sqrt(np.maximum(np.sum(sums.count * per_bin, axis=-1) / total, 0.0))


# --- Smooth calibration error -------------------------------------------------------------


def _grid_masses(positions: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each weight split between the two grid nodes around its position, in proportion
    to nearness, on `SMOOTH_GRID_CELLS + 1` nodes over [0, 1]."""
    scaled = positions * SMOOTH_GRID_CELLS
    left = np.minimum(np.floor(scaled).astype(np.intp), SMOOTH_GRID_CELLS - 1)
    right_share = scaled - left
    nodes = SMOOTH_GRID_CELLS + 1
    return np.bincount(left, weights=(1.0 - right_share) * weights, minlength=nodes) + np.bincount(
        left + 1, weights=right_share * weights, minlength=nodes
    )


def _reflected_spectrum(masses: np.ndarray) -> np.ndarray:
    """The Fourier transform of the masses mirrored about 0 and 1 into one period [-1, 1)
    of an even, 2-periodic sequence: convolving it with a periodic Gaussian is smoothing
    with the reflected kernel. A mass on an end node is its own mirror image, so it counts
    twice (the reflected kernel at x = 0 is 2·φ(t))."""
    mirrored = np.concatenate([masses, masses[-2:0:-1]])
    mirrored[0] *= 2.0
    mirrored[SMOOTH_GRID_CELLS] *= 2.0
    return np.fft.rfft(mirrored)


def _periodic_kernel(bandwidth: float) -> np.ndarray:
    """The Gaussian density of width `bandwidth`, summed over its period-2 images, at the
    grid's offsets around one period."""
    period_nodes = 2 * SMOOTH_GRID_CELLS
    offsets = np.arange(period_nodes) / SMOOTH_GRID_CELLS
    images = offsets[None, :] + 2.0 * np.array(KERNEL_IMAGES)[:, None]
    return np.exp(-0.5 * (images / bandwidth) ** 2).sum(axis=0) / (math.sqrt(2.0 * math.pi) * bandwidth)


def _on_unit_interval(spectrum: np.ndarray) -> np.ndarray:
    return np.fft.irfft(spectrum, n=2 * SMOOTH_GRID_CELLS)[: SMOOTH_GRID_CELLS + 1]


def _trapezoid(values: np.ndarray) -> float:
    return float(values.sum() - 0.5 * (values[0] + values[-1]))


def _self_consistent_bandwidth(smooth_ece_at: Callable[[float], float]) -> float:
    """The σ* with smECE_σ* = σ*. smECE_σ falls as σ grows, so smECE_σ − σ changes sign
    once in [floor, 1]; bisection keeps the upper end, where smECE_σ ≤ σ."""
    low, high = SMALLEST_BANDWIDTH, 1.0
    if smooth_ece_at(low) <= low:
        return low
    while high - low > BANDWIDTH_TOLERANCE:
        middle = 0.5 * (low + high)
        if smooth_ece_at(middle) > middle:
            low = middle
        else:
            high = middle
    return high


# --- The report ------------------------------------------------------------------------------


def _point_metrics(labels: np.ndarray, probabilities: np.ndarray, bins: int) -> dict[str, Metric]:
    return {
        "accuracy": accuracy(labels, probabilities),
        "auroc": auroc(labels, probabilities),
        "auprc": auprc(labels, probabilities),
        "brier": brier(labels, probabilities),
        "nll": nll(labels, probabilities),
        "ece": ece(labels, probabilities, bins),
        "ece_equal_mass": ece(labels, probabilities, bins, "equal_mass"),
        "ece_l2": ece(labels, probabilities, bins, norm="l2"),
        "ece_equal_mass_l2": ece(labels, probabilities, bins, "equal_mass", "l2"),
        "ece_max_probability": ece(labels, probabilities, bins, form="max_probability"),
        "mce": mce(labels, probabilities, bins),
        "ace": ace(labels, probabilities, bins),
        "smooth_ece": smooth_ece(labels, probabilities),
        "debiased_ece": debiased_ece(labels, probabilities, bins),
    }


def _estimate(metric: Metric, interval: Interval | None) -> Estimate:
    return Estimate(metric.value, interval, metric.label, getattr(metric, "estimator", None))


def _percentile_interval(rows: np.ndarray | None, level: float) -> Interval | None:
    """Plain percentile interval. For binned ECE it can sit above the point estimate:
    resampling duplicates items, which makes every bin look noisier, so the resampled ECEs
    run high. `debiased_ece` is the estimate to read when that matters."""
    if rows is None or not np.isfinite(rows).any():
        return None
    lower, upper = np.nanpercentile(rows, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
    return float(lower), float(upper)


def _finite_or_none(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _mean_or_none(total: float, count: float) -> float | None:
    return float(total / count) if count > 0 else None


# --- The vectorised bootstrap ------------------------------------------------------------


def _rows_per_block(item_count: int) -> int:
    return max(1, BOOTSTRAP_BLOCK_ITEMS // item_count)


def _index_blocks(item_count: int, settings: BootstrapSettings) -> Iterator[np.ndarray]:
    """`default_rng(seed).integers(0, n, size=(resamples, n))` drawn a block of rows at a
    time: the generator fills rows in order, so the blocks stack into that same matrix."""
    generator = np.random.default_rng(settings.seed)
    rows_per_block = _rows_per_block(item_count)
    for start in range(0, settings.resamples, rows_per_block):
        yield generator.integers(0, item_count, size=(min(rows_per_block, settings.resamples - start), item_count))


def _resampled_values(
    labels: np.ndarray, predictions: list[np.ndarray], bins: int, settings: BootstrapSettings
) -> list[dict[str, np.ndarray]]:
    """The metrics of every resample for each prediction vector, all on the same resamples."""
    if settings.resamples == 0:
        return [{} for _ in predictions]
    plans = [_ResamplingPlan.of(labels, probabilities, bins) for probabilities in predictions]
    blocks: list[list[dict[str, np.ndarray]]] = [[] for _ in plans]
    for indices in _index_blocks(len(labels), settings):
        for plan, plan_blocks in zip(plans, blocks, strict=True):
            plan_blocks.append(plan.metrics_of(indices))
    return [_concatenated(plan_blocks, plan) for plan, plan_blocks in zip(plans, blocks, strict=True)]


def _concatenated(blocks: list[dict[str, np.ndarray]], plan: _ResamplingPlan) -> dict[str, np.ndarray]:
    if not blocks:
        return {name: np.empty(0) for name in plan.metric_names}
    return {name: np.concatenate([block[name] for block in blocks]) for name in blocks[0]}


@dataclass(frozen=True)
class _Runs:
    """Stretches of the sorted items that share a bin: run r spans positions
    bounds[r]:bounds[r+1] and falls in bin `bin_of_run[r]`. A `flipped` run lies below the
    threshold, where the max-probability form's confidence is 1 − p and its outcome 1 − y."""

    bounds: np.ndarray
    bin_of_run: np.ndarray
    flipped: np.ndarray

    def sums(self, prefix_count: np.ndarray, prefix_probability: np.ndarray, prefix_outcome: np.ndarray, bins: int) -> _BinSums:
        """Bin sums from prefix sums (resamples, n + 1) of the drawn counts, counts·p and counts·y."""
        run_count, run_probability, run_outcome = (
            np.diff(prefix[:, self.bounds], axis=1) for prefix in (prefix_count, prefix_probability, prefix_outcome)
        )
        confidence = np.where(self.flipped, run_count - run_probability, run_probability)
        outcome = np.where(self.flipped, run_count - run_outcome, run_outcome)
        into_bins = np.zeros((len(self.bin_of_run), bins))
        into_bins[np.arange(len(self.bin_of_run)), self.bin_of_run] = 1.0
        return _BinSums(run_count @ into_bins, confidence @ into_bins, outcome @ into_bins)


@dataclass(frozen=True)
class _ResamplingPlan:
    """What every resample of one (y, p) shares. Items are sorted by (p, y); a resample is
    then the number of times it drew each sorted item, and equal-width bins, runs of tied
    p, and the equal-mass bins of the resample are all contiguous in that order, so each
    metric follows from prefix sums of counts, counts·p and counts·y."""

    bins: int
    rank: np.ndarray  # rank[i]: the sorted position of item i
    probabilities: np.ndarray  # sorted
    outcomes: np.ndarray  # sorted
    item_scores: np.ndarray  # (n, 2): squared error and log loss of each sorted item
    tie_bounds: np.ndarray | slice  # where each run of equal p starts, then n; all when p has no ties
    below_threshold: int  # how many items have p < 0.5
    binary_runs: _Runs
    max_probability_runs: _Runs
    equal_mass_cuts: np.ndarray  # positions in a sorted resample where equal-mass bins start, then n

    metric_names: ClassVar[tuple[str, ...]] = (
        "accuracy", "auroc", "auprc", "brier", "nll", "ece", "ece_equal_mass", "ece_l2", "ece_equal_mass_l2",
        "ece_max_probability", "mce", "ace", "debiased_ece",
    )  # fmt: skip

    @classmethod
    def of(cls, labels: np.ndarray, probabilities: np.ndarray, bins: int) -> _ResamplingPlan:
        if bins < 1:
            raise ValueError("bins must be 1 or more")
        order = np.lexsort((labels, probabilities))
        rank = np.empty(len(order), dtype=np.intp)
        rank[order] = np.arange(len(order))
        sorted_p, sorted_y = probabilities[order], labels[order]
        below_threshold = int(np.searchsorted(sorted_p, THRESHOLD, side="left"))
        return cls(
            bins=bins,
            rank=rank,
            probabilities=sorted_p,
            outcomes=sorted_y,
            item_scores=np.column_stack([(sorted_p - sorted_y) ** 2, _item_log_loss(sorted_y, sorted_p)]),
            tie_bounds=_tie_bounds(sorted_p),
            below_threshold=below_threshold,
            binary_runs=_binary_runs(sorted_p, bins),
            max_probability_runs=_max_probability_runs(sorted_p, below_threshold, bins),
            equal_mass_cuts=np.concatenate([[0], np.cumsum(_equal_mass_sizes(len(order), bins))]),
        )

    @property
    def n(self) -> int:
        return len(self.rank)

    def drawn_counts(self, indices: np.ndarray) -> np.ndarray:
        """(resamples, n): how often each resample drew each sorted item."""
        flat = self.rank[indices] + np.arange(len(indices))[:, None] * self.n
        return np.bincount(flat.ravel(), minlength=flat.size).reshape(indices.shape).astype(np.float64)

    def metrics_of(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        counts = self.drawn_counts(indices)
        prefixes = [_prefix_sums(counts), _prefix_sums(counts * self.probabilities), _prefix_sums(counts * self.outcomes)]
        prefix_count, _, prefix_outcome = prefixes
        equal_width = self.binary_runs.sums(*prefixes, self.bins)
        equal_mass = self._equal_mass_sums(*prefixes)
        tie_prefixes = prefix_outcome[:, self.tie_bounds], prefix_count[:, self.tie_bounds]
        brier_total, log_loss_total = (counts @ self.item_scores).T
        return {
            "accuracy": self._correct_counts(prefix_count, prefix_outcome) / self.n,
            "auroc": _auroc_of_tie_prefixes(*tie_prefixes),
            "auprc": _average_precision_of_tie_prefixes(*tie_prefixes),
            "brier": brier_total / self.n,
            "nll": log_loss_total / self.n,
            "ece": _count_weighted_gap(equal_width, "l1"),
            "ece_equal_mass": _count_weighted_gap(equal_mass, "l1"),
            "ece_l2": _count_weighted_gap(equal_width, "l2"),
            "ece_equal_mass_l2": _count_weighted_gap(equal_mass, "l2"),
            "ece_max_probability": _count_weighted_gap(self.max_probability_runs.sums(*prefixes, self.bins), "l1"),
            "mce": _largest_gap(equal_width),
            "ace": _bin_averaged_gap(equal_mass),
            "debiased_ece": _debiased_l2_gap(equal_mass),
        }

    def _correct_counts(self, prefix_count: np.ndarray, prefix_outcome: np.ndarray) -> np.ndarray:
        """Incorrect items below the threshold plus correct ones at or above it."""
        below = self.below_threshold
        wrong_below = prefix_count[:, below] - prefix_outcome[:, below]
        return wrong_below + prefix_outcome[:, -1] - prefix_outcome[:, below]

    def _equal_mass_sums(self, prefix_count: np.ndarray, prefix_probability: np.ndarray, prefix_outcome: np.ndarray) -> _BinSums:
        """The sorted resample lists item j counts[j] times; an equal-mass cut at position t
        falls inside the copies of the item j with prefix_count[j] ≤ t < prefix_count[j+1],
        so the sum of any quantity q before the cut is prefix_q[j] + (t − prefix_count[j])·q[j]."""
        rows, n = len(prefix_count), self.n
        # Offsetting row r by r·(n + 1) chains the rows' prefix counts into one increasing
        # sequence, so one searchsorted finds the straddled item of every cut in every row.
        offsets = np.arange(rows)[:, None] * (n + 1)
        targets = self.equal_mass_cuts[None, :] + offsets
        chained = (prefix_count + offsets).ravel()
        straddled = np.searchsorted(chained, targets.ravel(), side="right").reshape(targets.shape) - 1 - offsets
        straddled = np.minimum(straddled, n - 1)
        copies_before_cut = self.equal_mass_cuts[None, :] - np.take_along_axis(prefix_count, straddled, axis=1)

        def before_cuts(prefix: np.ndarray, values: np.ndarray) -> np.ndarray:
            return np.take_along_axis(prefix, straddled, axis=1) + copies_before_cut * values[straddled]

        return _BinSums(
            np.diff(np.broadcast_to(self.equal_mass_cuts, targets.shape), axis=1).astype(np.float64),
            np.diff(before_cuts(prefix_probability, self.probabilities), axis=1),
            np.diff(before_cuts(prefix_outcome, self.outcomes), axis=1),
        )


def _prefix_sums(values: np.ndarray) -> np.ndarray:
    prefix = np.zeros((values.shape[0], values.shape[1] + 1))
    np.cumsum(values, axis=1, out=prefix[:, 1:])
    return prefix


def _tie_bounds(sorted_probabilities: np.ndarray) -> np.ndarray | slice:
    """Where each run of equal p starts, then n. Without ties that is every position, and
    a slice then takes the prefix sums as they are instead of copying them."""
    starts = np.flatnonzero(np.diff(sorted_probabilities)) + 1
    if len(starts) == len(sorted_probabilities) - 1:
        return slice(None)
    return np.concatenate([[0], starts, [len(sorted_probabilities)]])


def _binary_runs(sorted_probabilities: np.ndarray, bins: int) -> _Runs:
    """Equal-width bins of P(y=1) are themselves runs of the sorted items."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    starts = np.searchsorted(sorted_probabilities, edges[1:-1], side="left")
    bounds = np.concatenate([[0], starts, [len(sorted_probabilities)]])
    return _Runs(bounds, np.arange(bins), np.zeros(bins, dtype=bool))


def _max_probability_runs(sorted_probabilities: np.ndarray, below_threshold: int, bins: int) -> _Runs:
    """Confidence max(p, 1 − p) falls as p rises to 0.5 and rises after it, so its bins
    are runs too, at most two per bin; a run never crosses the threshold."""
    says_correct = np.arange(len(sorted_probabilities)) >= below_threshold
    confidences = np.where(says_correct, sorted_probabilities, 1.0 - sorted_probabilities)
    ids = _equal_width_ids(confidences, bins)
    changes = np.flatnonzero((np.diff(ids) != 0) | (np.diff(says_correct.astype(np.int8)) != 0)) + 1
    starts = np.concatenate([[0], changes])
    return _Runs(np.concatenate([starts, [len(ids)]]), ids[starts], ~says_correct[starts])
