"""Transfer matrices: does a probe trained on one dataset work on another?
(docs/concepts.md#transfer-matrices)

Each training set (or, with `union`, all of them together) gets a probe per layer fitted on
its train split, the strength and the layer chosen on its validation split, as a probe run
does. The chosen probe is scored on every test set: on a set's test split when it is also a
training set (its other rows were seen), else on all its rows. Each cell has the full
calibration report's metrics with their intervals, on the same seed, and the AUROC each
layer's probe would have had there (no interval), which shows how the choice of layer
moves the transfer.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.calibration.reporting import calibration_report
from app.calibration.scoring import auroc
from workers.probes import probability_of_correct
from workers.splits import Split, stratified_split
from workers.training import train_probe


@dataclass(frozen=True)
class LabelledStates:
    """One dataset's labels and states: `states` is (rows, layers, hidden), its layers those
    of the matrix, in order."""

    dataset_id: str
    name: str
    y: np.ndarray
    states: np.ndarray


@dataclass(frozen=True)
class _TrainingUnit:
    label: str
    dataset_ids: list[str]
    x: np.ndarray  # (rows, layers, hidden)
    y: np.ndarray
    split: Split


def transfer_matrix(
    sets: Sequence[LabelledStates],
    train: Sequence[str],
    test: Sequence[str],
    layers: Sequence[int],
    method: str,
    *,
    union: bool,
    fractions: tuple[float, float, float],
    seed: int,
    resamples: int,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> dict[str, Any]:
    """The matrix as JSON-ready values: `rows` (one per training unit: its datasets, chosen
    layer, validation AUROC per layer), `columns` (one per test set: which rows were scored),
    and `cells[row][column]` (`n`, `metrics`: value, interval, label and estimator of every
    report metric, `auroc_by_layer`)."""
    by_id = {labelled.dataset_id: labelled for labelled in sets}
    splits = {dataset_id: stratified_split(by_id[dataset_id].y, fractions=fractions, seed=seed) for dataset_id in train}
    units = _training_units(by_id, splits, train, union)
    columns = [_column(by_id[dataset_id], splits.get(dataset_id)) for dataset_id in test]
    total, done = len(units) * (len(layers) + len(columns)), 0
    rows, cells = [], []
    for unit in units:
        probes, validation_auroc = [], []
        for slot in range(len(layers)):
            x = unit.x[:, slot]
            probe, _, _ = train_probe(method, x, unit.y, unit.split, False, None)
            probes.append(probe)
            validation_auroc.append(
                auroc(
                    unit.y[unit.split.validation], probability_of_correct(probe, None, x[unit.split.validation])
                ).value
            )
            done += 1
            progress(done, total)
        chosen = max(range(len(layers)), key=lambda slot: (validation_auroc[slot] or -1.0, -slot))
        rows.append(
            {
                "label": unit.label,
                "dataset_ids": unit.dataset_ids,
                "layer": layers[chosen],
                "n_train": len(unit.split.train),
                "validation_auroc": {str(layer): value for layer, value in zip(layers, validation_auroc, strict=True)},
            }
        )
        row_cells = []
        for column in columns:
            labelled, scored = by_id[column["dataset_id"]], np.asarray(column["indices"])
            y = labelled.y[scored]
            p = probability_of_correct(probes[chosen], None, labelled.states[scored, chosen])
            report = calibration_report(y, p, resamples=resamples, seed=seed).to_dict()
            by_layer = {
                str(layer): auroc(y, probability_of_correct(probes[slot], None, labelled.states[scored, slot])).value
                for slot, layer in enumerate(layers)
            }
            row_cells.append({"n": len(y), "metrics": report["metrics"], "auroc_by_layer": by_layer})
            done += 1
            progress(done, total)
        cells.append(row_cells)
    for column in columns:
        del column["indices"]
    return {"rows": rows, "columns": columns, "cells": cells}


def _training_units(
    by_id: dict[str, LabelledStates], splits: dict[str, Split], train: Sequence[str], union: bool
) -> list[_TrainingUnit]:
    units = [
        _TrainingUnit(
            by_id[dataset_id].name, [dataset_id], by_id[dataset_id].states, by_id[dataset_id].y, splits[dataset_id]
        )
        for dataset_id in train
    ]
    if not union:
        return units
    offsets = np.cumsum([0] + [len(unit.y) for unit in units])
    split = Split(
        *(
            np.concatenate([getattr(unit.split, part) + offset for unit, offset in zip(units, offsets, strict=False)])
            for part in ("train", "validation", "test")
        )
    )
    return [
        _TrainingUnit(
            " + ".join(unit.label for unit in units),
            [dataset_id for unit in units for dataset_id in unit.dataset_ids],
            np.concatenate([unit.x for unit in units]),
            np.concatenate([unit.y for unit in units]),
            split,
        )
    ]


def _column(labelled: LabelledStates, split: Split | None) -> dict[str, Any]:
    """A test set: its test split when a probe was trained on its other rows, else every row."""
    indices = split.test if split is not None else np.arange(len(labelled.y))
    return {
        "dataset_id": labelled.dataset_id,
        "label": labelled.name,
        "rows": "test" if split is not None else "all",
        "n": len(indices),
        "indices": indices.tolist(),
    }
