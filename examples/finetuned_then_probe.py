"""Workflow 2: fine-tune, then probe. SmolLM2-135M-Instruct (from its GGUF file) is
fine-tuned with LoRA on the service's own worker, on the training part of the city
multiple-choice questions (`data/city_questions.jsonl`); then the base and the adapter it
registered are compared on the held-out questions: how often each answers right, which
letters it picks, and probes of each on its own hidden states, with paired intervals.

    python examples/finetuned_then_probe.py              # the full run: 200 steps (~15 min on 2 CPU cores)
    FINETUNE_STEPS=4 HELD_OUT=60 python examples/finetuned_then_probe.py   # a quick look

It writes `examples/work/finetuned_then_probe.json` (the figures) and `.html` (the
comparison's page) and the fine-tune's loss curve as `.svg`.
"""

import json
import os
import tempfile
from pathlib import Path

from confprobe_client import Client

EXAMPLES = Path(__file__).resolve().parent
WORK = EXAMPLES / "work"
QUESTIONS = EXAMPLES.parent / "data" / "city_questions.jsonl"
LAYERS = [8, 16, 24]
STEPS = int(os.environ.get("FINETUNE_STEPS", "200"))
HELD_OUT = int(os.environ.get("HELD_OUT", "248"))  # the last questions of the file, never trained on


def upload(client: Client, rows: list[str], name: str) -> str:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{name}.jsonl"
        path.write_text("".join(rows))
        return client.upload_dataset(path, name=name).id


def main() -> None:
    manifest = json.loads((WORK / "manifest.json").read_text())
    client = Client(os.environ.get("CONFPROBE_URL", "http://127.0.0.1:8000"), timeout=120)
    model = client.register_model(manifest["base_model"], name="smollm2")
    lines = QUESTIONS.read_text().splitlines(keepends=True)
    train = upload(client, lines[:-HELD_OUT], "city-questions-train")
    held_out = upload(client, lines[-HELD_OUT:], "city-questions-held-out")

    finetune = client.finetune(
        model.id,
        train,
        "cities-sft",
        steps=STEPS,
        batch_size=8,
        learning_rate=2e-4,
        r=16,
        lora_alpha=32,
        max_length=256,
        lora={"dropout": 0.0},
        training={"validation_every": max(1, STEPS // 10), "checkpoint_every": max(1, STEPS // 4), "warmup_steps": 0},
    )
    print(
        f"fine-tune {finetune.id}: adapter {finetune.adapter_id}, final loss {finetune.final_loss:.3f}, "
        f"validation loss {finetune.final_validation_loss:.3f} (best {finetune.best_validation_loss:.3f})"
    )
    (WORK / "finetuned_then_probe.svg").write_text(client.finetune_loss_svg(finetune.id))
    assert finetune.adapter_id is not None

    queued = client.compare(model.id, [finetune.adapter_id], held_out, LAYERS)
    client.wait(queued.job_id)
    comparison = client.get_comparison(queued.id)
    report = comparison.report
    assert report is not None and report.answers is not None and report.answer_differences is not None
    for label, answered in report.answers.items():
        picks = " ".join(f"{letter}:{count}" for letter, count in answered.picks.items())
        print(f"{label}: {answered.accuracy:.1%} of {answered.n} held-out questions right; picks {picks}")
    for label, moved in report.answer_differences.items():
        low, high = moved.accuracy.interval or (float("nan"), float("nan"))
        print(
            f"{label} accuracy minus the base's: {moved.accuracy.value:+.1%} [{low:+.1%}, {high:+.1%}]; "
            f"letter picks moved by {moved.picks_total_variation:.1%}"
        )
    for variant in report.variants:
        metrics = variant.report.metrics
        print(
            f"{variant.label} probe at layer {report.layer}: AUROC {metrics['auroc'].value:.3f}, ECE {metrics['ece'].value:.3f}"
        )
    (WORK / "finetuned_then_probe.html").write_text(client.comparison_report_html(comparison.id))
    figures = {
        "steps": STEPS,
        "held_out": HELD_OUT,
        "finetune": finetune.summary,
        "answers": {label: answered.model_dump() for label, answered in report.answers.items()},
        "answer_differences": {label: moved.model_dump() for label, moved in report.answer_differences.items()},
        "layer": report.layer,
        "probes": {
            variant.label: {name: variant.report.metrics[name].model_dump() for name in ("auroc", "ece", "brier")}
            for variant in report.variants
        },
        "differences": {
            label: {name: diff[name].model_dump() for name in ("auroc", "ece")}
            for label, diff in report.differences.items()
        },
    }
    (WORK / "finetuned_then_probe.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
