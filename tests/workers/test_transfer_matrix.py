"""Transfer matrices on synthetic states whose truth direction is known: a probe carries
over to a set that shares its direction, inverts on one that flips it, and is chance where
the direction is absent; rows scored are a set's test split exactly when it was trained on."""

import functools

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from workers.splits import stratified_split
from workers.transfer_matrix import LabelledStates, transfer_matrix

HIDDEN = 12
LAYERS = [3, 7]
FRACTIONS = (0.6, 0.2, 0.2)


def synthetic(dataset_id: str, sign: float, n: int, seed: int) -> LabelledStates:
    """Layer 3 is noise; at layer 7 feature 0 carries the label (times `sign`)."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.int64)
    states = rng.normal(size=(n, len(LAYERS), HIDDEN))
    states[:, 1, 0] += sign * 3.0 * (2 * y - 1)
    return LabelledStates(dataset_id, f"set {dataset_id}", y, states)


SETS = [synthetic("a", 1.0, 200, 0), synthetic("b", 1.0, 150, 1), synthetic("flip", -1.0, 150, 2)]


@functools.cache  # each test reads, none changes it
def matrix(union: bool = False, train: tuple[str, ...] = ("a",)) -> dict:
    return transfer_matrix(
        SETS,
        list(train),
        ["a", "b", "flip"],
        LAYERS,
        "logistic",
        union=union,
        fractions=FRACTIONS,
        seed=4,
        resamples=200,
    )


def test_a_probe_carries_over_where_the_direction_is_shared_and_inverts_where_it_flips() -> None:
    result = matrix()
    (row,) = result["rows"]
    assert row["layer"] == 7 and row["dataset_ids"] == ["a"]
    assert row["validation_auroc"]["7"] > 0.95 and abs(row["validation_auroc"]["3"] - 0.5) < 0.25
    own, shared, flipped = (cell["metrics"]["auroc"]["value"] for cell in result["cells"][0])
    assert own > 0.95 and shared > 0.95 and flipped < 0.05
    noise_layer = [cell["auroc_by_layer"]["3"] for cell in result["cells"][0]]
    assert all(abs(value - 0.5) < 0.25 for value in noise_layer)
    for cell in result["cells"][0]:
        low, high = cell["metrics"]["auroc"]["interval"]
        assert low <= cell["metrics"]["auroc"]["value"] <= high


def test_a_set_trained_on_is_scored_on_its_test_split_and_the_others_on_every_row() -> None:
    result = matrix()
    test_split = stratified_split(SETS[0].y, fractions=FRACTIONS, seed=4).test
    assert [(c["dataset_id"], c["rows"], c["n"]) for c in result["columns"]] == [
        ("a", "test", len(test_split)),
        ("b", "all", 150),
        ("flip", "all", 150),
    ]
    assert [cell["n"] for cell in result["cells"][0]] == [len(test_split), 150, 150]


def test_cell_metrics_are_what_scikit_learn_gives_for_the_chosen_probe() -> None:
    from workers.probes import probability_of_correct
    from workers.training import train_probe

    result = matrix()
    split = stratified_split(SETS[0].y, fractions=FRACTIONS, seed=4)
    probe, _, _ = train_probe("logistic", SETS[0].states[:, 1], SETS[0].y, split, False, None)
    p = probability_of_correct(probe, None, SETS[1].states[:, 1])
    cell = result["cells"][0][1]
    assert cell["metrics"]["auroc"]["value"] == pytest.approx(roc_auc_score(SETS[1].y, p))
    assert cell["metrics"]["accuracy"]["value"] == pytest.approx(accuracy_score(SETS[1].y, p >= 0.5))


def test_a_union_trains_one_probe_on_every_training_sets_train_split() -> None:
    result = matrix(union=True, train=("a", "flip"))
    (row,) = result["rows"]
    assert row["dataset_ids"] == ["a", "flip"] and row["label"] == "set a + set flip"
    splits = [stratified_split(s.y, fractions=FRACTIONS, seed=4) for s in (SETS[0], SETS[2])]
    assert row["n_train"] == sum(len(split.train) for split in splits)
    assert [column["rows"] for column in result["columns"]] == ["test", "all", "test"]
    # opposite directions cancel on feature 0: the union's probe reads neither set well
    assert result["cells"][0][1]["metrics"]["auroc"]["value"] < 0.8


def test_one_row_per_training_set() -> None:
    result = matrix(train=("a", "b", "flip"))
    assert [row["dataset_ids"] for row in result["rows"]] == [["a"], ["b"], ["flip"]]
    auroc = [[cell["metrics"]["auroc"]["value"] for cell in cells] for cells in result["cells"]]
    assert auroc[2][2] > 0.95 and auroc[2][0] < 0.05 and auroc[1][0] > 0.95
