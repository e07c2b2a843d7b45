"""Calibration reports as the workers store them (JSON in the artifact store) and the routes
serve them: one probe's report on a set of items, as `app.calibration.values` writes it
(`CalibrationReport.to_dict`), and a comparison's report, as `workers/comparison.py` writes it.

A stored report is served as it was written, old ones included: every model keeps keys it
does not declare (`extra="allow"`), and the routes that serve reports leave out fields a
stored report does not have (`response_model_exclude_unset`) rather than adding them as null.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.calibration.values import Binning, Form, IntervalMethod, Norm
from app.schemas.common import Dtype, Quantization

Interval = Annotated[list[float], Field(min_length=2, max_length=2)]


class StoredReportPart(BaseModel):
    """A part of a stored report: keys it does not declare are kept and served too."""

    model_config = ConfigDict(extra="allow")


class Estimator(StoredReportPart):
    """Which calibration-error estimator a value comes from (ECE has many)."""

    name: str = Field(description="`ece`, `mce`, `ace`, `smooth_ece` or `debiased_ece`.")
    bins: int | None = Field(description="Number of bins; null for the kernel of smooth ECE.")
    binning: Binning
    norm: Norm = Field(description="`l1` and `l2` average the per-bin gaps, `max` takes the largest.")
    form: Form = Field(
        description="`binary` compares P(correct) with the frequency of correct; "
        "`max_probability` compares max(p, 1 − p) with the accuracy of the thresholded prediction."
    )


class Estimate(StoredReportPart):
    """A metric's value with its bootstrap interval and the interval's method, and what it measures."""

    value: float | None = Field(description="Null where the metric is undefined (AUROC with one class).")
    interval: Interval | None = Field(
        description="Bootstrap interval at the report's `bootstrap.level`, by `interval_method`; "
        "null where the metric is not bootstrapped (smooth ECE) or no resample defined it."
    )
    interval_method: IntervalMethod | None = Field(
        None,
        description="`percentile`; `bca` (bias-corrected and accelerated) or `basic` (percentiles reflected about "
        "the value) for the binned calibration errors, whose resamples run above the value "
        "(docs/concepts.md#reports). Null without an interval; absent from reports stored before intervals "
        "named their method (all percentile).",
    )
    label: str | None = Field(
        None, description="The metric's definition in words; absent from a comparison's unpaired differences."
    )
    estimator: Estimator | None = Field(None, description="For calibration errors only: which estimator.")


class BaselineDifference(Estimate):
    """A metric of the probe minus the same metric of one baseline, on the same test items,
    with a paired percentile bootstrap interval (docs/concepts.md#baselines)."""

    better: Literal["higher", "lower"] = Field(description="Which way the metric improves.")
    verdict: Literal["probe better", "baseline better", "no clear difference"] = Field(
        description="`probe better` when the interval excludes 0 on the metric's better side, `baseline better` when "
        "it excludes 0 on the other, else `no clear difference` (also where there is no interval)."
    )


class ReliabilityBin(StoredReportPart):
    """One bin of a reliability diagram: equal-width bins span their edges, equal-mass bins
    their smallest and largest prediction."""

    lower: float
    upper: float
    count: int
    mean_confidence: float | None = Field(description="Null for an empty bin.")
    accuracy: float | None = Field(description="Frequency of correct in the bin; null for an empty bin.")


class ConfidenceHistogram(StoredReportPart):
    """Counts of P(correct) in equal-width bins."""

    edges: list[float] = Field(description="The bins' edges, one more than the counts.")
    counts: list[int]


class RiskCoverage(StoredReportPart):
    """The risk–coverage curve: keeping the most confident items first, the expected fraction
    wrong among the kept (ties in confidence in every order equally likely) at each coverage."""

    coverage: list[float] = Field(
        description="Fractions of the items kept, from 1/n to 1: every k/n for n ≤ 101, else 101 points."
    )
    risk: list[float] = Field(description="The fraction wrong among the kept items at each coverage.")


class BootstrapSettings(StoredReportPart):
    """Bootstrap: `resamples` resamples of the items drawn with `seed`; each interval covers
    `level` by its estimate's `interval_method`."""

    resamples: int
    seed: int
    level: float


class CalibrationReport(StoredReportPart):
    """Every metric of one probe (or the model's own probability) on one set of items."""

    n: int = Field(description="Items reported on.")
    base_rate: float = Field(description="Fraction of the items that are correct.")
    metrics: dict[str, Estimate] = Field(
        description="By name: accuracy, auroc, auprc, aurc, prr, brier, nll, and the calibration errors "
        "(ece and its variants, mce, ace, smooth_ece, debiased_ece)."
    )
    bins: dict[str, list[ReliabilityBin]] = Field(
        description="Reliability bins by binning: `equal_width`, `equal_mass`."
    )
    histogram: ConfidenceHistogram
    risk_coverage: RiskCoverage | None = Field(
        None, description="Absent from reports stored before reports had the curve."
    )
    bootstrap: BootstrapSettings


class ValidationSummary(StoredReportPart):
    """Point metrics on a validation split, where choices are made."""

    n: int
    auroc: float | None
    nll: float
    brier: float


class Precision(StoredReportPart):
    dtype: Dtype
    quantization: Quantization | None


class ComparisonVariant(StoredReportPart):
    """The base model, or one adapter of it, at the comparison's layer."""

    label: str = Field(description="`base`, or `adapter <name> (<id>)`; names the variant everywhere in the report.")
    model_id: str
    adapter_id: str | None
    precision: Precision
    report: CalibrationReport
    baselines: dict[str, CalibrationReport] = Field(
        default_factory=dict,
        description="The same for each of this model's own confidences, by name (docs/concepts.md#baselines). "
        "Absent from reports written before baselines were reported.",
    )
    versus_baselines: dict[str, dict[str, BaselineDifference]] = Field(
        default_factory=dict,
        description="By baseline, then by metric: this model's probe minus the baseline, with a paired bootstrap "
        "interval and a verdict. Absent where `baselines` is.",
    )


class CrossTransfer(StoredReportPart):
    """One model's probe on another model's hidden states, on the test split."""

    auroc: float | None
    ece: float
    brier: float
    n: int


class SelfLabelSummary(StoredReportPart):
    n: int
    accuracy: float = Field(description="Fraction of the questions the model answered right.")
    picks: dict[str, int] = Field(description="How often it picked each letter.")
    answers: dict[str, int] = Field(description="How often each letter is the gold answer.")


class RateDifference(StoredReportPart):
    value: float
    interval: list[float] | None
    estimator: str


class AnswerDifference(StoredReportPart):
    accuracy: RateDifference = Field(description="The adapter's accuracy minus the base's, on the same questions.")
    picks_total_variation: float = Field(
        description="Half the sum over letters of the difference in the fraction of picks: 0 when both pick each "
        "letter as often, 1 when they never pick the same."
    )


class ComparisonReport(StoredReportPart):
    """A base model and its adapters side by side on the same texts, split and layer."""

    layer: int = Field(description="Chosen on the base's validation split, used for every variant.")
    variants: list[ComparisonVariant] = Field(description="The base first, then each adapter.")
    differences: dict[str, dict[str, Estimate]] = Field(
        description="By adapter label, each metric of the adapter minus the base's, with a paired bootstrap "
        "interval; unpaired point estimates (no interval, no label) where the adapter answers differently."
    )
    cross_transfer: dict[str, CrossTransfer] = Field(
        description="`base probe on <adapter>` and `<adapter> probe on base`."
    )
    per_layer_validation: dict[str, dict[str, ValidationSummary]] = Field(
        description="By layer, then by variant label: the validation metrics the layer was chosen on."
    )
    per_layer_test: dict[str, dict[str, dict[str, Estimate]]] | None = Field(
        None,
        description="By layer, then by variant label: the test AUROC and ECE of that layer's probe with their "
        "intervals (the layer sweep the page draws); absent from comparisons made before it was reported.",
    )
    flags: list[str] = Field(description="What makes the comparison less than like for like.")
    test_n: int = Field(description="Items in the test split.")
    answers: dict[str, SelfLabelSummary] | None = Field(
        None,
        description="Multiple choice only: by variant label, how each model answered every question of the dataset "
        "(its accuracy, the letters it picked, the gold letters).",
    )
    answer_differences: dict[str, AnswerDifference] | None = Field(
        None,
        description="Multiple choice only: by adapter label, its accuracy minus the base's on the same questions with "
        "a paired bootstrap interval, and how far its letter picks moved (total variation distance).",
    )
