"""The worker's Tinker client, through the real `tinker` SDK against a local stand-in of the
Tinker service: paths, weights info, supported models, and external weights downloads."""

import json
import os
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

# before the SDK builds any connection: its telemetry can hold a failing call ~30 s
os.environ["TINKER_TELEMETRY"] = "0"

from tests.tinker_standin import StandinCheckpoint, TinkerStandin
from workers.adapters import tinker as tinker_client
from workers.adapters.tinker import (
    SupportedModel,
    TinkerClient,
    TinkerPath,
    WeightsInfo,
    parse_tinker_path,
)
from workers.errors import JobCancelled, JobFailed

KEY = "tml-test-key"
RUN_ID = "5b0e3a52-7a9c-4d1e-8f36-2c4b1d9e0a77:train:0"
BASE_MODEL = "meta-llama/Llama-3.2-1B"


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("tinker-adapter")
    rng = np.random.default_rng(0)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {
            f"{prefix}.lora_A.weight": rng.standard_normal((4, 16), dtype=np.float32),
            f"{prefix}.lora_B.weight": rng.standard_normal((16, 4), dtype=np.float32),
        },
        folder / "adapter_model.safetensors",
    )
    return {
        "adapter_config.json": json.dumps({"r": 4, "lora_alpha": 8}).encode(),
        "adapter_model.safetensors": (folder / "adapter_model.safetensors").read_bytes(),
    }


@pytest.fixture
def standin(adapter_files: dict[str, bytes]) -> Iterator[TinkerStandin]:
    with TinkerStandin(api_key=KEY) as service:
        service.add_checkpoint(
            StandinCheckpoint(run_id=RUN_ID, name="final", base_model=BASE_MODEL, files=adapter_files)
        )
        yield service


@pytest.fixture
def client(standin: TinkerStandin) -> TinkerClient:
    return TinkerClient(KEY, standin.base_url)


def external(name: str = "final") -> TinkerPath:
    return TinkerPath(run_id=RUN_ID, kind="external_weights", name=name)


def read_back(paths: list[Path]) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in paths}


# --- paths -------------------------------------------------------------------------------


def test_a_path_splits_into_run_id_kind_and_name_keeping_colons_in_the_run_id() -> None:
    path = parse_tinker_path(f"tinker://{RUN_ID}/external_weights/final")
    assert path == TinkerPath(run_id=RUN_ID, kind="external_weights", name="final")
    assert str(path) == f"tinker://{RUN_ID}/external_weights/final"


@pytest.mark.parametrize(
    ("path", "complaint"),
    [
        ("https://example.com/run/external_weights/final", "must start with tinker://"),
        ("tinker://run/external_weights", "expected tinker://<run_id>/<kind>/<name>"),
        ("tinker://run/external_weights/final/extra", "expected tinker://<run_id>/<kind>/<name>"),
        ("tinker:///external_weights/final", "expected tinker://<run_id>/<kind>/<name>"),
        ("tinker://run/external_weights/", "expected tinker://<run_id>/<kind>/<name>"),
        ("tinker://run/checkpoints/final", "checkpoint kind 'checkpoints'"),
    ],
)
def test_a_malformed_path_is_refused_saying_what_is_wrong(path: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint.replace("(", r"\(").replace(")", r"\)")):
        parse_tinker_path(path)


# --- metadata ----------------------------------------------------------------------------


def test_weights_info_reports_the_base_model_and_lora_settings(client: TinkerClient) -> None:
    assert client.weights_info(external()) == WeightsInfo(
        base_model=BASE_MODEL, is_lora=True, lora_rank=4, train_unembed=True, train_mlp=True, train_attn=True
    )


def test_the_supported_models_are_listed(client: TinkerClient) -> None:
    assert client.supported_models() == [
        SupportedModel(model_name="meta-llama/Llama-3.2-1B", max_context_length=32768, trainable=True, sampleable=True),
        SupportedModel(model_name="Qwen/Qwen3-8B", max_context_length=32768, trainable=True, sampleable=False),
    ]


# --- downloads ---------------------------------------------------------------------------


def test_a_download_writes_the_served_files_byte_for_byte(
    client: TinkerClient, adapter_files: dict[str, bytes], tmp_path: Path
) -> None:
    paths = client.download_external_weights(external(), tmp_path / "adapter", max_bytes=10**6)
    assert read_back(paths) == adapter_files
    assert sorted(path.name for path in (tmp_path / "adapter").iterdir()) == sorted(adapter_files)


def test_progress_is_reported_after_each_file(client: TinkerClient, tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    client.download_external_weights(
        external(), tmp_path / "adapter", max_bytes=10**6, on_file=lambda done, total: calls.append((done, total))
    )
    assert calls == [(1, 2), (2, 2)]


def test_urls_that_stay_valid_are_asked_for_once(client: TinkerClient, standin: TinkerStandin, tmp_path: Path) -> None:
    client.download_external_weights(external(), tmp_path / "adapter", max_bytes=10**6)
    assert standin.url_requests == 1


def test_urls_about_to_expire_are_asked_for_again_before_each_file(
    client: TinkerClient, standin: TinkerStandin, tmp_path: Path
) -> None:
    standin.url_lifetime = timedelta(minutes=4)  # inside the 5 minutes kept in hand
    client.download_external_weights(external(), tmp_path / "adapter", max_bytes=10**6)
    assert standin.url_requests == 3


def test_an_expiry_without_a_timezone_is_read_as_utc(
    client: TinkerClient, standin: TinkerStandin, adapter_files: dict[str, bytes], tmp_path: Path
) -> None:
    standin.naive_expires = True
    standin.url_lifetime = timedelta(minutes=4)
    paths = client.download_external_weights(external(), tmp_path / "adapter", max_bytes=10**6)
    assert read_back(paths) == adapter_files
    assert standin.url_requests == 3


def test_a_url_refused_as_expired_is_signed_again_and_its_file_retried(
    client: TinkerClient, standin: TinkerStandin, adapter_files: dict[str, bytes], tmp_path: Path
) -> None:
    # the URLs die after the first file, long before the `expires` they were sent with
    paths = client.download_external_weights(
        external(), tmp_path / "adapter", max_bytes=10**6, on_file=lambda done, total: standin.revoke_signed_urls()
    )
    assert read_back(paths) == adapter_files
    assert standin.url_requests == 2


def test_a_url_refused_again_after_signing_fails_and_leaves_nothing(
    client: TinkerClient, standin: TinkerStandin, tmp_path: Path
) -> None:
    standin.url_lifetime = timedelta(0)
    with pytest.raises(JobFailed) as failure:
        client.download_external_weights(external(), tmp_path / "adapter", max_bytes=10**6)
    assert failure.value.code == "tinker_download_failed" and "403" in failure.value.message
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("hostile_name", ["../evil.json", "/tmp/abs.json", "nested/../../evil.json", "."])
def test_a_file_name_outside_the_folder_is_refused_before_anything_is_downloaded(
    client: TinkerClient, standin: TinkerStandin, adapter_files: dict[str, bytes], tmp_path: Path, hostile_name: str
) -> None:
    standin.add_checkpoint(
        StandinCheckpoint(
            run_id=RUN_ID, name="hostile", base_model=BASE_MODEL, files=adapter_files | {hostile_name: b"{}"}
        )
    )
    destination = tmp_path / "downloads" / "adapter"
    with pytest.raises(JobFailed) as failure:
        client.download_external_weights(external("hostile"), destination, max_bytes=10**6)
    assert failure.value.code == "tinker_unsafe_file_name" and hostile_name in failure.value.message
    assert standin.file_requests == 0
    assert (
        not destination.exists()
        and not (tmp_path / "downloads" / "evil.json").exists()
        and not (tmp_path / "evil.json").exists()
    )


def test_a_checkpoint_over_max_bytes_fails_and_leaves_its_folder_empty(
    client: TinkerClient, adapter_files: dict[str, bytes], tmp_path: Path
) -> None:
    destination = tmp_path / "adapter"
    destination.mkdir()
    with pytest.raises(JobFailed) as failure:
        client.download_external_weights(external(), destination, max_bytes=sum(map(len, adapter_files.values())) - 1)
    assert failure.value.code == "adapter_too_large"
    assert list(destination.iterdir()) == []


def test_a_cancel_between_files_leaves_nothing(client: TinkerClient, tmp_path: Path) -> None:
    def cancel(done: int, total: int) -> None:
        raise JobCancelled()

    with pytest.raises(JobCancelled):
        client.download_external_weights(external(), tmp_path / "adapter", max_bytes=10**6, on_file=cancel)
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("kind", ["sampler_weights", "weights"])
def test_a_sampler_or_training_checkpoint_is_refused_with_what_to_do_instead_and_no_request(
    client: TinkerClient, standin: TinkerStandin, tmp_path: Path, kind: str
) -> None:
    sent = len(standin.requests)
    with pytest.raises(JobFailed) as failure:
        client.download_external_weights(TinkerPath(RUN_ID, kind, "final"), tmp_path / "adapter", max_bytes=10**6)
    assert failure.value.code == "tinker_checkpoint_kind"
    assert "save_weights_external" in failure.value.message and "POST /v1/adapters/upload" in failure.value.message
    assert len(standin.requests) == sent
    assert not (tmp_path / "adapter").exists()


# --- failures of the service -------------------------------------------------------------


def test_a_wrong_api_key_is_unauthorized(standin: TinkerStandin) -> None:
    with pytest.raises(JobFailed) as failure:
        TinkerClient("tml-wrong-key", standin.base_url)
    assert failure.value.code == "tinker_unauthorized"


def test_a_missing_api_key_is_refused_without_asking_the_service(standin: TinkerStandin) -> None:
    with pytest.raises(JobFailed) as failure:
        TinkerClient("", standin.base_url)
    assert failure.value.code == "tinker_unauthorized" and "TINKER_API_KEY" in failure.value.message
    assert standin.requests == []


def test_an_unknown_checkpoint_is_not_found(client: TinkerClient, tmp_path: Path) -> None:
    with pytest.raises(JobFailed) as failure:
        client.download_external_weights(external("missing"), tmp_path / "adapter", max_bytes=10**6)
    assert failure.value.code == "tinker_not_found" and str(external("missing")) in failure.value.message
    assert not (tmp_path / "adapter").exists()


def test_a_service_that_stops_answering_fails_within_the_deadline(
    client: TinkerClient, standin: TinkerStandin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tinker_client, "SDK_TIMEOUT_S", 1.0)
    standin.stop()
    started = time.monotonic()
    with pytest.raises(JobFailed) as failure:
        client.weights_info(external())
    assert failure.value.code == "tinker_unreachable" and str(external()) in failure.value.message
    assert time.monotonic() - started < 5


# --- training data -----------------------------------------------------------------------


def test_a_datum_scores_each_next_token_weighting_only_the_completion_targets() -> None:
    from workers.adapters.tinker_training import datum
    from workers.finetuning import Example

    built = datum(Example(token_ids=(1, 7, 8, 9, 2), targets=(3, 4)))
    assert built.model_input.to_ints() == [1, 7, 8, 9]
    assert built.loss_fn_inputs["target_tokens"].tolist() == [7, 8, 9, 2]
    assert built.loss_fn_inputs["weights"].tolist() == [0.0, 0.0, 1.0, 1.0]
