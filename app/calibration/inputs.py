"""What the metrics take: `y` ∈ {0, 1} says whether the answer or statement is correct
(1 = correct) and `p` is the probe's P(y = 1). A prediction says "correct" when p ≥ 0.5.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

THRESHOLD = 0.5


def checked_labels(y: npt.ArrayLike) -> np.ndarray:
    labels = np.asarray(y)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError("y must be a non-empty 1-D array")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("y must hold only 0 and 1")
    return labels.astype(np.float64)


def checked_probabilities(p: npt.ArrayLike) -> np.ndarray:
    probabilities = np.asarray(p, dtype=np.float64)
    if probabilities.ndim != 1 or probabilities.size == 0:
        raise ValueError("p must be a non-empty 1-D array")
    if not (np.isfinite(probabilities).all() and probabilities.min() >= 0.0 and probabilities.max() <= 1.0):
        raise ValueError("p must hold probabilities in [0, 1]")
    return probabilities


def checked(y: npt.ArrayLike, p: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    labels, probabilities = checked_labels(y), checked_probabilities(p)
    if len(labels) != len(probabilities):
        raise ValueError(f"y and p must have the same length, not {len(labels)} and {len(probabilities)}")
    return labels, probabilities


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
