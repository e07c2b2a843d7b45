"""Workflow 3: the base model against two fine-tuned adapters on the same texts, split and
layer: metrics side by side, paired differences, cross-transfer, one reliability diagram.

The base is SmolLM2-135M-Instruct from its GGUF file; its adapters `sft-v1` and `dpo-v2` are
random stand-ins for real fine-tunes (SmolLM2 has none yet; `examples/prepare.py` draws them
in Tinker's export format, `dpo-v2` further from the base than `sft-v1`). The comparison's
machinery is real; what it finds about these adapters says nothing about fine-tuning.

    python examples/compare_base_vs_finetuned.py
"""

import json
import os
from pathlib import Path

from confprobe_client import Client

WORK = Path(__file__).resolve().parent / "work"
LAYERS = [8, 16, 24]


def main() -> None:
    manifest = json.loads((WORK / "manifest.json").read_text())
    client = Client(os.environ.get("CONFPROBE_URL", "http://127.0.0.1:8000"), timeout=120)
    model = client.register_model(manifest["base_model"], name="smollm2")
    adapters = []
    for name, files in manifest["adapters"].items():
        job = client.wait(client.upload_adapter(files["archive"], base_model=model.id, name=name).id)
        assert job.result is not None
        adapters.append(job.result["adapter_id"])
    dataset = client.upload_dataset(manifest["statements"])
    comparison = client.compare(model.id, adapters, dataset.id, layers=LAYERS)
    client.wait(comparison.job_id)
    report = client.get_comparison(comparison.id).report
    assert report is not None
    print(f"layer {report.layer} (chosen on the base's validation split)")
    for variant in report.variants:
        metrics = variant.report.metrics
        print(f"{variant.label:<44} AUROC {metrics['auroc'].value:.3f}  ECE {metrics['ece'].value:.3f}")
    for label, transfer in report.cross_transfer.items():
        print(f"cross-transfer, {label}: AUROC {transfer.auroc:.3f}")
    page = WORK / "comparison.html"
    page.write_text(client.comparison_report_html(comparison.id))
    print(f"report: {page}")


if __name__ == "__main__":
    main()
