"""The vectorised bootstrap of every metric in the table but smooth ECE, and the jackknife of
the binned calibration errors that BCa's acceleration needs.

Each resample is reduced to how often it drew each item, and every metric of every
resample follows from prefix sums over the items sorted by p (`_ResamplingPlan`); the
table's resampled functions turn those sums into values. Leaving one item out changes the
sums of one equal-width bin, or moves each equal-mass cut by at most one item, so the n
leave-one-out samples cost O(n·bins), not O(n²).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from app.calibration.binned import BinSums, equal_mass_sizes, equal_width_ids
from app.calibration.inputs import THRESHOLD, checked
from app.calibration.scoring import item_log_loss
from app.calibration.table import (
    BOOTSTRAPPED,
    BinnedSums,
    ResampledSums,
    leave_one_out_values_of,
    resampled_values_of,
)
from app.calibration.values import BootstrapSettings

# Resamples are processed in blocks of about this many drawn items (at least one
# resample): each block's arrays then stay in the CPU cache, which is 2-3 times faster
# than larger blocks, and memory stays bounded whatever the number of resamples.
BOOTSTRAP_BLOCK_ITEMS = 2**16


def bootstrap_settings(resamples: int, seed: int, level: float) -> BootstrapSettings:
    if resamples < 0:
        raise ValueError("resamples must be 0 or more")
    if not 0.0 < level < 1.0:
        raise ValueError("level must lie strictly between 0 and 1")
    return BootstrapSettings(int(resamples), int(seed), float(level))


def resampled_metrics(
    y: npt.ArrayLike, p: npt.ArrayLike, indices: npt.ArrayLike, *, bins: int = 15
) -> dict[str, np.ndarray]:
    """Every bootstrapped metric (all but smooth ECE) of each row of `indices`, a
    (resamples, n) matrix of item indices: row r is the data set (y[indices[r]],
    p[indices[r]]). AUROC and AUPRC are NaN for a row that holds one class only."""
    labels, probabilities = checked(y, p)
    index_matrix = np.asarray(indices)
    if (
        index_matrix.ndim != 2
        or index_matrix.shape[1] != len(labels)
        or not np.issubdtype(index_matrix.dtype, np.integer)
    ):
        raise ValueError(f"indices must be an integer matrix of shape (resamples, {len(labels)})")
    if index_matrix.size and (index_matrix.min() < 0 or index_matrix.max() >= len(labels)):
        raise ValueError(f"indices must lie in [0, {len(labels)})")
    plan = _ResamplingPlan.of(labels, probabilities, bins)
    rows_per_block = _rows_per_block(len(labels))
    blocks = [
        plan.metrics_of(index_matrix[start : start + rows_per_block])
        for start in range(0, len(index_matrix), rows_per_block)
    ]
    return _concatenated(blocks)


def _rows_per_block(item_count: int) -> int:
    return max(1, BOOTSTRAP_BLOCK_ITEMS // item_count)


def _index_blocks(item_count: int, settings: BootstrapSettings) -> Iterator[np.ndarray]:
    """`default_rng(seed).integers(0, n, size=(resamples, n))` drawn a block of rows at a
    time: the generator fills rows in order, so the blocks stack into that same matrix."""
    generator = np.random.default_rng(settings.seed)
    rows_per_block = _rows_per_block(item_count)
    for start in range(0, settings.resamples, rows_per_block):
        yield generator.integers(0, item_count, size=(min(rows_per_block, settings.resamples - start), item_count))


def resampled_values(
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
    return [_concatenated(plan_blocks) for plan_blocks in blocks]


def leave_one_out_values(labels: np.ndarray, probabilities: np.ndarray, bins: int) -> dict[str, np.ndarray]:
    """Every metric of the table with a BCa interval on each leave-one-out sample: entry i
    of each array is the metric without item i, items in the order given, so the arrays of
    two predictions of the same items pair up. Empty for a single item, which leaves nothing."""
    if len(labels) < 2:
        return {}
    plan = _ResamplingPlan.of(labels, probabilities, bins)
    blocks = [leave_one_out_values_of(sums) for sums in plan.leave_one_out_sums()]
    return {name: values[plan.rank] for name, values in _concatenated(blocks).items()}


def _concatenated(blocks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not blocks:
        return {name: np.empty(0) for name in BOOTSTRAPPED}
    return {name: np.concatenate([block[name] for block in blocks]) for name in blocks[0]}


@dataclass(frozen=True)
class _Runs:
    """Stretches of the sorted items that share a bin: run r spans positions
    bounds[r]:bounds[r+1] and falls in bin `bin_of_run[r]`. A `flipped` run lies below the
    threshold, where the max-probability form's confidence is 1 − p and its outcome 1 − y."""

    bounds: np.ndarray
    bin_of_run: np.ndarray
    flipped: np.ndarray

    def sums(
        self, prefix_count: np.ndarray, prefix_probability: np.ndarray, prefix_outcome: np.ndarray, bins: int
    ) -> BinSums:
        """Bin sums from prefix sums (resamples, n + 1) of the drawn counts, counts·p and counts·y."""
        run_count, run_probability, run_outcome = (
            np.diff(prefix[:, self.bounds], axis=1) for prefix in (prefix_count, prefix_probability, prefix_outcome)
        )
        confidence = np.where(self.flipped, run_count - run_probability, run_probability)
        outcome = np.where(self.flipped, run_count - run_outcome, run_outcome)
        into_bins = np.zeros((len(self.bin_of_run), bins))
        into_bins[np.arange(len(self.bin_of_run)), self.bin_of_run] = 1.0
        return BinSums(run_count @ into_bins, confidence @ into_bins, outcome @ into_bins)

    def without(self, left_out: np.ndarray, whole: BinSums, probabilities: np.ndarray, outcomes: np.ndarray) -> BinSums:
        """The bin sums of all sorted items (`whole`, one row) less sorted item j in its own
        bin, one row per j of `left_out`."""
        run = np.searchsorted(self.bounds, left_out, side="right") - 1
        flipped = self.flipped[run]
        confidence = np.where(flipped, 1.0 - probabilities[left_out], probabilities[left_out])[:, None]
        outcome = np.where(flipped, 1.0 - outcomes[left_out], outcomes[left_out])[:, None]
        in_bin = np.zeros((len(left_out), whole.count.shape[-1]))
        in_bin[np.arange(len(left_out)), self.bin_of_run[run]] = 1.0
        return BinSums(whole.count - in_bin, whole.confidence - in_bin * confidence, whole.outcome - in_bin * outcome)


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
            item_scores=np.column_stack([(sorted_p - sorted_y) ** 2, item_log_loss(sorted_y, sorted_p)]),
            tie_bounds=_tie_bounds(sorted_p),
            below_threshold=below_threshold,
            binary_runs=_binary_runs(sorted_p, bins),
            max_probability_runs=_max_probability_runs(sorted_p, below_threshold, bins),
            equal_mass_cuts=np.concatenate([[0], np.cumsum(equal_mass_sizes(len(order), bins))]),
        )

    @property
    def n(self) -> int:
        return len(self.rank)

    def drawn_counts(self, indices: np.ndarray) -> np.ndarray:
        """(resamples, n): how often each resample drew each sorted item."""
        flat = self.rank[indices] + np.arange(len(indices))[:, None] * self.n
        return np.bincount(flat.ravel(), minlength=flat.size).reshape(indices.shape).astype(np.float64)

    def metrics_of(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Every bootstrapped metric of the table on each resample of `indices`."""
        return resampled_values_of(self.sums_of(indices))

    def sums_of(self, indices: np.ndarray) -> ResampledSums:
        """The sums every bootstrapped metric of each resample of `indices` follows from."""
        counts = self.drawn_counts(indices)
        prefixes = (
            _prefix_sums(counts),
            _prefix_sums(counts * self.probabilities),
            _prefix_sums(counts * self.outcomes),
        )
        prefix_count, _, prefix_outcome = prefixes
        squared_error, log_loss = (counts @ self.item_scores).T
        return ResampledSums(
            n=self.n,
            correct=self._correct_counts(prefix_count, prefix_outcome),
            tie_prefixes=(prefix_outcome[:, self.tie_bounds], prefix_count[:, self.tie_bounds]),
            squared_error=squared_error,
            log_loss=log_loss,
            binned=BinnedSums(
                equal_width=self.binary_runs.sums(*prefixes, self.bins),
                equal_mass=self._equal_mass_sums(*prefixes),
                max_probability=self.max_probability_runs.sums(*prefixes, self.bins),
            ),
        )

    def leave_one_out_sums(self) -> Iterator[BinnedSums]:
        """Bin sums without sorted item j, one row for each j in order, a block of rows at a time."""
        items = (np.ones(self.n), self.probabilities, self.outcomes)
        prefix_count, prefix_probability, prefix_outcome = (_prefix_sums(values[None, :]) for values in items)
        binary, max_probability = (
            runs.sums(prefix_count, prefix_probability, prefix_outcome, self.bins)
            for runs in (self.binary_runs, self.max_probability_runs)
        )
        cuts = np.concatenate([[0], np.cumsum(equal_mass_sizes(self.n - 1, self.bins))])
        rows_per_block = max(1, BOOTSTRAP_BLOCK_ITEMS // self.bins)
        for start in range(0, self.n, rows_per_block):
            left_out = np.arange(start, min(start + rows_per_block, self.n))
            yield BinnedSums(
                equal_width=self.binary_runs.without(left_out, binary, self.probabilities, self.outcomes),
                equal_mass=self._equal_mass_without(left_out, cuts, (prefix_count, prefix_probability, prefix_outcome)),
                max_probability=self.max_probability_runs.without(
                    left_out, max_probability, self.probabilities, self.outcomes
                ),
            )

    def _equal_mass_without(self, left_out: np.ndarray, cuts: np.ndarray, prefixes: tuple[np.ndarray, ...]) -> BinSums:
        """Without item j the n − 1 items are cut at `cuts` (`equal_mass_sizes(n − 1, bins)`).
        A cut at c of the shorter list falls at c of the full one if c ≤ j and at c + 1 if
        c > j, so a bin sums the full list's items between its cuts, less item j if it lies
        there."""
        starts = cuts[None, :] + (cuts[None, :] > left_out[:, None])
        holds_left_out = (starts[:, :-1] <= left_out[:, None]) & (left_out[:, None] < starts[:, 1:])
        return BinSums(
            *(
                np.diff(prefix[0, starts], axis=1) - holds_left_out * values[left_out, None]
                for prefix, values in zip(prefixes, (np.ones(self.n), self.probabilities, self.outcomes), strict=True)
            )
        )

    def _correct_counts(self, prefix_count: np.ndarray, prefix_outcome: np.ndarray) -> np.ndarray:
        """Incorrect items below the threshold plus correct ones at or above it."""
        below = self.below_threshold
        wrong_below = prefix_count[:, below] - prefix_outcome[:, below]
        return wrong_below + prefix_outcome[:, -1] - prefix_outcome[:, below]

    def _equal_mass_sums(
        self, prefix_count: np.ndarray, prefix_probability: np.ndarray, prefix_outcome: np.ndarray
    ) -> BinSums:
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

        return BinSums(
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
    ids = equal_width_ids(confidences, bins)
    changes = np.flatnonzero((np.diff(ids) != 0) | (np.diff(says_correct.astype(np.int8)) != 0)) + 1
    starts = np.concatenate([[0], changes])
    return _Runs(np.concatenate([starts, [len(ids)]]), ids[starts], ~says_correct[starts])
