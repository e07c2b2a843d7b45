"""Calibration metrics and probe fitting, timed in one process.

Data: labels drawn from a true probability in Beta(2, 2), predictions an overconfident
distortion of it rounded to 3 decimals in [0.001, 0.999] (so there are ties, as probes on
real data give, and no prediction where log-loss clipping conventions differ).

- `metrics_1e6_s`: `calibration_report(..., resamples=0)` on 1,000,000 predictions — every
  metric (AUROC, AUPRC, AURC, PRR, Brier, NLL, the ECE family, smooth ECE, debiased ECE),
  both sets of reliability bins, the histogram and the risk–coverage curve, no bootstrap.
  Best of 3.
- `selective_metrics_1e6_s`: `selective.aurc` and `selective.prr` on the same 1,000,000
  predictions, each from its own inputs (ties in p averaged over their orders). Best of 3.
- `bootstrap_1000_s`: `calibration_report(..., resamples=1000)` on 100,000 predictions:
  the same, plus 1,000 bootstrap resamples of every metric but smooth ECE and the
  leave-one-out values of the binned errors behind their BCa intervals.
- `bootstrap_speedup_vs_loop`: against the plain way — a Python loop over the same
  resamples (rows of the same `default_rng(0)` index matrix) calling scikit-learn's
  `roc_auc_score`, `average_precision_score`, `brier_score_loss`, `log_loss`,
  `accuracy_score` and a 15-bin equal-width ECE by `numpy.bincount`. The loop is timed on
  its first LOOP_RESAMPLES resamples and scaled linearly to 1,000 (each resample costs the
  same); its values are checked against the vectorised ones for those resamples.
- `transfer_matrix_s`: `workers.transfer_matrix.transfer_matrix` for 4 training × 4 test sets
  of 2,000 texts each, states at 4 layers of width 576 (SmolLM2's) already in memory as the
  job has them once read from the cache: a logistic probe per set and layer (its strength
  searched on validation), the layer chosen on validation, and every cell's full report with
  1,000 bootstrap resamples. Target: under 30 s.
- `probe_fit_s`: `workers.probes.fit_logistic_probe` (standardisation and its strength
  search on the validation split) on 8,000 training and 2,000 validation rows of 4,096
  Gaussian features whose labels follow a planted direction. If that module cannot be
  imported, scikit-learn's `LogisticRegression` over 7 values of C stands in, and
  `probe_fit_impl` says "sklearn-fallback".

Last line: one JSON object.
"""

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    log_loss,
    roc_auc_score,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.calibration.bootstrap import resampled_metrics  # noqa: E402
from app.calibration.reporting import calibration_report  # noqa: E402
from app.calibration.selective import aurc, prr  # noqa: E402

METRICS_N = 1_000_000
BOOTSTRAP_N = 100_000
RESAMPLES = 1000
LOOP_RESAMPLES = 50
BINS = 15
PROBE_ROWS, PROBE_FEATURES, PROBE_VALIDATION_ROWS = 10_000, 4096, 2000
FALLBACK_C_GRID = np.logspace(-4, 2, 7)
TRANSFER_SETS, TRANSFER_TEXTS, TRANSFER_LAYERS, TRANSFER_HIDDEN = 4, 2000, 4, 576


def predictions(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.beta(2.0, 2.0, n)
    y = (rng.random(n) < truth).astype(np.int64)
    p = 1.0 / (1.0 + np.exp(-1.8 * np.log(truth / (1.0 - truth)) - 0.3))
    return y, np.clip(np.round(p, 3), 0.001, 0.999)


def seconds(work: Callable[[], Any], repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def loop_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    bin_ids = np.minimum(np.searchsorted(np.linspace(0.0, 1.0, BINS + 1), p, side="right") - 1, BINS - 1)
    gaps = np.bincount(bin_ids, weights=p, minlength=BINS) - np.bincount(bin_ids, weights=y, minlength=BINS)
    return {
        "auroc": roc_auc_score(y, p),
        "auprc": average_precision_score(y, p),
        "brier": brier_score_loss(y, p),
        "nll": log_loss(y, p),
        "accuracy": accuracy_score(y, p >= 0.5),
        "ece": float(np.abs(gaps).sum() / len(y)),
    }


def time_loop(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """Seconds for the loop over the first LOOP_RESAMPLES resamples, and the largest
    difference from the vectorised values of the same resamples."""
    indices = np.random.default_rng(0).integers(0, len(y), size=(LOOP_RESAMPLES, len(y)))
    start = time.perf_counter()
    looped = [loop_metrics(y[row], p[row]) for row in indices]
    elapsed = time.perf_counter() - start
    vectorised = resampled_metrics(y, p, indices, bins=BINS)
    difference = max(abs(values[name] - vectorised[name][row]) for row, values in enumerate(looped) for name in values)
    return elapsed, float(difference)


def planted_probe_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((PROBE_ROWS, PROBE_FEATURES), dtype=np.float32)
    direction = rng.standard_normal(PROBE_FEATURES)
    direction /= np.linalg.norm(direction)
    logits = 3.0 * (x @ direction)
    return x, (rng.random(PROBE_ROWS) < 1.0 / (1.0 + np.exp(-logits))).astype(np.int64)


def fit_fallback_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    train, validation = scaler.transform(x_train), scaler.transform(x_val)
    fits = [LogisticRegression(C=strength, max_iter=1000).fit(train, y_train) for strength in FALLBACK_C_GRID]
    return min(fits, key=lambda fit: log_loss(y_val, fit.predict_proba(validation)[:, 1]))


def time_probe_fit() -> tuple[float, str]:
    x, y = planted_probe_data()
    train, validation = slice(PROBE_VALIDATION_ROWS, None), slice(None, PROBE_VALIDATION_ROWS)
    try:
        from workers.probes import fit_logistic_probe
    except ImportError:
        fit, implementation = fit_fallback_probe, "sklearn-fallback"
    else:
        fit, implementation = fit_logistic_probe, "workers.probes"
    return seconds(lambda: fit(x[train], y[train], x[validation], y[validation])), implementation


def time_transfer_matrix() -> float:
    from workers.transfer_matrix import LabelledStates, transfer_matrix

    rng = np.random.default_rng(11)
    direction = rng.normal(size=TRANSFER_HIDDEN)
    sets = []
    for number in range(TRANSFER_SETS):
        y = rng.integers(0, 2, TRANSFER_TEXTS)
        states = rng.normal(size=(TRANSFER_TEXTS, TRANSFER_LAYERS, TRANSFER_HIDDEN)).astype(np.float32)
        # each set shares the truth direction, more strongly at deeper layers, plus a direction of its own
        own = rng.normal(size=TRANSFER_HIDDEN)
        for slot in range(TRANSFER_LAYERS):
            states[:, slot] += np.outer(2 * y - 1, 0.02 * (slot + 1) * direction + 0.05 * own).astype(np.float32)
        sets.append(LabelledStates(f"set-{number}", f"set {number}", y, states))
    ids = [labelled.dataset_id for labelled in sets]
    return seconds(
        lambda: transfer_matrix(
            sets,
            ids,
            ids,
            list(range(TRANSFER_LAYERS)),
            "logistic",
            union=False,
            fractions=(0.6, 0.2, 0.2),
            seed=0,
            resamples=RESAMPLES,
        )
    )


def main() -> None:
    calibration_report(*predictions(2000, seed=9), resamples=20)  # first calls pay for imports and caches

    big_y, big_p = predictions(METRICS_N, seed=1)
    metrics_s = seconds(lambda: calibration_report(big_y, big_p, bins=BINS, resamples=0), repeats=3)
    selective_s = seconds(lambda: (aurc(big_y, big_p), prr(big_y, big_p)), repeats=3)

    y, p = predictions(BOOTSTRAP_N, seed=2)
    bootstrap_s = seconds(lambda: calibration_report(y, p, bins=BINS, resamples=RESAMPLES, seed=0))
    loop_subset_s, loop_difference = time_loop(y, p)
    loop_s = loop_subset_s * RESAMPLES / LOOP_RESAMPLES

    probe_s, probe_implementation = time_probe_fit()
    transfer_s = time_transfer_matrix()

    figures = {
        "cpu_cores": os.cpu_count(),
        "metrics_n": METRICS_N,
        "metrics_1e6_s": round(metrics_s, 3),
        "selective_metrics_1e6_s": round(selective_s, 3),
        "bootstrap_n": BOOTSTRAP_N,
        "bootstrap_resamples": RESAMPLES,
        "bootstrap_1000_s": round(bootstrap_s, 3),
        "loop_resamples_timed": LOOP_RESAMPLES,
        "loop_1000_s": round(loop_s, 2),
        "loop_scaling": f"linear from the first {LOOP_RESAMPLES} resamples",
        "loop_max_abs_difference": loop_difference,
        "bootstrap_speedup_vs_loop": round(loop_s / bootstrap_s, 1),
        "probe_rows": PROBE_ROWS,
        "probe_features": PROBE_FEATURES,
        "probe_fit_s": round(probe_s, 2),
        "probe_fit_impl": probe_implementation,
        "transfer_matrix": f"{TRANSFER_SETS}x{TRANSFER_SETS} sets of {TRANSFER_TEXTS} texts, {TRANSFER_LAYERS} layers",
        "transfer_matrix_s": round(transfer_s, 2),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
