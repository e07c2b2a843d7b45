"""Workflow 2: take a LoRA adapter from an existing Tinker checkpoint (here the legacy `.tar`
archive the old SDK downloaded; with TINKER_API_KEY set on the service,
`client.import_adapter("tinker://<run>/external_weights/<name>", ...)` fetches it directly),
convert it to PEFT, and probe the fine-tuned model.

The base is SmolLM2-135M-Instruct from its GGUF file. Its adapter `sft-v1` is a random
stand-in for a real fine-tune (SmolLM2 has none yet; `examples/prepare.py` draws it in
Tinker's export format): the import, conversion and probing are real, the fine-tune is not.

    python examples/finetuned_then_probe.py
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
    imported = client.wait(
        client.upload_adapter(manifest["adapters"]["sft-v1"]["archive"], base_model=model.id, name="sft-v1").id
    )
    assert imported.result is not None
    adapter = client.get_adapter(imported.result["adapter_id"])
    print(
        f"adapter {adapter.id}: r={adapter.r}, lora_alpha={adapter.lora_alpha}, targets {', '.join(adapter.target_modules)}"
    )
    dataset = client.upload_dataset(manifest["statements"])
    run = client.train(model.id, adapter=adapter.id, dataset=dataset.id, layers=LAYERS, recalibration="temperature")
    best = next(probe for probe in run.probes if probe.is_best)
    print(
        f"fine-tuned model, best probe: layer {best.layer}, test AUROC {best.metrics['auroc'].value:.3f}, ECE {best.metrics['ece'].value:.3f}"
    )


if __name__ == "__main__":
    main()
