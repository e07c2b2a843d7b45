"""The typed values the calibration modules return, each naming its definition and source.

`y` ∈ {0, 1} says whether the answer or statement is correct (1 = correct) and `p` is the
probe's P(y = 1). Every metric is a small frozen dataclass whose docstring names the
definition and its source; calibration errors also carry an `Estimator` that says which
variant they are (ECE has many). A report holds `Estimate`s: a value with its bootstrap
interval and the method of that interval (`IntervalMethod`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

Binning = Literal["equal_width", "equal_mass", "kernel"]
Norm = Literal["l1", "l2", "max"]
Form = Literal["binary", "max_probability"]
Interval = tuple[float, float]
# "percentile": the central quantiles of the resampled values (Efron & Tibshirani 1993, ch. 13).
# "bca": bias-corrected and accelerated percentiles (Efron 1987), acceleration from the jackknife.
# "basic": the percentiles reflected about the estimate, 2θ̂ − q (Davison & Hinkley 1997, §5.2).
IntervalMethod = Literal["percentile", "bca", "basic"]

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
class AreaUnderRiskCoverage:
    """Area under the risk–coverage curve (Geifman & El-Yaniv 2017, "Selective classification
    for deep neural networks"; as LM-Polygraph reports it): keep the
    items in decreasing p; the risk at coverage k/n is the fraction of the k kept items with
    y = 0, and AURC = (1/n)·Σₖ riskₖ. Items tied in p are taken in every order equally
    likely, so the value does not depend on the input order: inside a tie group of c items
    with e errors, after N items with E errors, the expected risk at its j-th position is
    (E + j·e/c)/(N + j), and the group adds e + (E − N·e/c)·(H_{N+c} − H_N), H the harmonic
    numbers. Lower is better; a random order gives the error rate."""

    value: float
    label: ClassVar[str] = "AURC (risk–coverage area, lower is better)"


@dataclass(frozen=True)
class PredictionRejectionRatio:
    """Prediction–rejection ratio (Malinin et al. 2017, "Incorporating uncertainty into deep
    learning for spoken language assessment"; as LM-Polygraph reports it, Fadeeva et al.
    2023, "LM-Polygraph: Uncertainty estimation for language models"): (AURC_random − AURC)/(AURC_random − AURC_oracle), where
    AURC_random is the error rate (the AURC of a random order) and AURC_oracle the AURC
    when every correct item is kept before every wrong one, (n₀ − n₁·(H_n − H_{n₁}))/n. 1 is
    the oracle's order, 0 a random one, below 0 worse than random. None when y holds one
    class."""

    value: float | None
    label: ClassVar[str] = "PRR (prediction–rejection ratio, 1 = oracle, 0 = random)"


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
    Accuracy
    | Auroc
    | Auprc
    | AreaUnderRiskCoverage
    | PredictionRejectionRatio
    | BrierScore
    | LogLoss
    | ExpectedCalibrationError
    | MaximumCalibrationError
    | AdaptiveCalibrationError
    | SmoothCalibrationError
    | DebiasedCalibrationError
)


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


@dataclass(frozen=True)
class RiskCoverageCurve:
    """Expected risk (fraction of y = 0 among the kept items, ties in p in every order
    equally likely) when the most confident k items are kept, at coverage k/n: every k when
    n ≤ `RISK_COVERAGE_POINTS`, else k = 1 and, for each of 1/100, 2/100, …, 1, the smallest
    k with k/n at least that.
    The area under the full curve is `AreaUnderRiskCoverage`."""

    coverage: tuple[float, ...]
    risk: tuple[float, ...]


RISK_COVERAGE_POINTS = 101


# --- Reports -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A value with its bootstrap interval (None when it was not bootstrapped or no resample
    defined it), the method of that interval (None without one), and the label and
    estimator of the metric it measures."""

    value: float | None
    interval: Interval | None
    label: str
    estimator: Estimator | None = None
    interval_method: IntervalMethod | None = None

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "value": finite_or_none(self.value),
            "interval": None if self.interval is None else [float(bound) for bound in self.interval],
            "interval_method": self.interval_method if self.interval is not None else None,
            "label": self.label,
        }
        if self.estimator is not None:
            entry["estimator"] = asdict(self.estimator)
        return entry


@dataclass(frozen=True)
class BootstrapSettings:
    """Nonparametric bootstrap: `resamples` rows of `numpy.random.default_rng(seed).integers(0,
    n, size=(resamples, n))`, each a resample of the items; each interval covers `level` by
    the method its estimate names (`reporting.interval_of`)."""

    resamples: int
    seed: int
    level: float


@dataclass(frozen=True)
class CalibrationReport:
    """Every metric of one probe on one set of items (docs/concepts.md#reports), with bootstrap intervals."""

    n: int
    base_rate: float
    metrics: Mapping[str, Estimate]
    bins: Mapping[str, tuple[ReliabilityBin, ...]]
    histogram: ConfidenceHistogram
    risk_coverage: RiskCoverageCurve
    bootstrap: BootstrapSettings

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values only: no numpy types, and None where a value is undefined."""
        return {
            "n": self.n,
            "base_rate": self.base_rate,
            "metrics": {name: estimate.to_dict() for name, estimate in self.metrics.items()},
            "bins": {binning: [asdict(bin_) for bin_ in bins] for binning, bins in self.bins.items()},
            "histogram": {"edges": list(self.histogram.edges), "counts": list(self.histogram.counts)},
            "risk_coverage": {"coverage": list(self.risk_coverage.coverage), "risk": list(self.risk_coverage.risk)},
            "bootstrap": asdict(self.bootstrap),
        }


@dataclass(frozen=True)
class PairedDifferences:
    """For each metric, b − a on the same items, with a paired bootstrap interval: both
    predictions are scored on the same resamples (and, for BCa's acceleration, the same
    leave-one-out samples), so the interval measures the difference's own variability
    rather than the two metrics' separate ones. Each metric's interval has the method its
    report's has: a difference of two biased estimates is biased too."""

    n: int
    metrics: Mapping[str, Estimate]
    bootstrap: BootstrapSettings

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """`{metric name: {"value", "interval", "interval_method", "label"[, "estimator"]}}`, the shape a
        report's "metrics" has and the renderer's differences take."""
        return {name: estimate.to_dict() for name, estimate in self.metrics.items()}


def finite_or_none(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None
