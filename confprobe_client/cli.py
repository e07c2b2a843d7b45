"""`confprobe`'s API commands (`models`, `adapters`, `datasets`, `extract`, `probes`, `evaluations`, `transfer`, `transfers`,
`compare`, `finetune`, `finetunes`, `experiment`, `jobs`): a running service used through `Client`, with progress
bars, `--json` and an exit code per kind of failure. Like the rest of the package it never
imports the service's own code or torch, so it works on any machine with the client."""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import click
from pydantic import BaseModel

from confprobe_client.client import Client
from confprobe_client.errors import ConfprobeError
from confprobe_client.exit_codes import (
    EXIT_CODES_HELP,
    error_envelope,
    exit_code_of,
    hint_for,
)
from confprobe_client.formatting import (
    ADAPTER_COLUMNS,
    COMPARISON_COLUMNS,
    DATASET_COLUMNS,
    EVALUATION_COLUMNS,
    EXTRACTION_COLUMNS,
    FINETUNE_COLUMNS,
    JOB_COLUMNS,
    LOSS_POINT_COLUMNS,
    MODEL_COLUMNS,
    PROBE_COLUMNS,
    RUN_COLUMNS,
    Column,
    aligned_table,
    interval,
    metric,
)
from confprobe_client.options import LAYERS, comma_separated, no_wait_option, prompt_format_option
from confprobe_client.types import Job, JobStatus, Transfer


def make_client(url: str | None) -> Client:
    """The API client the commands use (tests replace it with one on an in-process service)."""
    return Client(url) if url else Client()


@dataclass
class ApiContext:
    """What the global options say to every API command."""

    url: str | None
    as_json: bool

    def client(self) -> Client:
        """A client closed when the command ends."""
        return click.get_current_context().with_resource(make_client(self.url))

    def show(self, answer: BaseModel | Sequence[BaseModel], columns: Sequence[Column]) -> None:
        """JSON as the API gives it (`--json`), else an aligned table."""
        items = [answer] if not isinstance(answer, Sequence) else list(answer)
        if self.as_json:
            dumped = [item.model_dump(mode="json") for item in items]
            click.echo(json.dumps(dumped if isinstance(answer, Sequence) else dumped[0], indent=2))
        else:
            click.echo(
                aligned_table(
                    [header for header, _ in columns], [[cell(item) for _, cell in columns] for item in items]
                )
            )


pass_api = click.make_pass_decorator(ApiContext)


def show_deleted(api: ApiContext, resource_id: str) -> None:
    click.echo(json.dumps({"deleted": resource_id}) if api.as_json else f"deleted {resource_id}")


def root_group(description: str) -> click.Group:
    """A `confprobe` group with the global options, which every API command reads through its
    `ApiContext`; `app.cli` makes the full one from it, with the service's own commands."""

    @click.group(help=description)
    @click.option(
        "--url",
        envvar="CONFPROBE_URL",
        default=None,
        help="The service's base URL [default: $CONFPROBE_URL, else http://127.0.0.1:8000].",
    )
    @click.option(
        "--json", "as_json", is_flag=True, help="Print answers as JSON (errors as the API's error envelope, on stderr)."
    )
    @click.pass_context
    def main(ctx: click.Context, url: str | None, as_json: bool) -> None:
        ctx.obj = ApiContext(url=url, as_json=as_json)

    return main


class ApiCommand(click.Command):
    """A command that uses the API: when it fails, a message on stderr and an exit code by
    kind of failure, so scripts can tell them apart."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfprobeError as error:
            api = ctx.find_object(ApiContext)
            if api is not None and api.as_json:
                click.echo(json.dumps(error_envelope(error)), err=True)
            else:
                click.echo(f"error: {error}{hint_for(error)}", err=True)
            ctx.exit(exit_code_of(error))


class ApiGroup(click.Group):
    """Commands that use the API, each an `ApiCommand`."""

    command_class = ApiCommand


main = root_group(f"Use a running Confidence Probing Service through its API.\n\n{EXIT_CODES_HELP}")


@main.group(cls=ApiGroup)
def models() -> None:
    """Base models."""


@models.command("add")
@click.argument("source")
@click.option("--name", help="Display name [default: the last part of SOURCE].")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    help="Weights' dtype on the worker [default: float32].",
)
@click.option("--quantization", type=click.Choice(["8bit", "4bit"]))
@no_wait_option
@pass_api
def add_model(
    api: ApiContext, source: str, name: str | None, dtype: str | None, quantization: str | None, no_wait: bool
) -> None:
    """Register the base model at SOURCE (a folder, a GGUF file, or a Hugging Face id in the
    service's cache; paths as the service sees them) and wait for a worker to check it."""
    client = api.client()
    model = client.register_model(source, name=name, dtype=dtype, quantization=quantization)
    if not no_wait and model.status == "pending" and model.check_job_id:
        client.wait(model.check_job_id)
        model = client.get_model(model.id)
    api.show(model, MODEL_COLUMNS)


@models.command("ls")
@click.option("--limit", type=click.IntRange(1, 200), default=50, show_default=True)
@pass_api
def list_models(api: ApiContext, limit: int) -> None:
    """Registered base models, newest first."""
    api.show(api.client().list_models(limit=limit).items, MODEL_COLUMNS)


@models.command("rm")
@click.argument("model_id")
@click.option(
    "--force",
    is_flag=True,
    help="Delete even while unfinished jobs use it (they are cancelled), with everything made from it.",
)
@pass_api
def remove_model(api: ApiContext, model_id: str, force: bool) -> None:
    """Delete a model's registration and cached hidden states (never its files); refused while
    anything made from it exists, unless --force."""
    api.client().delete_model(model_id, force=force)
    show_deleted(api, model_id)


@main.group(cls=ApiGroup)
def adapters() -> None:
    """LoRA adapters of the base models."""


def show_imported_adapter(api: ApiContext, client: Client, job: Job, no_wait: bool) -> None:
    """The adapter once its import job ends; with --no-wait, the queued job instead."""
    if no_wait:
        api.show(job, JOB_COLUMNS)
        return
    finished = client.wait(job.id)
    api.show(client.get_adapter((finished.result or {})["adapter_id"]), ADAPTER_COLUMNS)


@adapters.command("import")
@click.argument("source")
@click.option("--base-model", required=True, help="Id of the base model it was trained on.")
@click.option("--name", required=True)
@no_wait_option
@pass_api
def import_adapter(api: ApiContext, source: str, base_model: str, name: str, no_wait: bool) -> None:
    """Import the adapter at SOURCE: tinker://…/external_weights/…, a folder or archive under
    the service's ADAPTER_ROOTS, or an allowed https URL."""
    client = api.client()
    show_imported_adapter(api, client, client.import_adapter(source, base_model, name), no_wait)


@adapters.command("upload")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--base-model", required=True, help="Id of the base model it was trained on.")
@click.option("--name", required=True)
@no_wait_option
@pass_api
def upload_adapter(api: ApiContext, file: Path, base_model: str, name: str, no_wait: bool) -> None:
    """Upload FILE, a .tar, .tar.gz or .zip of a PEFT adapter or a Tinker checkpoint."""
    client = api.client()
    show_imported_adapter(api, client, client.upload_adapter(file, base_model, name), no_wait)


@adapters.command("ls")
@click.option("--base-model", help="Only the adapters of this base model.")
@click.option("--limit", type=click.IntRange(1, 200), default=50, show_default=True)
@pass_api
def list_adapters(api: ApiContext, base_model: str | None, limit: int) -> None:
    """Imported adapters, newest first."""
    api.show(api.client().list_adapters(base_model=base_model, limit=limit).items, ADAPTER_COLUMNS)


@adapters.command("rm")
@click.argument("adapter_id")
@click.option("--force", is_flag=True, help="Delete even while unfinished jobs use it.")
@pass_api
def remove_adapter(api: ApiContext, adapter_id: str, force: bool) -> None:
    """Delete an adapter's registration and files."""
    api.client().delete_adapter(adapter_id, force=force)
    show_deleted(api, adapter_id)


@main.group(cls=ApiGroup)
def datasets() -> None:
    """Statements, multiple-choice and chat datasets."""


@datasets.command("add")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="Display name [default: the file name].")
@pass_api
def add_dataset(api: ApiContext, file: Path, name: str | None) -> None:
    """Upload FILE (JSONL or CSV): statements {text, label}, multiple choice {question,
    choices, answer}, or chat {messages} (for fine-tuning only)."""
    api.show(api.client().upload_dataset(file, name=name), DATASET_COLUMNS)


@datasets.command("ls")
@click.option("--limit", type=click.IntRange(1, 200), default=50, show_default=True)
@pass_api
def list_datasets(api: ApiContext, limit: int) -> None:
    """Uploaded datasets, newest first."""
    api.show(api.client().list_datasets(limit=limit).items, DATASET_COLUMNS)


@datasets.command("rm")
@click.argument("dataset_id")
@click.option(
    "--force",
    is_flag=True,
    help="Delete even while unfinished jobs use it (they are cancelled), with everything made from it.",
)
@pass_api
def remove_dataset(api: ApiContext, dataset_id: str, force: bool) -> None:
    """Delete a dataset; refused while extractions, probes… made from it exist, unless --force."""
    api.client().delete_dataset(dataset_id, force=force)
    show_deleted(api, dataset_id)


@main.command(cls=ApiCommand)
@click.option("--model", required=True, help="Id of the base model.")
@click.option("--adapter", help="Id of an adapter of that model.")
@click.option("--layers", type=LAYERS, required=True, help="Comma-separated, e.g. 8,16,-1 (0 = embeddings).")
@click.option("--texts-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="One text per line.")
@click.option("--dataset", help="Id of an uploaded dataset (instead of --texts-file).")
@click.option("--token-position", type=click.Choice(["last", "mean"]), help="[default: last]")
@click.option("--max-length", type=click.IntRange(min=1), help="Truncate texts to this many tokens.")
@prompt_format_option
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write the (texts, layers, hidden) array here as .npy.",
)
@no_wait_option
@pass_api
def extract(
    api: ApiContext,
    model: str,
    adapter: str | None,
    layers: list[int],
    texts_file: Path | None,
    dataset: str | None,
    token_position: str | None,
    max_length: int | None,
    prompt_format: str | None,
    out: Path | None,
    no_wait: bool,
) -> None:
    """Extract hidden states of texts at layers; with --out, save them as .npy."""
    if (texts_file is None) == (dataset is None):
        raise click.UsageError("give exactly one of --texts-file and --dataset")
    if out is not None and no_wait:
        raise click.UsageError("--out needs the states, which --no-wait does not wait for")
    texts = [line for line in texts_file.read_text().splitlines() if line.strip()] if texts_file else None
    client = api.client()
    extraction = client.create_extraction(
        model,
        layers,
        texts=texts,
        dataset=dataset,
        adapter=adapter,
        token_position=token_position,
        max_length=max_length,
        prompt_format=prompt_format,
    )
    if not no_wait:
        client.wait(extraction.job_id)
        extraction = client.get_extraction(extraction.id)
    if out is not None:
        import numpy as np

        np.save(out, client.download_hidden_states(extraction.id))
    api.show(extraction, EXTRACTION_COLUMNS)
    if out is not None and not api.as_json:
        click.echo(f"states: {out}")


@main.group(cls=ApiGroup)
def extractions() -> None:
    """Extracted hidden states."""


@extractions.command("rm")
@click.argument("extraction_id")
@click.option("--force", is_flag=True, help="Delete even while its job is unfinished (it is cancelled).")
@pass_api
def remove_extraction(api: ApiContext, extraction_id: str, force: bool) -> None:
    """Delete an extraction's array (its vectors stay cached with the model)."""
    api.client().delete_extraction(extraction_id, force=force)
    show_deleted(api, extraction_id)


@main.group(cls=ApiGroup)
def probes() -> None:
    """Correctness probes and their calibration reports."""


@probes.command("train")
@click.option("--model", required=True, help="Id of the base model.")
@click.option("--adapter", help="Id of an adapter of that model.")
@click.option("--dataset", required=True, help="Id of a statements or multiple-choice dataset.")
@click.option("--layers", type=LAYERS, required=True, help="Comma-separated; one probe per layer and method.")
@click.option(
    "--method", default="logistic", show_default=True, help="logistic, mass_mean, or both: logistic,mass_mean."
)
@click.option(
    "--recalibration", type=click.Choice(["temperature", "platt", "isotonic"]), help="Fitted on the validation split."
)
@click.option("--seed", type=click.IntRange(min=0), help="Seed of the split [default: 0].")
@prompt_format_option
@no_wait_option
@pass_api
def train_probes(
    api: ApiContext,
    model: str,
    adapter: str | None,
    dataset: str,
    layers: list[int],
    method: str,
    recalibration: str | None,
    seed: int | None,
    prompt_format: str | None,
    no_wait: bool,
) -> None:
    """Train probes and show their held-out metrics; the best on validation is starred."""
    methods = comma_separated(method)
    client = api.client()
    run = client.train_probes(
        model,
        dataset,
        layers,
        method=methods[0] if len(methods) == 1 else methods,
        adapter=adapter,
        seed=seed,
        recalibration=recalibration,
        prompt_format=prompt_format,
    )
    if no_wait:
        api.show(run, RUN_COLUMNS)
        return
    client.wait(run.job_id)
    api.show(client.get_probe_run(run.id).probes, PROBE_COLUMNS)


@probes.command("ls")
@click.option("--model", help="Only the probes of this model.")
@click.option("--dataset", help="Only the probes trained on this dataset.")
@click.option("--best", is_flag=True, help="Only the best probe of each run.")
@click.option("--limit", type=click.IntRange(1, 200), default=50, show_default=True)
@pass_api
def list_probes(api: ApiContext, model: str | None, dataset: str | None, best: bool, limit: int) -> None:
    """Trained probes with their held-out metrics."""
    api.show(
        api.client().list_probes(model=model, dataset=dataset, best=True if best else None, limit=limit).items,
        PROBE_COLUMNS,
    )


@probes.command("rm")
@click.argument("probe_id")
@click.option("--force", is_flag=True, help="Delete even while unfinished jobs use it (they are cancelled).")
@pass_api
def remove_probe(api: ApiContext, probe_id: str, force: bool) -> None:
    """Delete a probe and its evaluations (and its run, if it was the run's last probe)."""
    api.client().delete_probe(probe_id, force=force)
    show_deleted(api, probe_id)


@probes.command("report")
@click.argument("probe_id")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Where to write the HTML report [default: PROBE_ID.html].",
)
@click.option("--open", "open_in_browser", is_flag=True, help="Open the HTML report in a web browser.")
@pass_api
def probe_report(api: ApiContext, probe_id: str, out: Path | None, open_in_browser: bool) -> None:
    """Write a probe's calibration report (reliability diagram, histogram, metrics) as HTML
    and show its held-out metrics."""
    client = api.client()
    report = client.probe_report(probe_id)
    path = out or Path(f"{probe_id}.html")
    path.write_text(client.probe_report_html(probe_id), encoding="utf-8")
    if api.as_json:
        click.echo(json.dumps(report.model_dump(mode="json") | {"html": str(path)}, indent=2))
    else:
        rows = [
            [name, metric(report.probe.metrics, name), interval(estimate.interval), estimate.interval_method or "-"]
            for name, estimate in report.probe.metrics.items()
        ]
        click.echo(aligned_table(["METRIC", "VALUE", "95% INTERVAL", "METHOD"], rows))
        click.echo(f"report: {path}")
    if open_in_browser:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())


@probes.command("evaluate")
@click.argument("probe_id")
@click.option("--dataset", required=True, help="Id of a statements or multiple-choice dataset to score the probe on.")
@click.option("--adapter", help="Score the states of this adapter of the probe's model [default: the probe's own].")
@click.option("--base", is_flag=True, help="Score the base model's states, whatever the probe was trained on.")
@prompt_format_option
@no_wait_option
@pass_api
def evaluate_probe(
    api: ApiContext,
    probe_id: str,
    dataset: str,
    adapter: str | None,
    base: bool,
    prompt_format: str | None,
    no_wait: bool,
) -> None:
    """Score a trained probe on another labelled dataset (or another variant of its model)
    and show its metrics there."""
    if base and adapter:
        raise click.UsageError("give --adapter or --base, not both")
    client = api.client()
    evaluation = client.create_evaluation(probe_id, dataset, adapter=adapter, base=base, prompt_format=prompt_format)
    if not no_wait:
        client.wait(evaluation.job_id)
        evaluation = client.get_evaluation(evaluation.id)
    api.show(evaluation, EVALUATION_COLUMNS)


@probes.command("evaluations")
@click.argument("probe_id")
@click.option("--limit", type=click.IntRange(1, 200), default=50, show_default=True)
@pass_api
def list_evaluations(api: ApiContext, probe_id: str, limit: int) -> None:
    """A probe's evaluations on other datasets, with their metrics."""
    api.show(api.client().list_evaluations(probe_id, limit=limit).items, EVALUATION_COLUMNS)


@main.group(cls=ApiGroup)
def evaluations() -> None:
    """Probes scored on other datasets: their calibration reports."""


@evaluations.command("show")
@click.argument("evaluation_id")
@pass_api
def show_evaluation(api: ApiContext, evaluation_id: str) -> None:
    """One evaluation with its metrics."""
    api.show(api.client().get_evaluation(evaluation_id), EVALUATION_COLUMNS)


@evaluations.command("report")
@click.argument("evaluation_id")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Where to write the HTML report [default: EVALUATION_ID.html].",
)
@pass_api
def evaluation_report(api: ApiContext, evaluation_id: str, out: Path | None) -> None:
    """Write an evaluation's calibration report as HTML and show its metrics."""
    client = api.client()
    report = client.evaluation_report(evaluation_id)
    path = out or Path(f"{evaluation_id}.html")
    path.write_text(client.evaluation_report_html(evaluation_id), encoding="utf-8")
    if api.as_json:
        click.echo(json.dumps(report.model_dump(mode="json") | {"html": str(path)}, indent=2))
        return
    metrics = report.evaluation.metrics or {}
    rows = [[name, metric(metrics, name), interval(estimate.interval)] for name, estimate in metrics.items()]
    click.echo(aligned_table(["METRIC", "VALUE", "95% INTERVAL"], rows))
    click.echo(f"report: {path}")


def show_transfer_matrix(api: ApiContext, transfer: Transfer) -> None:
    """The AUROC matrix (value and interval per cell) as an aligned table, or the transfer as JSON."""
    if api.as_json or transfer.matrix is None:
        click.echo(json.dumps(transfer.model_dump(mode="json"), indent=2) if api.as_json else transfer.status)
        return
    matrix = transfer.matrix
    headers = ["TRAINED ON (LAYER)", *(f"{column.label} ({column.rows})" for column in matrix.columns)]
    rows = [
        [
            f"{row.label} ({row.layer})",
            *(f"{metric(cell.metrics, 'auroc')} {interval(cell.metrics['auroc'].interval)}" for cell in cells),
        ]
        for row, cells in zip(matrix.rows, matrix.cells, strict=True)
    ]
    click.echo(aligned_table(headers, rows))


@main.command(cls=ApiCommand)
@click.option("--model", required=True, help="Id of the base model.")
@click.option("--adapter", help="Id of an adapter of that model, whose states and labels are used.")
@click.option("--train", "train_ids", required=True, help="Comma-separated dataset ids to train a probe on each.")
@click.option("--test", "test_ids", required=True, help="Comma-separated dataset ids to score every probe on.")
@click.option(
    "--layers", type=LAYERS, required=True, help="Comma-separated; each probe's layer is chosen on validation."
)
@click.option("--union", is_flag=True, help="One probe on the union of the training sets.")
@click.option("--method", type=click.Choice(["logistic", "mass_mean"]), help="[default: logistic]")
@click.option("--seed", type=click.IntRange(min=0), help="Seed of the splits and the bootstrap [default: 0].")
@click.option(
    "--out", type=click.Path(dir_okay=False, writable=True, path_type=Path), help="Also write the HTML report here."
)
@prompt_format_option
@no_wait_option
@pass_api
def transfer(
    api: ApiContext,
    model: str,
    adapter: str | None,
    train_ids: str,
    test_ids: str,
    layers: list[int],
    union: bool,
    method: str | None,
    seed: int | None,
    out: Path | None,
    prompt_format: str | None,
    no_wait: bool,
) -> None:
    """A transfer matrix: does a probe trained on one dataset work on another? Prints the
    AUROC of every training set's probe on every test set, with intervals."""
    client = api.client()
    created = client.create_transfer(
        model,
        comma_separated(train_ids),
        comma_separated(test_ids),
        layers,
        method=method,
        adapter=adapter,
        union=union or None,
        prompt_format=prompt_format,
        seed=seed,
    )
    if no_wait:
        click.echo(json.dumps(created.model_dump(mode="json"), indent=2) if api.as_json else created.id)
        return
    client.wait(created.job_id)
    if out is not None:
        out.write_text(client.transfer_report_html(created.id), encoding="utf-8")
    show_transfer_matrix(api, client.get_transfer(created.id))


@main.group(cls=ApiGroup)
def transfers() -> None:
    """Transfer matrices: their cells and report pages."""


@transfers.command("show")
@click.argument("transfer_id")
@pass_api
def show_transfer(api: ApiContext, transfer_id: str) -> None:
    """A transfer matrix's AUROC cells with intervals."""
    show_transfer_matrix(api, api.client().get_transfer(transfer_id))


@transfers.command("report")
@click.argument("transfer_id")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Where to write the HTML report [default: TRANSFER_ID.html].",
)
@pass_api
def transfer_report(api: ApiContext, transfer_id: str, out: Path | None) -> None:
    """Write a transfer matrix's page (heatmap; AUROC, accuracy and ECE tables) as HTML."""
    path = out or Path(f"{transfer_id}.html")
    path.write_text(api.client().transfer_report_html(transfer_id), encoding="utf-8")
    click.echo(str(path))


@transfers.command("rm")
@click.argument("transfer_id")
@click.option("--force", is_flag=True, help="Delete even while its job is unfinished (it is cancelled).")
@pass_api
def remove_transfer(api: ApiContext, transfer_id: str, force: bool) -> None:
    """Delete a transfer matrix and its report."""
    api.client().delete_transfer(transfer_id, force=force)
    show_deleted(api, transfer_id)


@probes.command("export")
@click.argument("probe_id")
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Where to write the weights (safetensors, the card in its metadata) [default: PROBE_ID.safetensors].",
)
@click.option(
    "--card",
    "card_out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Also write the card here, as JSON.",
)
@pass_api
def export_probe(api: ApiContext, probe_id: str, out: Path | None, card_out: Path | None) -> None:
    """Write a probe's weights as a safetensors file of plain arrays, to apply with numpy as
    its card says, and show the card."""
    client = api.client()
    path = out or Path(f"{probe_id}.safetensors")
    path.write_bytes(client.probe_weights(probe_id))
    card = client.probe_card(probe_id)
    if card_out is not None:
        card_out.write_text(json.dumps(card, indent=2), encoding="utf-8")
    if api.as_json:
        click.echo(json.dumps(card | {"weights": str(path)}, indent=2))
        return
    adapter = card["adapter"]
    rows = [
        ["probe", card["probe_id"]],
        ["method", card["method"]],
        ["recalibration", card["recalibration"] or "-"],
        ["model", f"{card['model']['id']} ({card['model']['source']})"],
        ["adapter", adapter["id"] if adapter else "-"],
        ["layer", str(card["layer"])],
        ["token position", card["token_position"]],
        ["prompt format", card["prompt_format"]],
        ["dataset", f"{card['dataset']['id']} ({card['dataset']['name']})"],
        ["formula", card["formula"]],
    ]
    click.echo(aligned_table(["FIELD", "VALUE"], rows))
    click.echo(f"weights: {path}")
    if card_out is not None:
        click.echo(f"card: {card_out}")


@main.command(cls=ApiCommand)
@click.option("--model", required=True, help="Id of the base model.")
@click.option("--adapters", "adapter_ids", required=True, help="Comma-separated adapter ids of that model.")
@click.option("--dataset", required=True)
@click.option(
    "--layers", type=LAYERS, required=True, help="Comma-separated; the best on the base's validation split is reported."
)
@click.option("--method", type=click.Choice(["logistic", "mass_mean"]), help="[default: logistic]")
@prompt_format_option
@no_wait_option
@pass_api
def compare(
    api: ApiContext,
    model: str,
    adapter_ids: str,
    dataset: str,
    layers: list[int],
    method: str | None,
    prompt_format: str | None,
    no_wait: bool,
) -> None:
    """Compare a base model with its adapters on the same texts, split and layer."""
    client = api.client()
    comparison = client.compare(
        model, comma_separated(adapter_ids), dataset, layers, method=method, prompt_format=prompt_format
    )
    if not no_wait:
        client.wait(comparison.job_id)
        comparison = client.get_comparison(comparison.id)
    if api.as_json or comparison.report is None:
        api.show(comparison, COMPARISON_COLUMNS)
        return
    rows = [
        [variant.label, *(metric(variant.report.metrics, name) for name in ("auroc", "ece", "brier"))]
        for variant in comparison.report.variants
    ]
    click.echo(aligned_table(["MODEL", "AUROC", "ECE", "BRIER"], rows))
    click.echo(f"comparison {comparison.id}, layer {comparison.report.layer}")


@main.group(cls=ApiGroup)
def comparisons() -> None:
    """Comparisons of a base model and its adapters."""


@comparisons.command("rm")
@click.argument("comparison_id")
@click.option("--force", is_flag=True, help="Delete even while its job is unfinished (it is cancelled).")
@pass_api
def remove_comparison(api: ApiContext, comparison_id: str, force: bool) -> None:
    """Delete a comparison and its report."""
    api.client().delete_comparison(comparison_id, force=force)
    show_deleted(api, comparison_id)


@main.command(cls=ApiCommand)
@click.option("--model", required=True, help="Id of the base model.")
@click.option("--dataset", required=True, help="Id of a statements, multiple-choice or chat dataset.")
@click.option("--name", required=True, help="Name of the adapter it registers.")
@click.option("--steps", type=int, help="Optimizer steps (training.steps) [default: one epoch].")
@click.option("--epochs", type=float, help="Passes over the training examples (training.epochs), instead of --steps.")
@click.option(
    "--learning-rate", type=float, help="AdamW's peak learning rate (training.learning_rate) [default: 1e-4]."
)
@click.option(
    "--batch-size", type=int, help="Examples per forward and backward pass (training.batch_size) [default: 8]."
)
@click.option(
    "--max-length",
    type=int,
    help="Most tokens of one example; longer ones are left out (training.max_length) [default: 512].",
)
@click.option("--seed", type=int, help="Seed of the initialisation and data order (training.seed) [default: 0].")
@click.option(
    "--validation-fraction",
    type=float,
    help="Examples held out for the validation loss (training.validation_fraction) [default: 0.1].",
)
@click.option("--rank", "-r", "r", type=int, help="LoRA rank (lora.r) [default: 32].")
@click.option("--lora-alpha", type=float, help="The update is scaled by alpha / rank (lora.lora_alpha) [default: 32].")
@click.option(
    "--target-module",
    "target_modules",
    multiple=True,
    metavar="NAME",
    help="A linear layer of the blocks to adapt, e.g. q_proj; repeat for more (lora.target_modules) "
    "[default: every one].",
)
@click.option(
    "--prompt-format",
    metavar="FORMAT",
    help="How each example's prompt is written: raw, chat (the model's chat template), or a template naming "
    "{text} ({question} and {choices} for multiple choice) [default: raw; chat for a chat dataset].",
)
@click.option(
    "--backend",
    type=click.Choice(["local", "tinker"]),
    help="Where it trains: local (a worker's own device) or tinker (the service's Tinker account) [default: local].",
)
@no_wait_option
@pass_api
def finetune(
    api: ApiContext,
    model: str,
    dataset: str,
    name: str,
    steps: int | None,
    epochs: float | None,
    learning_rate: float | None,
    batch_size: int | None,
    max_length: int | None,
    seed: int | None,
    validation_fraction: float | None,
    r: int | None,
    lora_alpha: float | None,
    target_modules: tuple[str, ...],
    prompt_format: str | None,
    backend: str | None,
    no_wait: bool,
) -> None:
    """Fine-tune a LoRA adapter of a base model on a dataset, following each step's loss, and
    show the fine-tune with the adapter it registered and its final and best validation
    losses. The settings are checked by the service, which names the one it refuses."""
    if steps is not None and epochs is not None:
        raise click.UsageError("give --steps or --epochs, not both")
    client = api.client()
    started = client.create_finetune(
        model,
        dataset,
        name,
        steps=steps,
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        validation_fraction=validation_fraction,
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules or None,
        prompt_format=prompt_format,
        backend=backend,
    )
    if no_wait:
        api.show(started, FINETUNE_COLUMNS)
        if not api.as_json:
            click.echo(f"job: {started.job_id}")
        return
    client.wait(started.job_id)
    api.show(client.get_finetune(started.id), FINETUNE_COLUMNS)


@main.group(cls=ApiGroup)
def finetunes() -> None:
    """Fine-tunes: list, show, their loss history and report."""


@finetunes.command("ls")
@click.option("--base-model", help="Only the fine-tunes of this base model.")
@click.option("--limit", type=click.IntRange(1, 200), default=50, show_default=True)
@pass_api
def list_finetunes(api: ApiContext, base_model: str | None, limit: int) -> None:
    """Fine-tunes, newest first."""
    api.show(api.client().list_finetunes(base_model=base_model, limit=limit).items, FINETUNE_COLUMNS)


@finetunes.command("show")
@click.argument("finetune_id")
@pass_api
def show_finetune(api: ApiContext, finetune_id: str) -> None:
    """A fine-tune: its status, the adapter it registered and its losses."""
    api.show(api.client().get_finetune(finetune_id), FINETUNE_COLUMNS)


@finetunes.command("history")
@click.argument("finetune_id")
@pass_api
def finetune_history(api: ApiContext, finetune_id: str) -> None:
    """Every step's loss, learning rate and completion tokens, and the validation loss where
    it was computed (once the run has ended)."""
    api.show(api.client().finetune_history(finetune_id).points, LOSS_POINT_COLUMNS)


@finetunes.command("report")
@click.argument("finetune_id")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Where to write the HTML report [default: FINETUNE_ID.html].",
)
@click.option("--open", "open_in_browser", is_flag=True, help="Open the HTML report in a web browser.")
@pass_api
def finetune_report(api: ApiContext, finetune_id: str, out: Path | None, open_in_browser: bool) -> None:
    """Write a fine-tune's report (its loss curve and what the run was) as HTML and show the
    fine-tune."""
    client = api.client()
    path = out or Path(f"{finetune_id}.html")
    path.write_text(client.finetune_report_html(finetune_id), encoding="utf-8")
    finished = client.get_finetune(finetune_id)
    if api.as_json:
        click.echo(json.dumps(finished.model_dump(mode="json") | {"html": str(path)}, indent=2))
    else:
        api.show(finished, FINETUNE_COLUMNS)
        click.echo(f"report: {path}")
    if open_in_browser:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())


@main.group(cls=ApiGroup)
def experiment() -> None:
    """Experiment configs (the seed framework's YAML) run as one job."""


@experiment.command("run")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@no_wait_option
@pass_api
def run_experiment(api: ApiContext, config: Path, no_wait: bool) -> None:
    """Run CONFIG (YAML or JSON): adapter import, extraction, probes and report, resumed from
    what earlier runs already made."""
    client = api.client()
    started = client.run_experiment(config)
    if not no_wait:
        client.wait(started.job_id)
    finished = client.get_experiment(started.id)
    if api.as_json:
        click.echo(json.dumps(finished.model_dump(mode="json"), indent=2))
        return
    click.echo(aligned_table(["ARTIFACT", "LINK"], [[name, link or "—"] for name, link in finished.links.items()]))
    click.echo(f"experiment {finished.id}: {finished.status}")


@main.group(cls=ApiGroup)
def jobs() -> None:
    """Jobs: list, show, cancel, watch."""


@jobs.command("ls")
@click.option("--status", type=click.Choice(get_args(JobStatus)))
@click.option("--kind", help="e.g. extraction, probe_training, adapter_import, model_check, finetune.")
@click.option("--limit", type=click.IntRange(1, 200), default=50, show_default=True)
@pass_api
def list_jobs(api: ApiContext, status: JobStatus | None, kind: str | None, limit: int) -> None:
    """Jobs, newest first."""
    api.show(api.client().list_jobs(status=status, kind=kind, limit=limit).items, JOB_COLUMNS)


@jobs.command("show")
@click.argument("job_id")
@pass_api
def show_job(api: ApiContext, job_id: str) -> None:
    api.show(api.client().get_job(job_id), JOB_COLUMNS)


@jobs.command("cancel")
@click.argument("job_id")
@pass_api
def cancel_job(api: ApiContext, job_id: str) -> None:
    """Cancel a queued job at once, or a running one at its next progress point."""
    api.show(api.client().cancel_job(job_id), JOB_COLUMNS)


@jobs.command("watch")
@click.argument("job_id")
@pass_api
def watch_job(api: ApiContext, job_id: str) -> None:
    """Follow a job with a progress bar until it ends (exit code 5 when it fails)."""
    api.show(api.client().wait(job_id), JOB_COLUMNS)
