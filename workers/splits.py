"""The seeded, stratified split of labelled rows into train, validation and test parts: the
test part is never used for a choice (regularisation strength, layer, recalibration)."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.schemas.probes import MIN_PER_CLASS

DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)


@dataclass(frozen=True)
class Split:
    """Sorted row indices of the three parts; the test part is never used for choices."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def stratified_split(
    y: Sequence[Any] | np.ndarray, *, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS, seed: int
) -> Split:
    """Split rows into train, validation and test, class by class, seeded.

    Each class is divided in the given fractions (largest remainder rounding, so each part
    holds its share of the class to within one item), with at least one member of every
    class in every part. scikit-learn's `train_test_split(stratify=...)` rounds per split,
    and two splits in a row can leave a small class out of a part or off its share by more
    than one item, so the class-wise division is done here.
    """
    labels = np.asarray(y)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if len(fractions) != 3 or min(fractions) <= 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    classes, class_sizes = np.unique(labels, return_counts=True)
    if len(classes) != 2:
        raise ValueError(f"a split needs labels of exactly two classes, got {len(classes)}: {classes.tolist()}")
    for label, size in zip(classes.tolist(), class_sizes.tolist(), strict=False):
        if size < MIN_PER_CLASS:
            raise ValueError(
                f"class {label!r} has {size} member(s); train, validation and test each need one, so every class needs at least {MIN_PER_CLASS}"
            )
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for label, size in zip(classes, class_sizes, strict=False):
        members = rng.permutation(np.flatnonzero(labels == label))
        for part, chunk in zip(
            parts, np.split(members, np.cumsum(class_part_sizes(int(size), fractions))[:-1]), strict=False
        ):
            part.append(chunk)
    train, validation, test = (np.sort(np.concatenate(part)) for part in parts)
    return Split(train, validation, test)


def class_part_sizes(class_size: int, fractions: tuple[float, float, float]) -> np.ndarray:
    """How many members of one class go to each part: largest remainder, at least one each."""
    shares = class_size * np.asarray(fractions, dtype=np.float64)
    sizes = np.floor(shares).astype(np.int64)
    sizes[np.argsort(sizes - shares, kind="stable")[: class_size - sizes.sum()]] += 1
    for empty in np.flatnonzero(sizes == 0):
        sizes[np.argmax(sizes)] -= 1
        sizes[empty] = 1
    return sizes
