"""The binned calibration errors — ECE (Naeini et al. 2015; Guo et al. 2017; L2 after Kumar,
Liang & Ma 2019), MCE, ACE (Nixon et al. 2019) and debiased ECE (Kumar, Liang & Ma 2019)
— with the reliability bins and confidence histogram behind them. Each error is a function
of per-bin sums (`BinSums`), which the bootstrap computes for every resample at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from app.calibration.inputs import (
    THRESHOLD,
    check_choice,
    checked,
    checked_probabilities,
)
from app.calibration.values import (
    AdaptiveCalibrationError,
    ConfidenceHistogram,
    DebiasedCalibrationError,
    Estimator,
    ExpectedCalibrationError,
    Form,
    MaximumCalibrationError,
    ReliabilityBin,
)


def ece(
    y: npt.ArrayLike,
    p: npt.ArrayLike,
    bins: int = 15,
    binning: Literal["equal_width", "equal_mass"] = "equal_width",
    norm: Literal["l1", "l2"] = "l1",
    form: Form = "binary",
) -> ExpectedCalibrationError:
    check_choice("norm", norm, ("l1", "l2"))
    sums = _bin_sums(*checked(y, p), bins, binning, form)
    return ExpectedCalibrationError(float(count_weighted_gap(sums, norm)), Estimator("ece", bins, binning, norm, form))


def mce(y: npt.ArrayLike, p: npt.ArrayLike, bins: int = 15) -> MaximumCalibrationError:
    sums = _bin_sums(*checked(y, p), bins, "equal_width", "binary")
    return MaximumCalibrationError(float(largest_gap(sums)), Estimator("mce", bins, "equal_width", "max", "binary"))


def ace(y: npt.ArrayLike, p: npt.ArrayLike, bins: int = 15) -> AdaptiveCalibrationError:
    sums = _bin_sums(*checked(y, p), bins, "equal_mass", "binary")
    return AdaptiveCalibrationError(float(bin_averaged_gap(sums)), Estimator("ace", bins, "equal_mass", "l1", "binary"))


def debiased_ece(
    y: npt.ArrayLike, p: npt.ArrayLike, bins: int = 15, binning: Literal["equal_width", "equal_mass"] = "equal_mass"
) -> DebiasedCalibrationError:
    sums = _bin_sums(*checked(y, p), bins, binning, "binary")
    return DebiasedCalibrationError(
        float(debiased_l2_gap(sums)), Estimator("debiased_ece", bins, binning, "l2", "binary")
    )


def reliability_bins(
    y: npt.ArrayLike, p: npt.ArrayLike, bins: int = 15, binning: Literal["equal_width", "equal_mass"] = "equal_width"
) -> list[ReliabilityBin]:
    """The binary-form bins behind `ece`: every equal-width bin, empty ones included; the
    non-empty equal-mass bins (some are empty only when there are fewer items than bins)."""
    labels, probabilities = checked(y, p)
    sums = _sums_by_bin(_bin_ids(labels, probabilities, bins, binning), probabilities, labels, bins)
    if binning == "equal_width":
        edges = np.linspace(0.0, 1.0, bins + 1)
        lowers, uppers = edges[:-1], edges[1:]
    else:
        # Equal-mass bins are consecutive runs of the sorted predictions.
        ordered = np.sort(probabilities)
        cuts = np.concatenate([[0], np.cumsum(equal_mass_sizes(len(ordered), bins))])
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
    probabilities = checked_probabilities(p)
    counts = np.bincount(equal_width_ids(probabilities, bins), minlength=bins)
    return ConfidenceHistogram(tuple(np.linspace(0.0, 1.0, bins + 1).tolist()), tuple(counts.tolist()))


@dataclass(frozen=True)
class BinSums:
    """Per bin (last axis): item count, sum of confidences, sum of outcomes."""

    count: np.ndarray
    confidence: np.ndarray
    outcome: np.ndarray


def _confidence_and_outcome(labels: np.ndarray, probabilities: np.ndarray, form: Form) -> tuple[np.ndarray, np.ndarray]:
    check_choice("form", form, ("binary", "max_probability"))
    if form == "binary":
        return probabilities, labels
    says_correct = probabilities >= THRESHOLD
    return np.where(says_correct, probabilities, 1.0 - probabilities), (says_correct == (labels == 1)).astype(
        np.float64
    )


def equal_width_ids(confidences: np.ndarray, bins: int) -> np.ndarray:
    """Bin b holds [b/B, (b+1)/B) by the published edges; 1.0 goes in the last bin."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.minimum(np.searchsorted(edges, confidences, side="right") - 1, bins - 1)


def equal_mass_sizes(count: int, bins: int) -> np.ndarray:
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
    ids[order] = np.repeat(np.arange(bins), equal_mass_sizes(len(order), bins))
    return ids


def _bin_ids(
    labels: np.ndarray, probabilities: np.ndarray, bins: int, binning: str, form: Form = "binary"
) -> np.ndarray:
    if bins < 1:
        raise ValueError("bins must be 1 or more")
    check_choice("binning", binning, ("equal_width", "equal_mass"))
    confidences, outcomes = _confidence_and_outcome(labels, probabilities, form)
    if binning == "equal_width":
        return equal_width_ids(confidences, bins)
    return _equal_mass_ids(confidences, outcomes, bins)


def _bin_sums(labels: np.ndarray, probabilities: np.ndarray, bins: int, binning: str, form: Form) -> BinSums:
    confidences, outcomes = _confidence_and_outcome(labels, probabilities, form)
    return _sums_by_bin(_bin_ids(labels, probabilities, bins, binning, form), confidences, outcomes, bins)


def _sums_by_bin(ids: np.ndarray, confidences: np.ndarray, outcomes: np.ndarray, bins: int) -> BinSums:
    return BinSums(
        np.bincount(ids, minlength=bins).astype(np.float64),
        np.bincount(ids, weights=confidences, minlength=bins),
        np.bincount(ids, weights=outcomes, minlength=bins),
    )


def _gaps(sums: BinSums) -> np.ndarray:
    """|mean confidence − mean outcome| per bin; 0 for an empty bin."""
    return np.divide(
        np.abs(sums.confidence - sums.outcome), sums.count, out=np.zeros_like(sums.count), where=sums.count > 0
    )


def count_weighted_gap(sums: BinSums, norm: str) -> np.ndarray:
    total = sums.count.sum(axis=-1)
    if norm == "l1":
        return np.abs(sums.confidence - sums.outcome).sum(axis=-1) / total
    return np.sqrt(np.sum(sums.count * _gaps(sums) ** 2, axis=-1) / total)


def largest_gap(sums: BinSums) -> np.ndarray:
    return np.max(np.where(sums.count > 0, _gaps(sums), -np.inf), axis=-1)


def bin_averaged_gap(sums: BinSums) -> np.ndarray:
    return _gaps(sums).sum(axis=-1) / np.count_nonzero(sums.count, axis=-1)


def debiased_l2_gap(sums: BinSums) -> np.ndarray:
    total = sums.count.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        frequency = sums.outcome / sums.count
        noise = frequency * (1.0 - frequency) / (sums.count - 1.0)
    per_bin = np.where(sums.count >= 2, _gaps(sums) ** 2 - noise, 0.0)
    return np.sqrt(np.maximum(np.sum(sums.count * per_bin, axis=-1) / total, 0.0))


def _mean_or_none(total: float, count: float) -> float | None:
    return float(total / count) if count > 0 else None
