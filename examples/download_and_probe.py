"""Workflow 1: register a base model, extract hidden states, train a probe, read its
calibration report.

The base model is SmolLM2-135M-Instruct, registered by the path of its GGUF file (the
service's worker dequantizes it once, 20 to 60 s, and keeps the result in its cache); the
data are 100 of the cities statements. Layers 8, 16 and 24 of its 30.

    python examples/prepare.py && confprobe serve &    # once
    python examples/download_and_probe.py
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
    assert model.check_job_id is not None
    client.wait(model.check_job_id)
    dataset = client.upload_dataset(manifest["statements"])
    states = client.extract(model.id, layers=LAYERS, dataset=dataset.id)
    print(f"hidden states: {states.shape} (texts, layers, hidden)")
    run = client.train(model.id, dataset=dataset.id, layers=LAYERS)
    best = next(probe for probe in run.probes if probe.is_best)
    print(
        f"best probe: layer {best.layer}, test AUROC {best.metrics['auroc'].value:.3f}, ECE {best.metrics['ece'].value:.3f}"
    )
    report = WORK / "download_and_probe.html"
    report.write_text(client.probe_report_html(best.id))
    print(f"report: {report}")


if __name__ == "__main__":
    main()
