"""The container set-up (Dockerfile, docker-compose.yml) agrees with the project: settings
names, build targets, where torch is and is not installed. Checked statically; the compose
file is also validated by `docker compose config` where that CLI exists."""

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
WORKER_SERVICES = ("worker-gpu0", "worker-gpu1")
APP_SERVICES = ("gateway", *WORKER_SERVICES)
S3_OVERRIDE = ["-f", "docker-compose.yml", "-f", "docker-compose.s3.yml"]


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


@pytest.fixture(scope="module")
def s3_services() -> dict[str, Any]:
    """What docker-compose.s3.yml adds to, and changes in, docker-compose.yml."""
    return yaml.safe_load((ROOT / "docker-compose.s3.yml").read_text())["services"]


def _stages() -> dict[str, list[str]]:
    """Instructions of each named Dockerfile stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in (raw.strip() for raw in text.splitlines()):
        if not line or line.startswith("#"):
            continue
        if match := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE):
            current = stages.setdefault(match[1], [])
        current.append(line)
    return stages


def _pip_installs(stage: str) -> list[str]:
    return [line for line in _stages()[stage] if re.match(r"RUN\b.*\bpip install\b", line)]


def _torch_pin(requirements: list[str]) -> str:
    return next(req for req in requirements if re.match(r"torch\s*==", req)).replace(" ", "")


def _constrained_torch() -> str:
    return _torch_pin((ROOT / "constraints.txt").read_text().split())


def test_compose_defines_redis_postgres_gateway_and_workers(services: dict[str, Any]) -> None:
    assert {"redis", "postgres", "gateway", *WORKER_SERVICES} <= services.keys()


def test_gateway_publishes_port_8000(services: dict[str, Any]) -> None:
    assert "8000:8000" in services["gateway"]["ports"]


@pytest.mark.parametrize("service", APP_SERVICES)
def test_service_registry_is_the_postgres_service(services: dict[str, Any], service: str) -> None:
    url = urlsplit(services[service]["environment"]["DATABASE_URL"])
    assert url.scheme == "postgresql+psycopg"
    assert url.hostname == "postgres"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_service_queue_is_the_redis_service(services: dict[str, Any], service: str) -> None:
    url = urlsplit(services[service]["environment"]["REDIS_URL"])
    assert (url.scheme, url.hostname) == ("redis", "redis")


def test_each_worker_reserves_a_gpu_of_its_own_and_sees_it_as_cuda_0(services: dict[str, Any]) -> None:
    reserved = []
    for service in WORKER_SERVICES:
        [device] = services[service]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and "count" not in device, service
        reserved.append(device["device_ids"])
        assert services[service]["environment"]["WORKER_DEVICE"] == "cuda:0"
        assert "replicas" not in services[service].get("deploy", {}), (
            "replicas would share one GPU, each with a whole budget"
        )
    assert reserved == [["0"], ["1"]]


def test_only_the_first_gpu_worker_starts_by_default(services: dict[str, Any]) -> None:
    """A one-GPU machine runs the file as it is; a second GPU is asked for by its profile."""
    assert "profiles" not in services["worker-gpu0"]
    assert services["worker-gpu1"]["profiles"] == ["gpu1"]


def test_workers_memory_budget_is_set_from_the_environment_with_a_valid_default(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unset, the variable is empty in the container, and the worker sizes its budget by its GPU."""
    for service in WORKER_SERVICES:
        value = services[service]["environment"]["WORKER_MEMORY_BUDGET_MB"]
        default = value.removeprefix("${WORKER_MEMORY_BUDGET_MB:-").removesuffix("}")
        monkeypatch.setenv("WORKER_MEMORY_BUDGET_MB", default)
        assert value != default and Settings().worker_memory_budget_mb is None


@pytest.mark.parametrize("service", APP_SERVICES)
def test_service_environment_names_only_existing_settings(
    services: dict[str, Any], s3_services: dict[str, Any], service: str
) -> None:
    known = {name.upper() for name in Settings.model_fields} | {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    }  # boto3 reads those
    assert set(services[service]["environment"]) - known == set()
    assert set(s3_services[service]["environment"]) - known == set()


def test_compose_default_store_is_the_shared_volume(services: dict[str, Any]) -> None:
    environment = services["gateway"]["environment"]
    default = environment["ARTIFACT_STORE"].removeprefix("${ARTIFACT_STORE:-").removesuffix("}")
    store = Settings(
        artifact_store=default, s3_endpoint_url=environment["S3_ENDPOINT_URL"].split(":-", 1)[1].rstrip("}")
    )
    assert default == "file:///artifacts" and store.artifact_store == default
    for service in APP_SERVICES:
        assert "artifacts:/artifacts" in services[service]["volumes"]
    assert not {"minio", "minio-bucket"} & services.keys()


def test_the_s3_override_stores_artifacts_in_the_bucket_it_creates(
    services: dict[str, Any], s3_services: dict[str, Any]
) -> None:
    bucket_store = {
        s3_services[service]["environment"]["ARTIFACT_STORE"].removeprefix("${ARTIFACT_STORE:-").removesuffix("}")
        for service in APP_SERVICES
    }
    assert bucket_store == {"s3://confprobe/artifacts"}
    assert Settings(artifact_store="s3://confprobe/artifacts").artifact_store == "s3://confprobe/artifacts"
    assert "mb --ignore-existing local/confprobe" in " ".join(s3_services["minio-bucket"]["entrypoint"])
    assert services["gateway"]["environment"]["S3_ENDPOINT_URL"] == "${S3_ENDPOINT_URL:-http://minio:9000}"


def test_under_the_s3_override_every_app_service_waits_for_the_bucket(
    services: dict[str, Any], s3_services: dict[str, Any]
) -> None:
    """An upload before the bucket exists would fail; `depends_on` on a service of another
    profile breaks the default start, hence an override file rather than a profile."""
    app_services = {name for name, service in services.items() if "build" in service}
    assert app_services == set(APP_SERVICES)
    for service in app_services:
        assert s3_services[service]["depends_on"]["minio-bucket"] == {"condition": "service_completed_successfully"}, (
            service
        )
    assert s3_services["minio-bucket"]["depends_on"]["minio"] == {"condition": "service_healthy"}


def test_compose_turns_auth_on_by_default(services: dict[str, Any]) -> None:
    """`${AUTH_ENABLED:-true}`: on unless the operator says otherwise, the reverse of the embedded default."""
    value = services["gateway"]["environment"]["AUTH_ENABLED"]
    assert value.removeprefix("${AUTH_ENABLED:-").removesuffix("}") == "true"
    assert Settings().auth_enabled is False


@pytest.mark.parametrize("service", APP_SERVICES)
def test_service_builds_its_own_dockerfile_target(services: dict[str, Any], service: str) -> None:
    assert services[service]["build"]["target"] == service.split("-")[0]


def test_dockerfile_defines_gateway_and_worker_targets() -> None:
    assert {"gateway", "worker"} <= _stages().keys()


def test_gateway_image_installs_neither_torch_nor_worker_extra() -> None:
    installs = _pip_installs("gateway")
    assert installs, "the gateway stage installs the project"
    assert not [line for line in installs if "torch" in line or "[worker]" in line]


def test_worker_image_installs_cuda_torch_before_project_under_constraints() -> None:
    installs = _pip_installs("worker")
    torch_at = next(i for i, line in enumerate(installs) if _constrained_torch() in line)
    project_at = next(i for i, line in enumerate(installs) if "[worker]" in line)
    assert torch_at < project_at
    assert re.search(r"(--constraint|-c)\s+\S*constraints\.txt", installs[project_at])


def test_worker_image_takes_torch_from_pytorchs_cuda_index() -> None:
    torch_install = next(line for line in _pip_installs("worker") if _constrained_torch() in line)
    assert "--index-url" in torch_install
    assert re.search(r"download\.pytorch\.org/whl/cu\d+", "\n".join(_stages()["worker"]))


def test_constraints_pin_torch_2_13_0_as_the_worker_extra_does() -> None:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["worker"]
    assert _constrained_torch() == _torch_pin(extra) == "torch==2.13.0"


def test_every_make_install_runs_pip_under_the_constraints_torch_first() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^PIP_INSTALL = \S*pip install .*--constraint constraints\.txt", makefile, re.MULTILINE)
    recipe = makefile.split("$(BIN)/.installed:", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    installs = [line.strip() for line in recipe if "pip" in line.lower()]
    assert all(line.startswith("$(PIP_INSTALL) ") for line in installs)
    assert installs[0] == f"$(PIP_INSTALL) {_constrained_torch()}"


def _compose_command() -> list[str] | None:
    """`docker compose` (the plugin) where it exists, else the standalone `docker-compose`."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def _compose_config(arguments: list[str]) -> subprocess.CompletedProcess[str]:
    command = _compose_command()
    assert command is not None
    return subprocess.run([*command, *arguments, "config"], cwd=ROOT, capture_output=True, text=True)


needs_compose = pytest.mark.skipif(_compose_command() is None, reason="needs docker compose or docker-compose")


@needs_compose
@pytest.mark.parametrize(
    "arguments",
    [[], ["--profile", "gpu1"], S3_OVERRIDE, [*S3_OVERRIDE, "--profile", "gpu1"]],
    ids=["default", "gpu1", "s3", "s3-gpu1"],
)
def test_compose_file_is_valid_for_docker_compose(arguments: list[str]) -> None:
    result = _compose_config(arguments)
    assert result.returncode == 0, result.stderr


@needs_compose
def test_the_s3_override_adds_to_the_services_dependencies_and_environment() -> None:
    """Compose merges the override into the base file: the bucket joins Redis and PostgreSQL
    in what the services wait for, and the store setting changes, nothing else."""
    result = _compose_config(S3_OVERRIDE)
    assert result.returncode == 0, result.stderr
    merged = yaml.safe_load(result.stdout)["services"]
    assert set(merged["gateway"]["depends_on"]) == {"redis", "postgres", "minio-bucket"}
    assert set(merged["worker-gpu0"]["depends_on"]) == {"redis", "postgres", "gateway", "minio-bucket"}
    assert merged["worker-gpu0"]["environment"]["ARTIFACT_STORE"] == "s3://confprobe/artifacts"
    assert merged["worker-gpu0"]["environment"]["WORKER_DEVICE"] == "cuda:0"
    assert merged["worker-gpu1"]["profiles"] == ["gpu1"]
