"""The Python client against the real service and a real worker: typed answers, jobs
followed to their end, errors by kind, and an import that stays light."""

import io
import json
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.main import create_app
from app.settings import Settings
from confprobe_client import (
    ApiError,
    Client,
    Conflict,
    Dataset,
    Finetune,
    InvalidRequest,
    JobFailed,
    Model,
    NotFound,
    ProbeRun,
    Unavailable,
    Unreachable,
    WaitTimedOut,
)
from tests.conftest import ROOT, Stack, served

TEXTS = ["The city of Paris is in France.", "The city of Tokyo is in Japan.", "Fifty-one is larger than forty-nine."]


def statements(count: int = 60) -> list[dict[str, Any]]:
    """Sums, right (label 1) and off by one (label 0): enough rows for a stratified split."""
    return [{"text": f"{i} plus {i + 3} is {2 * i + 3 + i % 2}.", "label": 1 - i % 2} for i in range(count)]


def questions(count: int = 30) -> list[dict[str, Any]]:
    """Multiple choice whose answer is the number itself, among three: enough rows to hold out
    a validation fraction of 0.1."""
    return [
        {"question": f"Which number is {n}?", "choices": [str(n), str(n + 1), str(n + 2)], "answer": n % 3}
        for n in range(count)
    ]


# a fine-tune of the tiny model in a few seconds: four steps of four examples, a rank-4 LoRA
# on two of its layers
QUICK_FINETUNE: dict[str, Any] = {
    "steps": 4,
    "batch_size": 4,
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["q_proj", "v_proj"],
}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


def hostile_archive(path: Path) -> Path:
    """A tar whose member climbs out of the extraction folder: its import job must fail."""
    with tarfile.open(path, "w") as archive:
        member = tarfile.TarInfo("../../escaped.json")
        member.size = 2
        archive.addfile(member, io.BytesIO(b"{}"))
    return path


@pytest.fixture
def client(stack: Stack) -> Client:
    return Client(http=stack.client)


@pytest.fixture
def model(client: Client, tiny_llama: Path) -> Model:
    return client.register_model(str(tiny_llama), name="tiny")


@pytest.fixture
def dataset(client: Client, tmp_path: Path) -> Dataset:
    return client.upload_dataset(write_jsonl(tmp_path / "sums.jsonl", statements()))


@pytest.fixture(scope="module")
def trained(stack: Stack, tiny_llama_template: Path, tmp_path_factory: pytest.TempPathFactory) -> ProbeRun:
    """One probe run that the report and scoring tests read."""
    client = Client(http=stack.client)
    model = client.register_model(str(tiny_llama_template), name="tiny")
    dataset = client.upload_dataset(write_jsonl(tmp_path_factory.mktemp("rows") / "sums.jsonl", statements()))
    return client.train(model.id, dataset.id, layers=[1, -1], method=["logistic", "mass_mean"], progress=False)


@pytest.fixture(scope="module")
def finetuned(stack: Stack, tiny_llama_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Finetune:
    """One finished fine-tune that the fine-tune tests read."""
    client = Client(http=stack.client)
    model = client.register_model(str(tiny_llama_template), name="tiny")
    client.wait(model.check_job_id or "", progress=False)  # checked: its linear layers are known
    dataset = client.upload_dataset(write_jsonl(tmp_path_factory.mktemp("rows") / "numbers.jsonl", questions()))
    # a seed of its own: the same run again makes the same weights, which are the adapter that
    # run registered (with that run as its source)
    return client.finetune(model.id, dataset.id, "numbers-sft", **QUICK_FINETUNE, seed=1, progress=False)


def test_a_registered_model_is_checked_by_a_worker_and_becomes_ready(client: Client, tiny_llama: Path) -> None:
    model = client.register_model(str(tiny_llama), name="tiny")
    assert (model.num_layers, model.hidden_size, model.status) == (2, 16, "pending")
    assert model.check_job_id is not None
    check = client.wait(model.check_job_id, progress=False)
    assert check.status == "succeeded" and check.kind == "model_check"
    assert client.get_model(model.id).status == "ready"
    assert model.id in [listed.id for listed in client.list_models().items]


def test_an_uploaded_dataset_comes_back_typed_with_its_rows_and_label_balance(client: Client, tmp_path: Path) -> None:
    uploaded = client.upload_dataset(write_jsonl(tmp_path / "sums.jsonl", statements(14)), name="sums")
    assert (uploaded.name, uploaded.kind, uploaded.rows, uploaded.label_balance) == (
        "sums",
        "statements",
        14,
        {"0": 7, "1": 7},
    )
    assert client.get_dataset(uploaded.id) == uploaded


def test_extract_returns_texts_by_layers_by_hidden_equal_to_the_download_of_that_extraction(
    client: Client, model: Model
) -> None:
    states = client.extract(model.id, layers=[0, -1], texts=TEXTS, progress=False)
    assert states.shape == (len(TEXTS), 2, 16) and states.dtype == np.float32
    extraction = client.list_extractions(limit=1).items[0]
    assert (extraction.model_id, extraction.layers, extraction.shape) == (model.id, [0, 2], [len(TEXTS), 2, 16])
    np.testing.assert_array_equal(client.download_hidden_states(extraction.id), states)


def test_wait_follows_a_job_to_success_with_a_progress_bar_on_stderr(
    client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    job = client.wait(client.ping().id)
    assert job.status == "succeeded" and job.finished_at is not None
    assert f"{job.id} ping" in capsys.readouterr().err


class RecordingTransport(httpx.HTTPTransport):
    """Real HTTP, remembering the paths asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        return super().handle_request(request)


def test_over_real_http_wait_follows_the_event_stream_without_polling(stack: Stack, model: Model) -> None:
    transport = RecordingTransport()
    with served(create_app(stack.settings)) as url, Client(url, transport=transport) as client:
        states = client.extract(model.id, layers=[1], texts=TEXTS, progress=False)
    assert states.shape == (len(TEXTS), 1, 16)
    job_paths = [path for path in transport.paths if path.startswith("/v1/jobs/")]
    assert len(job_paths) == 1 and job_paths[0].endswith("/events")


class EventsRefused(httpx.BaseTransport):
    """A proxy in front of the service that answers server-sent events with an error page
    and passes everything else through."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.refused = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            self.refused += 1
            return httpx.Response(502, text="<html>bad gateway</html>")
        answer = self.service.request(
            request.method, request.url.raw_path.decode(), headers=dict(request.headers), content=request.read()
        )
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)


def test_wait_polls_when_the_event_stream_is_refused(stack: Stack) -> None:
    proxy = EventsRefused(stack.client)
    client = Client(transport=proxy)
    job = client.wait(client.ping().id, progress=False)
    assert job.status == "succeeded" and proxy.refused == 1


def test_wait_raises_job_failed_with_the_jobs_error_code(client: Client, model: Model, tmp_path: Path) -> None:
    job = client.upload_adapter(hostile_archive(tmp_path / "evil.tar"), base_model=model.id, name="evil")
    with pytest.raises(JobFailed) as failed:
        client.wait(job.id, progress=False)
    assert failed.value.code == "path_traversal" and failed.value.job.status == "failed"
    assert failed.value.message == client.get_job(job.id).error.message  # type: ignore[union-attr]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_wait_raises_job_failed_for_a_cancelled_job(api: Any) -> None:
    client = Client(http=api)
    job = client.ping()  # no worker here: it stays queued
    client.cancel_job(job.id)
    with pytest.raises(JobFailed) as failed:
        client.wait(job.id, progress=False)
    assert failed.value.job.status == "cancelled" and failed.value.code == "cancelled"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_wait_gives_up_at_its_timeout_and_the_job_goes_on(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.api import jobs as job_routes

    monkeypatch.setattr(job_routes, "EVENT_POLL_S", 60.0)  # a quiet stream says nothing for a minute
    with served(create_app(settings)) as url, Client(url) as client:
        job = client.ping()  # no worker here: it stays queued
        started = time.monotonic()
        with pytest.raises(WaitTimedOut) as timed_out:
            client.wait(job.id, timeout=0.5, progress=False)
        assert time.monotonic() - started < 30  # the client's own timeout ended it, not the stream's next line
        assert timed_out.value.job.status == "queued" and client.get_job(job.id).status == "queued"


@pytest.mark.parametrize(
    ("call", "kind", "status", "code"),
    [
        (lambda client, model: client.get_model("mdl_nope"), NotFound, 404, "not_found"),
        (
            lambda client, model: client.create_extraction(model.id, layers=[99], texts=TEXTS),
            InvalidRequest,
            422,
            "invalid_field",
        ),
        (
            lambda client, model: client.create_extraction(model.id, layers=[], texts=TEXTS),
            InvalidRequest,
            422,
            "validation_error",
        ),
        (
            lambda client, model: client.cancel_job(client.wait(client.ping().id, progress=False).id),
            Conflict,
            409,
            "conflict",
        ),
    ],
    ids=["unknown-id", "layer-out-of-range", "bad-body", "cancel-finished-job"],
)
def test_error_answers_raise_their_kind_with_the_envelopes_code(
    client: Client, model: Model, call: Callable[[Client, Model], Any], kind: type[ApiError], status: int, code: str
) -> None:
    with pytest.raises(kind) as raised:
        call(client, model)
    assert (raised.value.status, raised.value.code) == (status, code)
    assert raised.value.message


def test_a_service_without_workers_is_unavailable_naming_what_is_missing(api: Any) -> None:
    with pytest.raises(Unavailable) as raised:
        Client(http=api).ready()
    assert raised.value.code == "not_ready" and raised.value.details["missing"] == ["worker"]


def test_no_service_at_the_url_raises_unreachable() -> None:
    with pytest.raises(Unreachable), Client("http://127.0.0.1:1", timeout=2) as client:
        client.health()


def test_train_returns_the_finished_run_with_one_best_probe_per_run(trained: ProbeRun) -> None:
    assert trained.status == "succeeded"
    assert sorted((probe.layer, probe.method) for probe in trained.probes) == [
        (1, "logistic"),
        (1, "mass_mean"),
        (2, "logistic"),
        (2, "mass_mean"),
    ]
    assert [probe.id for probe in trained.probes if probe.is_best] == [trained.best_probe_id]


def test_a_probes_report_gives_its_held_out_metrics_and_html(client: Client, trained: ProbeRun) -> None:
    probe = trained.probes[0]
    report = client.probe_report(probe.id)
    assert report.probe.id == probe.id and report.report.n == 12 and report.baseline is None  # 20% of 60 statements
    assert report.uncalibrated is None  # not recalibrated
    assert report.report.metrics["auroc"].value == pytest.approx(client.get_probe(probe.id).metrics["auroc"].value)
    assert report.report.metrics["ece"].estimator is not None
    assert list(report.baselines) == ["p_true"] and report.baselines["p_true"].n == 12
    versus = report.versus_baselines["p_true"]["auroc"]
    probe_auroc, asked_auroc = report.report.metrics["auroc"].value, report.baselines["p_true"].metrics["auroc"].value
    assert probe_auroc is not None and asked_auroc is not None
    assert versus.better == "higher" and versus.value == pytest.approx(probe_auroc - asked_auroc)
    assert 'id="metrics"' in client.probe_report_html(probe.id)


def test_a_probes_exported_weights_applied_with_numpy_score_texts_as_the_service_does(
    client: Client, trained: ProbeRun, tmp_path: Path
) -> None:
    from safetensors import safe_open
    from safetensors.numpy import load

    probe = next(probe for probe in trained.probes if probe.method == "logistic")
    content = client.probe_weights(probe.id)
    (tmp_path / "probe.safetensors").write_bytes(content)
    with safe_open(tmp_path / "probe.safetensors", framework="np") as exported:
        card = json.loads(exported.metadata()["card"])
    assert card == client.probe_card(probe.id) and card["recalibration"] is None
    arrays = load(content)
    h = client.extract(trained.model_id, [probe.layer], TEXTS, progress=False)[:, 0].astype(np.float64)
    logit = (((h - arrays["mean"]) / arrays["scale"]) * arrays["coef"]).sum(axis=1) + arrays["intercept"]
    np.testing.assert_allclose(1 / (1 + np.exp(-logit)), client.score(probe.id, TEXTS).confidences, rtol=0, atol=1e-6)


def test_score_gives_a_confidence_per_text(client: Client, trained: ProbeRun) -> None:
    score = client.score(trained.probes[0].id, TEXTS)
    assert score.layer == trained.probes[0].layer and len(score.confidences) == len(TEXTS)
    assert all(0 <= confidence <= 1 for confidence in score.confidences)


def test_finetune_returns_the_finished_finetune_with_the_adapter_it_registered(
    client: Client, finetuned: Finetune
) -> None:
    assert finetuned.status == "succeeded" and finetuned.adapter_id is not None
    assert finetuned.settings["training"]["steps"] == 4 and finetuned.summary is not None
    assert finetuned.best_validation_loss is not None and finetuned.final_validation_loss is not None
    assert finetuned.best_validation_loss <= finetuned.final_validation_loss
    adapter = client.get_adapter(finetuned.adapter_id)
    assert (adapter.source_kind, adapter.source, adapter.name) == ("finetune", finetuned.id, "numbers-sft")
    assert (adapter.r, adapter.lora_alpha, sorted(adapter.target_modules)) == (4, 8, ["q_proj", "v_proj"])
    assert client.get_finetune(finetuned.id) == finetuned
    assert finetuned.id in [listed.id for listed in client.list_finetunes(base_model=finetuned.base_model_id).items]


def test_a_finetunes_history_has_a_point_per_step_ending_on_its_final_validation_loss(
    client: Client, finetuned: Finetune
) -> None:
    history = client.finetune_history(finetuned.id)
    assert history.finetune_id == finetuned.id
    assert [point.step for point in history.points] == [1, 2, 3, 4]
    assert history.points[-1].validation_loss == finetuned.final_validation_loss
    assert history.points[-1].loss == finetuned.final_loss
    assert all(point.tokens > 0 and point.learning_rate >= 0 for point in history.points)


def test_a_finetunes_loss_curve_comes_as_svg_png_and_a_report_page(client: Client, finetuned: Finetune) -> None:
    assert "validation-loss" in client.finetune_loss_svg(finetuned.id)
    assert client.finetune_loss_png(finetuned.id).startswith(b"\x89PNG")
    assert 'id="loss-curve"' in client.finetune_report_html(finetuned.id)


def test_finetune_raises_job_failed_when_no_example_fits_in_max_length(
    client: Client, model: Model, tmp_path: Path
) -> None:
    dataset = client.upload_dataset(write_jsonl(tmp_path / "numbers.jsonl", questions()))
    with pytest.raises(JobFailed) as failed:
        client.finetune(model.id, dataset.id, "too-short", max_length=2, progress=False)
    assert failed.value.code == "no_examples" and "max_length" in failed.value.message
    assert client.list_finetunes(base_model=model.id).items[0].status == "failed"


def test_a_finetune_setting_given_both_as_a_keyword_and_in_its_group_is_refused_before_sending() -> None:
    with Client("http://127.0.0.1:1") as client, pytest.raises(TypeError, match="steps is given twice"):
        client.create_finetune("mdl_x", "dst_x", "x", steps=4, training={"steps": 5})


@pytest.mark.parametrize("module", ["confprobe_client", "confprobe_client.cli"], ids=["client", "command line"])
def test_importing_the_client_imports_neither_torch_nor_the_service(module: str) -> None:
    probe = (
        f"import sys\nimport {module}\n"
        + "print(sorted({name.split('.')[0] for name in sys.modules} & {'torch', 'app', 'workers', 'numpy'}))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_deleting_a_dataset_a_queued_job_reads_raises_conflict_naming_the_job_unless_forced(
    api: Any, tiny_llama: Path, tmp_path: Path
) -> None:
    client = Client(http=api)
    model = client.register_model(str(tiny_llama), name="tiny")
    dataset = client.upload_dataset(write_jsonl(tmp_path / "sums.jsonl", statements()))
    extraction = client.create_extraction(model.id, layers=[1], dataset=dataset.id)
    with pytest.raises(Conflict) as raised:
        client.delete_dataset(dataset.id)
    assert raised.value.details["used_by"] == [extraction.job_id]
    client.delete_dataset(dataset.id, force=True)
    with pytest.raises(NotFound):
        client.get_dataset(dataset.id)
    assert client.get_job(extraction.job_id).status == "cancelled"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("method", "resource"),
    [
        ("delete_model", "model"),
        ("delete_dataset", "dataset"),
        ("delete_extraction", "extraction"),
        ("delete_probe", "probe"),
        ("delete_comparison", "comparison"),
        ("delete_transfer", "transfer"),
    ],
)
def test_each_delete_method_asks_for_its_own_resource(api: Any, method: str, resource: str) -> None:
    with pytest.raises(NotFound) as raised:
        getattr(Client(http=api), method)("x_nope", force=True)
    assert raised.value.details == {"resource": resource, "id": "x_nope"}
