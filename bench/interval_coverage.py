"""How often each bootstrap interval of the report covers the truth: the evidence behind the
interval methods `app/calibration/table.py` gives the metrics.

Data as in `bench/calibration.py`: labels drawn from a true probability in Beta(2, 2);
predictions that probability ("calibrated"), or a distortion of it towards 0 and 1 ("mild":
logit × 1.2 + 0.1; "overconfident": logit × 1.8 + 0.3), rounded to 3 decimals. The truth of
each metric is its value on 2,000,000 items; for each scenario and n, DATA_SETS data sets
are drawn and each gets RESAMPLES resamples, from which the percentile, basic and (for the
binned errors and debiased ECE) BCa intervals are taken at 95%, and the report's own
(`reporting.interval_of`).

Per metric: `below`, the mean share of resamples below the estimate (0.5 for a statistic
the resampling does not bias); for each method, `coverage` (share of data sets whose
interval holds the truth), `holds` (share whose interval holds its own estimate) and, for
BCa, `resolved` (share where BCa was defined and resolved). A few minutes on 2 cores.

Last line: one JSON object.
"""

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.calibration.binned import debiased_l2_gap, largest_gap  # noqa: E402
from app.calibration.bootstrap import (  # noqa: E402
    _ResamplingPlan,
    bootstrap_settings,
    leave_one_out_values,
    resampled_values,
)
from app.calibration.intervals import basic_interval, bca_interval, percentile_interval  # noqa: E402
from app.calibration.reporting import interval_of  # noqa: E402
from app.calibration.table import BOOTSTRAPPED, point_metrics  # noqa: E402

SCENARIOS = {"calibrated": (1.0, 0.0), "mild": (1.2, 0.1), "overconfident": (1.8, 0.3)}
SIZES = (200, 1000, 3000)
DATA_SETS = 50
RESAMPLES = 1000
TRUTH_N = 2_000_000
BINS = 15
LEVEL = 0.95


def predictions(n: int, rng: np.random.Generator, scenario: str) -> tuple[np.ndarray, np.ndarray]:
    slope, shift = SCENARIOS[scenario]
    truth = rng.beta(2.0, 2.0, n)
    y = (rng.random(n) < truth).astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-slope * np.log(truth / (1.0 - truth)) - shift))
    return y, np.round(p, 3)


def other_leave_one_out(y: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    """MCE and debiased ECE without each item, for their BCa, which the report does not
    use (it gives them a basic and a percentile interval)."""
    plan = _ResamplingPlan.of(y, p, BINS)
    blocks = list(plan.leave_one_out_sums())
    return {
        "mce": np.concatenate([largest_gap(sums.equal_width) for sums in blocks])[plan.rank],
        "debiased_ece": np.concatenate([debiased_l2_gap(sums.equal_mass) for sums in blocks])[plan.rank],
    }


def intervals(
    name: str, rows: np.ndarray, estimate: float, left_out: np.ndarray | None, report_left_out: np.ndarray | None
) -> dict[str, Any]:
    found: dict[str, Any] = {
        "percentile": percentile_interval(rows, LEVEL),
        "basic": basic_interval(rows, estimate, LEVEL),
        "report": interval_of(name, rows, estimate, report_left_out, LEVEL)[0],
    }
    if left_out is not None:
        found["bca"] = bca_interval(rows, estimate, left_out, LEVEL)
    return found


def scenario_figures(scenario: str, n: int) -> dict[str, Any]:
    truth = {
        name: metric.value
        for name, metric in point_metrics(*predictions(TRUTH_N, np.random.default_rng(1), scenario), BINS).items()
    }
    rng = np.random.default_rng(n)
    below: dict[str, list[float]] = {}
    covered: dict[tuple[str, str], list[float]] = {}
    holds: dict[tuple[str, str], list[float]] = {}
    for data_set in range(DATA_SETS):
        y, p = predictions(n, rng, scenario)
        values = point_metrics(y, p, BINS)
        rows = resampled_values(y, [p], BINS, bootstrap_settings(RESAMPLES, data_set, LEVEL))[0]
        left_out = leave_one_out_values(y, p, BINS) | other_leave_one_out(y, p)
        for name in BOOTSTRAPPED:
            estimate, target = values[name].value, truth[name]
            if estimate is None or target is None:
                continue
            below.setdefault(name, []).append(float(np.nanmean(rows[name] < estimate)))
            report_left_out = left_out.get(name) if name not in ("mce", "debiased_ece") else None
            for method, interval in intervals(name, rows[name], estimate, left_out.get(name), report_left_out).items():
                resolved = interval is not None
                covered.setdefault((name, method), []).append(
                    float(interval[0] <= target <= interval[1]) if resolved else np.nan
                )
                holds.setdefault((name, method), []).append(
                    float(interval[0] <= estimate <= interval[1]) if resolved else np.nan
                )
    figures: dict[str, Any] = {}
    for name in below:
        figures[name] = {"truth": round(float(truth[name] or 0.0), 4), "below": round(float(np.mean(below[name])), 3)}
        for (metric, method), hits in covered.items():
            if metric != name:
                continue
            resolved = ~np.isnan(np.array(hits))
            figures[name][method] = {
                "coverage": round(float(np.nanmean(hits)), 2) if resolved.any() else None,
                "holds": round(float(np.nanmean(holds[metric, method])), 2) if resolved.any() else None,
            } | ({"resolved": round(float(resolved.mean()), 2)} if method == "bca" else {})
    return figures


def main() -> None:
    results = {}
    for scenario in SCENARIOS:
        for n in SIZES:
            figures = scenario_figures(scenario, n)
            results[f"{scenario}_{n}"] = figures
            print(f"{scenario} n={n}", file=sys.stderr)
            for name, entry in figures.items():
                print(f"  {name:20s} {json.dumps(entry)}", file=sys.stderr)
    print(json.dumps({"data_sets": DATA_SETS, "resamples": RESAMPLES, "level": LEVEL, "results": results}))


if __name__ == "__main__":
    main()
