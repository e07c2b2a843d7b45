"""Does a truth probe of SmolLM2-135M-Instruct generalise, and does it beat the model's own
P(True)? Through the service: a transfer matrix over every shared statement set, and a
probe trained on the cities statements evaluated on `neg_cities` and `common_claim`, beside
the P(True) baseline. Prints Markdown tables, saves the matrix's heatmap.

    PYTHONPATH=. python -m scripts.smollm2_transfer --serve var/smollm2-transfer \\
        --results docs/smollm2-transfer.json --svg docs/smollm2-transfer.svg --png docs/smollm2-transfer.png

(about twenty minutes on two CPU cores; the results are in docs/probing-results.md).

`--serve DIR` starts the embedded service with `VAR_DIR=DIR` (see `scripts.smollm2_results`);
`--url` uses a running one. `--from-results PATH` prints the tables again from a saved file.

The model is SmolLM2's GGUF file registered with dtype float32. Each statement set is a
seeded sample of at most `--rows` rows (1,000 by default; `random.Random(--seed)`), under
the `raw` prompt format, last token. The transfer matrix trains a logistic probe per set on
its train split (60/20/20, seed 0) at layers 9, 12, …, 21 (the layer chosen on the set's
validation split) and scores it on every set — a set's own on its test split only. The
cities probe is one probe run at the same layers; its evaluations score it on every row of
the other two sets. A last row trains one probe on the union of cities and neg_cities
(their train splits together) and scores it on every set. P(True) is the model asked whether each statement is true
(docs/concepts.md#baselines), scored with the same metrics on the same rows.
"""

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import httpx

from scripts.probe_statement_sets import SETS, wait
from scripts.smollm2_results import embedded_service, log, read_jsonl, register, sample, upload

LAYERS = [9, 12, 15, 18, 21]
CITIES, NEG_CITIES, COMMON_CLAIM = SETS[0], SETS[1], SETS[6]


def short(relative: str) -> str:
    return Path(relative).stem


def interval_cell(metric: dict[str, Any] | None) -> str:
    if not metric or metric.get("value") is None:
        return "—"
    low, high = metric["interval"] or (None, None)
    return f"{metric['value']:.3f} [{low:.3f}, {high:.3f}]" if low is not None else f"{metric['value']:.3f}"


def measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=120) as client:
        model = register(client)
        datasets = {}
        for relative in SETS:
            rows = sample(read_jsonl(args.data / relative), args.rows, args.seed)
            datasets[relative] = upload(client, short(relative), rows)
        ids = [datasets[relative]["id"] for relative in SETS]
        body = {"model": model["id"], "train": ids, "test": ids, "layers": LAYERS, "seed": 0}
        log(f"transfer matrix over {len(ids)} sets")
        created = client.post("/v1/transfers", json=body).raise_for_status().json()
        wait(client, created["job"]["id"], log)
        transfer = client.get(f"/v1/transfers/{created['transfer']['id']}").raise_for_status().json()
        if args.svg:
            args.svg.write_bytes(client.get(f"/v1/transfers/{transfer['id']}/matrix.svg").raise_for_status().content)
        if args.png:
            args.png.write_bytes(client.get(f"/v1/transfers/{transfer['id']}/matrix.png").raise_for_status().content)

        log("one probe on cities and neg_cities together")
        union_body = body | {"train": [datasets[CITIES]["id"], datasets[NEG_CITIES]["id"]], "union": True}
        created = client.post("/v1/transfers", json=union_body).raise_for_status().json()
        wait(client, created["job"]["id"], log)
        union = client.get(f"/v1/transfers/{created['transfer']['id']}").raise_for_status().json()

        log("the cities probe run")
        probe_body = {"model": model["id"], "dataset": datasets[CITIES]["id"], "layers": LAYERS, "seed": 0}
        job = wait(client, client.post("/v1/probes", json=probe_body).raise_for_status().json()["job"]["id"], log)
        best_id = job["result"]["best_probe_id"]
        own = client.get(f"/v1/probes/{best_id}/report").raise_for_status().json()
        evaluations = {}
        for relative in (NEG_CITIES, COMMON_CLAIM):
            log(f"the cities probe on {short(relative)}")
            answer = client.post(
                f"/v1/probes/{best_id}/evaluations", json={"dataset": datasets[relative]["id"]}
            ).raise_for_status()
            finished = wait(client, answer.json()["job"]["id"], log)
            evaluation_id = finished["result"]["evaluation_id"]
            evaluations[short(relative)] = (
                client.get(f"/v1/evaluations/{evaluation_id}/report").raise_for_status().json()
            )
    return {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, float32)",
        "rows_per_set": args.rows,
        "layers": LAYERS,
        "transfer": transfer,
        "union": union,
        "cities_probe": {"id": best_id, "layer": own["probe"]["layer"], "report": own},
        "evaluations": evaluations,
    }


KEPT_METRICS = ("accuracy", "auroc", "aurc", "prr", "brier", "ece")


def slim(value: Any) -> Any:
    """The results without what the tables do not read: reliability bins, histograms and
    risk-coverage curves, and of each metric table only `KEPT_METRICS`."""
    if isinstance(value, list):
        return [slim(item) for item in value]
    if not isinstance(value, dict):
        return value
    kept = {key: item for key, item in value.items() if key not in {"bins", "histogram", "risk_coverage"}}
    if "metrics" in kept and isinstance(kept["metrics"], dict):
        kept["metrics"] = {name: kept["metrics"][name] for name in KEPT_METRICS if name in kept["metrics"]}
    if set(kept) >= {"auroc", "ece"} and all(isinstance(item, dict) and "value" in item for item in kept.values()):
        kept = {name: kept[name] for name in KEPT_METRICS if name in kept}  # a versus_baselines table
    return {key: slim(item) for key, item in kept.items()}


def print_tables(results: dict[str, Any]) -> None:
    matrix = results["transfer"]["matrix"]
    names = [short(column["label"]) for column in matrix["columns"]]
    print("Transfer matrix: test AUROC [95% interval] of the probe trained on the row's set (its layer)\n")
    print("| trained on ↓ / scored on → | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for row, cells in zip(matrix["rows"], matrix["cells"], strict=True):
        values = " | ".join(
            f"**{interval_cell(cell['metrics']['auroc'])}**"
            if row["label"] == column["label"]
            else interval_cell(cell["metrics"]["auroc"])
            for cell, column in zip(cells, matrix["columns"], strict=True)
        )
        print(f"| {short(row['label'])} (layer {row['layer']}) | {values} |")
    if "union" in results:
        union = results["union"]["matrix"]
        row, cells = union["rows"][0], union["cells"][0]
        label = " + ".join(short(name) for name in row["label"].split(" + "))
        values = " | ".join(interval_cell(cell["metrics"]["auroc"]) for cell in cells)
        print(f"| {label} (layer {row['layer']}) | {values} |")
    print("\nThe cities probe against P(True)\n")
    print("| scored on | n | probe AUROC | P(True) AUROC | probe ECE | P(True) ECE | AUROC: probe − P(True) |")
    print("|---|---|---|---|---|---|---|")
    reports = {"cities (test split)": results["cities_probe"]["report"], **results["evaluations"]}
    for name, report in reports.items():
        probe = report["report"]["metrics"]
        p_true = ((report.get("baselines") or {}).get("p_true") or {}).get("metrics", {})
        versus = ((report.get("versus_baselines") or {}).get("p_true") or {}).get("auroc")
        difference = f"{interval_cell(versus)} ({versus['verdict']})" if versus else "—"
        print(
            f"| {name} | {report['report']['n']} | {interval_cell(probe['auroc'])} | {interval_cell(p_true.get('auroc'))} "
            f"| {interval_cell(probe['ece'])} | {interval_cell(p_true.get('ece'))} | {difference} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--serve", type=Path, help="start an embedded service with this VAR_DIR")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--rows", type=int, default=1000, help="at most this many rows of each set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, help="save the measured results here (JSON)")
    parser.add_argument("--from-results", type=Path, help="print the tables of a saved results file")
    parser.add_argument("--svg", type=Path)
    parser.add_argument("--png", type=Path)
    args = parser.parse_args()
    if args.from_results:
        print_tables(json.loads(args.from_results.read_text()))
        return
    with embedded_service(args.serve) if args.serve else nullcontext(args.url) as url:
        results = measure(url, args)
    if args.results:
        args.results.write_text(json.dumps(slim(results), indent=1) + "\n")
    print_tables(results)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
