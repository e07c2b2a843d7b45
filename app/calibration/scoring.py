"""Accuracy, ranking metrics (AUROC, AUPRC) and proper scoring rules (Brier score, log loss),
each matching the scikit-learn function its value type names."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from app.calibration.inputs import THRESHOLD, checked, checked_labels
from app.calibration.values import (
    Accuracy,
    Auprc,
    Auroc,
    BaseRate,
    BrierScore,
    LogLoss,
    finite_or_none,
)

LOG_LOSS_CLIP = 1e-15


def accuracy(y: npt.ArrayLike, p: npt.ArrayLike) -> Accuracy:
    labels, probabilities = checked(y, p)
    return Accuracy(float(np.mean((probabilities >= THRESHOLD) == (labels == 1))))


def base_rate(y: npt.ArrayLike) -> BaseRate:
    labels = checked_labels(y)
    return BaseRate(float(np.mean(labels)))


def auroc(y: npt.ArrayLike, p: npt.ArrayLike) -> Auroc:
    return Auroc(finite_or_none(auroc_of_tie_prefixes(*tie_prefixes(*checked(y, p)))))


def auprc(y: npt.ArrayLike, p: npt.ArrayLike) -> Auprc:
    return Auprc(finite_or_none(average_precision_of_tie_prefixes(*tie_prefixes(*checked(y, p)))))


def brier(y: npt.ArrayLike, p: npt.ArrayLike) -> BrierScore:
    labels, probabilities = checked(y, p)
    return BrierScore(float(np.mean((probabilities - labels) ** 2)))


def nll(y: npt.ArrayLike, p: npt.ArrayLike) -> LogLoss:
    labels, probabilities = checked(y, p)
    return LogLoss(float(np.mean(item_log_loss(labels, probabilities))))


def tie_prefixes(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positives and items with p below each distinct p, in increasing order, then the totals."""
    values, group = np.unique(probabilities, return_inverse=True)
    positives = np.bincount(group, weights=labels, minlength=len(values))
    counts = np.bincount(group, minlength=len(values))
    return np.concatenate([[0.0], np.cumsum(positives)]), np.concatenate([[0.0], np.cumsum(counts)])


def auroc_of_tie_prefixes(positive_prefix: np.ndarray, count_prefix: np.ndarray) -> np.ndarray:
    """U / (n₁·n₀) along the last axis, from `tie_prefixes`-shaped arrays. Each positive
    beats the negatives below its p and ties half of those at its p, so it scores the mean
    of the negatives below its p and those at or below it. NaN without both classes."""
    positives = np.diff(positive_prefix, axis=-1)
    negative_prefix = count_prefix - positive_prefix
    u = 0.5 * np.sum(positives * (negative_prefix[..., :-1] + negative_prefix[..., 1:]), axis=-1)
    pairs = positive_prefix[..., -1] * negative_prefix[..., -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, u / pairs, np.nan)


def average_precision_of_tie_prefixes(positive_prefix: np.ndarray, count_prefix: np.ndarray) -> np.ndarray:
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


def item_log_loss(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    clipped = np.clip(probabilities, LOG_LOSS_CLIP, 1.0 - LOG_LOSS_CLIP)
    return -(labels * np.log(clipped) + (1.0 - labels) * np.log1p(-clipped))
