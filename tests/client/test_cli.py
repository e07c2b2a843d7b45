"""The `confprobe` API commands against the real service and a real worker: JSON that is
the API's, aligned tables with the ids, and exit codes that tell failures apart."""

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from confprobe_client import Client, Dataset, Finetune, Model, cli
from tests.client.test_client import QUICK_FINETUNE, TEXTS, hostile_archive, questions, statements, write_jsonl
from tests.conftest import Stack

Confprobe = Callable[..., Result]


@pytest.fixture
def confprobe(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Confprobe:
    """Runs `confprobe ARGS…` in this process, talking to the stack's gateway."""
    monkeypatch.setattr(cli, "make_client", lambda url: Client(http=stack.client))

    def run(*args: str) -> Result:
        return CliRunner().invoke(cli.main, list(args))

    return run


@pytest.fixture(scope="module")
def model(stack: Stack, tiny_llama_template: Path) -> Model:
    client = Client(http=stack.client)
    model = client.register_model(str(tiny_llama_template), name="tiny")
    client.wait(model.check_job_id or "", progress=False)
    return model


@pytest.fixture(scope="module")
def dataset(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return Client(http=stack.client).upload_dataset(
        write_jsonl(tmp_path_factory.mktemp("rows") / "sums.jsonl", statements())
    )


@pytest.fixture(scope="module")
def numbers(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return Client(http=stack.client).upload_dataset(
        write_jsonl(tmp_path_factory.mktemp("rows") / "numbers.jsonl", questions())
    )


@pytest.fixture(scope="module")
def finetuned(stack: Stack, model: Model, numbers: Dataset) -> Finetune:
    return Client(http=stack.client).finetune(model.id, numbers.id, "numbers-sft", **QUICK_FINETUNE, progress=False)


@pytest.fixture
def texts_file(tmp_path: Path) -> Path:
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


def test_models_add_waits_for_the_check_and_prints_the_model_as_the_api_shows_it(
    confprobe: Confprobe, stack: Stack, tiny_llama: Path
) -> None:
    result = confprobe("--json", "models", "add", str(tiny_llama), "--name", "tiny-cli")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["status"] == "ready"
    assert printed == stack.client.get(f"/v1/models/{printed['id']}").json()


def test_models_ls_prints_an_aligned_table_with_the_ids(confprobe: Confprobe, model: Model) -> None:
    result = confprobe("models", "ls")
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split()[:3] == ["ID", "NAME", "ARCHITECTURE"]
    row = next(row for row in rows if row.startswith(model.id))
    assert row.index(model.architecture) == header.index("ARCHITECTURE")


def test_datasets_ls_as_json_is_the_apis_list(confprobe: Confprobe, stack: Stack, dataset: Dataset) -> None:
    result = confprobe("--json", "datasets", "ls")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == stack.client.get("/v1/datasets").json()["items"]


def test_datasets_add_uploads_the_file_under_its_name(confprobe: Confprobe, tmp_path: Path) -> None:
    result = confprobe(
        "--json", "datasets", "add", str(write_jsonl(tmp_path / "rows.jsonl", statements(10))), "--name", "ten sums"
    )
    assert result.exit_code == 0, result.output
    assert {key: json.loads(result.stdout)[key] for key in ("name", "rows", "kind")} == {
        "name": "ten sums",
        "rows": 10,
        "kind": "statements",
    }


def test_extract_saves_the_states_it_extracted_to_out(
    confprobe: Confprobe, stack: Stack, model: Model, texts_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "states.npy"
    result = confprobe(
        "--json", "extract", "--model", model.id, "--layers", "0,-1", "--texts-file", str(texts_file), "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    extraction = json.loads(result.stdout)
    assert extraction["status"] == "succeeded" and extraction["shape"] == [len(TEXTS), 2, 16]
    np.testing.assert_array_equal(np.load(out), Client(http=stack.client).download_hidden_states(extraction["id"]))


def test_probes_train_prints_each_probe_with_the_best_starred(
    confprobe: Confprobe, model: Model, dataset: Dataset
) -> None:
    result = confprobe(
        "probes",
        "train",
        "--model",
        model.id,
        "--dataset",
        dataset.id,
        "--layers",
        "1,2",
        "--method",
        "logistic,mass_mean",
    )
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["ID", "LAYER", "METHOD", "BEST", "AUROC", "ECE", "BRIER"]
    assert len(rows) == 4 and sum(" * " in row for row in rows) == 1


def test_probes_report_writes_the_html_and_opens_it_on_request(
    confprobe: Confprobe, stack: Stack, model: Model, dataset: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []
    monkeypatch.setattr("webbrowser.open", opened.append)
    probe = Client(http=stack.client).train(model.id, dataset.id, layers=[2], progress=False).probes[0]
    out = tmp_path / "report.html"
    result = confprobe("probes", "report", probe.id, "--out", str(out), "--open")
    assert result.exit_code == 0, result.output
    assert 'id="metrics"' in out.read_text() and opened == [out.resolve().as_uri()]
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["METRIC", "VALUE", "95%", "INTERVAL", "METHOD"]
    methods = {row.split()[0]: row.split()[-1] for row in rows if row.strip() and not row.startswith("report:")}
    assert (methods["auroc"], methods["aurc"], methods["mce"], methods["smooth_ece"]) == ("percentile",) * 2 + (
        "basic",
        "-",
    )


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_probes_evaluate_scores_a_probe_on_another_dataset_and_evaluations_report_writes_its_page(
    confprobe: Confprobe, stack: Stack, model: Model, dataset: Dataset, numbers: Dataset, tmp_path: Path
) -> None:
    client = Client(http=stack.client)
    probe = client.train(model.id, dataset.id, layers=[2], progress=False).probes[0]
    result = confprobe("--json", "probes", "evaluate", probe.id, "--dataset", numbers.id, "--base")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown == client.get_evaluation(shown["id"]).model_dump(mode="json")
    assert shown["status"] == "succeeded" and shown["dataset_id"] == numbers.id and shown["adapter_id"] is None
    listed = confprobe("probes", "evaluations", probe.id)
    assert listed.exit_code == 0 and shown["id"] in listed.stdout and "AUROC" in listed.stdout.splitlines()[0]
    out = tmp_path / "evaluation.html"
    report = confprobe("evaluations", "report", shown["id"], "--out", str(out))
    assert report.exit_code == 0, report.output
    assert 'id="metrics"' in out.read_text() and report.stdout.splitlines()[0].split() == [
        "METRIC",
        "VALUE",
        "95%",
        "INTERVAL",
    ]
    both = confprobe("probes", "evaluate", probe.id, "--dataset", numbers.id, "--base", "--adapter", "adp_x")
    assert both.exit_code == 2 and "not both" in both.output


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_transfer_prints_the_auroc_matrix_and_writes_its_page(
    confprobe: Confprobe, stack: Stack, model: Model, dataset: Dataset, tmp_path: Path
) -> None:
    out = tmp_path / "transfer.html"
    result = confprobe(
        "transfer",
        "--model",
        model.id,
        "--train",
        dataset.id,
        "--test",
        dataset.id,
        "--layers",
        "1,2",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    header, row = result.stdout.splitlines()
    assert header.startswith("TRAINED ON (LAYER)") and "(test)" in header
    transfer = Client(http=stack.client).list_transfers(model=model.id).items[-1]
    cell = Client(http=stack.client).get_transfer(transfer.id).matrix.cells[0][0]  # type: ignore[union-attr]
    assert f"{cell.metrics['auroc'].value:.3f}" in row
    assert 'id="heatmap"' in out.read_text()
    shown = confprobe("--json", "transfers", "show", transfer.id)
    assert json.loads(shown.stdout)["matrix"]["cells"][0][0]["n"] == cell.n


def test_probes_export_writes_the_weights_and_the_card_and_prints_the_card(
    confprobe: Confprobe, stack: Stack, model: Model, dataset: Dataset, tmp_path: Path
) -> None:
    from safetensors import safe_open

    client = Client(http=stack.client)
    probe = client.train(model.id, dataset.id, layers=[2], recalibration="temperature", progress=False).probes[0]
    weights, card = tmp_path / "probe.safetensors", tmp_path / "card.json"
    result = confprobe("--json", "probes", "export", probe.id, "-o", str(weights), "--card", str(card))
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == client.probe_card(probe.id) | {"weights": str(weights)}
    assert json.loads(card.read_text()) == client.probe_card(probe.id)
    with safe_open(weights, framework="np") as exported:
        assert json.loads(exported.metadata()["card"]) == client.probe_card(probe.id)
        assert set(exported.keys()) == {"mean", "scale", "coef", "intercept", "temperature"}
    table = confprobe("probes", "export", probe.id, "-o", str(weights))
    assert table.exit_code == 0, table.output
    assert table.stdout.splitlines()[0].split() == ["FIELD", "VALUE"] and f"weights: {weights}" in table.stdout
    assert confprobe("probes", "export", "prb_nope", "-o", str(tmp_path / "nope.safetensors")).exit_code == 3


def test_no_wait_answers_with_the_queued_run_and_jobs_watch_follows_it(
    confprobe: Confprobe, model: Model, dataset: Dataset
) -> None:
    queued = confprobe(
        "--json", "probes", "train", "--model", model.id, "--dataset", dataset.id, "--layers", "1", "--no-wait"
    )
    assert queued.exit_code == 0, queued.output
    run = json.loads(queued.stdout)
    watched = confprobe("--json", "jobs", "watch", run["job_id"])
    assert watched.exit_code == 0, watched.output
    assert json.loads(watched.stdout)["status"] == "succeeded"


def test_finetune_follows_each_steps_loss_and_prints_the_finished_finetune_as_the_api_shows_it(
    confprobe: Confprobe, stack: Stack, model: Model, numbers: Dataset
) -> None:
    result = confprobe(
        "--json",
        "finetune",
        "--model",
        model.id,
        "--dataset",
        numbers.id,
        "--name",
        "cli-sft",
        "--steps",
        "4",
        "--batch-size",
        "4",
        "-r",
        "4",
        "--target-module",
        "q_proj",
        "--target-module",
        "v_proj",
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == stack.client.get(f"/v1/finetunes/{printed['id']}").json()
    assert printed["status"] == "succeeded" and printed["adapter_id"].startswith("adp_")
    assert (printed["settings"]["lora"]["r"], printed["settings"]["lora"]["target_modules"]) == (
        4,
        ["q_proj", "v_proj"],
    )
    assert "finetune: " in result.stderr and " loss " in result.stderr


def test_finetunes_ls_shows_each_finetune_with_its_adapter_and_losses(
    confprobe: Confprobe, finetuned: Finetune
) -> None:
    result = confprobe("finetunes", "ls", "--base-model", finetuned.base_model_id)
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert re.split(r"\s{2,}", header) == ["ID", "NAME", "STATUS", "ADAPTER", "LOSS", "VAL LOSS", "BEST VAL"]
    row = next(row for row in rows if row.startswith(finetuned.id))
    assert row.index(finetuned.adapter_id or "") == header.index("ADAPTER")
    assert row.rstrip().endswith(f"{finetuned.best_validation_loss:.3f}")


def test_finetunes_history_as_json_is_the_apis_points(confprobe: Confprobe, stack: Stack, finetuned: Finetune) -> None:
    result = confprobe("--json", "finetunes", "history", finetuned.id)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == stack.client.get(f"/v1/finetunes/{finetuned.id}/history").json()["points"]


def test_finetunes_report_writes_the_loss_curves_page(
    confprobe: Confprobe, finetuned: Finetune, tmp_path: Path
) -> None:
    out = tmp_path / "finetune.html"
    result = confprobe("finetunes", "report", finetuned.id, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert 'id="loss-curve"' in out.read_text() and result.stdout.splitlines()[-1] == f"report: {out}"


def test_jobs_ls_as_json_is_the_apis_list(confprobe: Confprobe, stack: Stack, model: Model) -> None:
    result = confprobe("--json", "jobs", "ls", "--kind", "model_check")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == stack.client.get("/v1/jobs", params={"kind": "model_check"}).json()["items"]


# --- exit codes -------------------------------------------------------------------------------


def test_an_unknown_id_exits_3(confprobe: Confprobe) -> None:
    result = confprobe("adapters", "rm", "adp_nope")
    assert result.exit_code == 3 and "adp_nope" in result.stderr


def test_an_invalid_request_exits_4_with_the_error_envelope_under_json(
    confprobe: Confprobe, model: Model, texts_file: Path
) -> None:
    result = confprobe("--json", "extract", "--model", model.id, "--layers", "99", "--texts-file", str(texts_file))
    assert result.exit_code == 4
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "invalid_field" and error["details"]["field"] == "layers"


def test_a_finetune_refused_by_the_service_exits_4_naming_the_setting(
    confprobe: Confprobe, model: Model, numbers: Dataset
) -> None:
    result = confprobe("--json", "finetune", "--model", model.id, "--dataset", numbers.id, "--name", "x", "--rank", "0")
    assert result.exit_code == 4, result.output
    error = json.loads(result.stderr)["error"]
    assert (error.get("details", {}).get("field") or error["details"]["fields"][0]["field"]) == "lora.r"


def test_cancelling_a_finished_job_exits_4(confprobe: Confprobe, model: Model) -> None:
    assert confprobe("jobs", "cancel", model.check_job_id).exit_code == 4


def test_a_failed_job_exits_5_naming_its_error(confprobe: Confprobe, model: Model, tmp_path: Path) -> None:
    result = confprobe(
        "--json",
        "adapters",
        "upload",
        str(hostile_archive(tmp_path / "evil.tar")),
        "--base-model",
        model.id,
        "--name",
        "evil",
    )
    assert result.exit_code == 5
    error = json.loads(result.stderr.splitlines()[-1])["error"]
    assert error["code"] == "path_traversal" and error["details"]["job_id"].startswith("job_")


@pytest.mark.parametrize(
    ("args", "env"),
    [(["--url", "http://127.0.0.1:1"], {}), ([], {"CONFPROBE_URL": "http://127.0.0.1:1"})],
    ids=["option", "environment"],
)
def test_an_unreachable_service_exits_6(args: list[str], env: dict[str, Any]) -> None:
    result = CliRunner().invoke(cli.main, [*args, "jobs", "ls"], env=env)
    assert result.exit_code == 6 and "127.0.0.1:1" in result.stderr


def test_a_usage_error_exits_2() -> None:
    result = CliRunner().invoke(cli.main, ["extract", "--model", "mdl_x", "--layers", "1"])
    assert result.exit_code == 2 and "--texts-file" in result.stderr


def test_finetune_with_both_steps_and_epochs_is_a_usage_error() -> None:
    args = ["finetune", "--model", "mdl_x", "--dataset", "dst_x", "--name", "x", "--steps", "4", "--epochs", "1"]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 2 and "--steps or --epochs" in result.stderr


def test_experiment_run_follows_the_job_and_lists_what_it_made(
    stack: Any, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    monkeypatch.setattr(cli, "make_client", lambda url: Client(http=stack.client))
    dataset = tmp_path / "statements.jsonl"
    dataset.write_text("\n".join(json.dumps({"text": f"statement number {i}", "label": i % 2}) for i in range(40)))
    uploaded = CliRunner().invoke(cli.main, ["--json", "datasets", "add", str(dataset)])
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "experiment": {"name": "cli-run"},
                "model": {"name": str(tiny_llama)},
                "extraction": {"layers": [1]},
                "probe": {"dataset": json.loads(uploaded.output)["id"]},
            }
        )
    )
    result = CliRunner().invoke(cli.main, ["--json", "experiment", "run", str(config)])
    assert result.exit_code == 0, result.output
    experiment = json.loads(result.output[result.output.index("{") :])
    assert experiment["status"] == "succeeded" and experiment["links"]["report"].endswith("/report.html")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_datasets_rm_exits_4_naming_the_job_that_reads_it_and_deletes_it_with_force(
    api: Any, tiny_llama_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "make_client", lambda url: Client(http=api))
    client = Client(http=api)
    model = client.register_model(str(tiny_llama_template), name="tiny")
    dataset = client.upload_dataset(write_jsonl(tmp_path / "sums.jsonl", statements()))
    extraction = client.create_extraction(model.id, layers=[1], dataset=dataset.id)
    refused = CliRunner().invoke(cli.main, ["--json", "datasets", "rm", dataset.id])
    assert refused.exit_code == 4 and json.loads(refused.stderr)["error"]["details"]["used_by"] == [extraction.job_id]
    deleted = CliRunner().invoke(cli.main, ["datasets", "rm", dataset.id, "--force"])
    assert deleted.exit_code == 0 and deleted.stdout == f"deleted {dataset.id}\n"
    assert api.get(f"/v1/datasets/{dataset.id}").status_code == 404


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("group", ["models", "datasets", "extractions", "probes", "comparisons", "transfers"])
def test_each_rm_command_deletes_through_its_own_route(api: Any, group: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "make_client", lambda url: Client(http=api))
    result = CliRunner().invoke(cli.main, ["--json", group, "rm", "x_nope"])
    assert result.exit_code == 3
    assert json.loads(result.stderr)["error"]["details"] == {"resource": group.removesuffix("s"), "id": "x_nope"}
