"""`Client`: one method per endpoint of the v1 API, typed answers, errors raised by kind,
and `wait` to follow a job to its end."""

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import httpx

from confprobe_client.transport import DEFAULT_URL, Transport
from confprobe_client.types import (
    Adapter,
    ApiKey,
    Comparison,
    CreatedApiKey,
    Dataset,
    Evaluation,
    EvaluationReport,
    Experiment,
    Extraction,
    Finetune,
    Health,
    Job,
    JobStatus,
    LossHistory,
    Model,
    Page,
    Probe,
    ProbeReport,
    ProbeRun,
    Readiness,
    Score,
    TinkerModel,
    Transfer,
)
from confprobe_client.waiting import wait_for_job

if TYPE_CHECKING:
    import numpy as np


class Client:
    """The Confidence Probing Service over HTTP.

    `http` takes an existing client with httpx's interface (an `httpx.Client`, or FastAPI's
    `TestClient` for a service in the same process), which then decides the base URL; else
    the client makes its own from `base_url`, `timeout` (seconds) and an optional httpx
    `transport`. `api_key` (default: the CONFPROBE_API_KEY environment variable) is sent
    as a bearer token with every request, for a service that runs with AUTH_ENABLED.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        timeout: float = 30,
        transport: httpx.BaseTransport | None = None,
        http: httpx.Client | None = None,
        api_key: str | None = None,
    ) -> None:
        self._api = Transport(base_url, timeout, transport, http, api_key)

    @property
    def base_url(self) -> str:
        return self._api.base_url

    @property
    def timeout(self) -> float:
        return self._api.timeout

    def close(self) -> None:
        self._api.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- health ----------------------------------------------------------------------------

    def health(self) -> Health:
        return Health.model_validate(self._api.json("GET", "/healthz"))

    def ready(self) -> Readiness:
        """Raises `Unavailable` naming what is missing (database, Redis, a worker)."""
        return Readiness.model_validate(self._api.json("GET", "/readyz"))

    # --- models ----------------------------------------------------------------------------

    def register_model(
        self,
        source: str,
        name: str | None = None,
        revision: str | None = None,
        dtype: str | None = None,
        quantization: str | None = None,
    ) -> Model:
        """Register a base model (a local folder, a GGUF file, or a Hugging Face id in the
        service's cache); a worker checks it in the job `check_job_id`. The same source again
        gives the same model."""
        body = _without_none(
            name=name or _last_path_part(source),
            source=source,
            revision=revision,
            dtype=dtype,
            quantization=quantization,
        )
        return Model.model_validate(self._api.json("POST", "/v1/models", json=body))

    def check_model(self, model_id: str) -> Job:
        return _accepted_job(self._api.json("POST", f"/v1/models/{model_id}/check"))

    def get_model(self, model_id: str) -> Model:
        return Model.model_validate(self._api.json("GET", f"/v1/models/{model_id}"))

    def list_models(self, cursor: str | None = None, limit: int = 50) -> Page[Model]:
        return Page[Model].model_validate(
            self._api.json("GET", "/v1/models", params=_without_none(cursor=cursor, limit=limit))
        )

    def delete_model(self, model_id: str, force: bool = False) -> None:
        """Delete the registration and its cached hidden states. Raises `Conflict` while an
        unfinished job runs on it or anything made from it exists (adapters, extractions,
        probes…), unless `force`, which deletes those too and cancels the jobs."""
        self._api.send("DELETE", f"/v1/models/{model_id}", params={"force": "true"} if force else None)

    # --- datasets --------------------------------------------------------------------------

    def upload_dataset(self, path: str | Path, name: str | None = None) -> Dataset:
        """Upload JSONL or CSV: statements `{text, label}`, multiple choice `{question,
        choices, answer}` or chat `{messages}` (for fine-tuning only). The same rows again
        give the same dataset."""
        path = Path(path)
        with path.open("rb") as handle:
            answer = self._api.json(
                "POST", "/v1/datasets", files={"file": (path.name, handle)}, data=_without_none(name=name)
            )
        return Dataset.model_validate(answer)

    def get_dataset(self, dataset_id: str) -> Dataset:
        return Dataset.model_validate(self._api.json("GET", f"/v1/datasets/{dataset_id}"))

    def list_datasets(self, cursor: str | None = None, limit: int = 50) -> Page[Dataset]:
        return Page[Dataset].model_validate(
            self._api.json("GET", "/v1/datasets", params=_without_none(cursor=cursor, limit=limit))
        )

    def delete_dataset(self, dataset_id: str, force: bool = False) -> None:
        """Raises `Conflict` while an unfinished job reads it or anything made from its rows exists
        (extractions, probes, evaluations, comparisons, transfers, fine-tunes), unless `force`,
        which deletes those too and cancels the jobs."""
        self._api.send("DELETE", f"/v1/datasets/{dataset_id}", params={"force": "true"} if force else None)

    # --- adapters --------------------------------------------------------------------------

    def import_adapter(self, source: str, base_model: str, name: str, metadata: dict[str, Any] | None = None) -> Job:
        """Import from `tinker://…`, a folder or archive under the service's ADAPTER_ROOTS, or
        an allowed URL; the job's result names the `adapter_id`."""
        body = _without_none(source=source, base_model=base_model, name=name, metadata=metadata)
        return _accepted_job(self._api.json("POST", "/v1/adapters/import", json=body))

    def upload_adapter(
        self, path: str | Path, base_model: str, name: str, metadata: dict[str, Any] | None = None
    ) -> Job:
        """Upload a `.tar`, `.tar.gz` or `.zip` of a PEFT adapter or Tinker checkpoint."""
        import json

        path = Path(path)
        form = _without_none(
            base_model=base_model, name=name, metadata=json.dumps(metadata) if metadata is not None else None
        )
        with path.open("rb") as handle:
            return _accepted_job(
                self._api.json("POST", "/v1/adapters/upload", files={"file": (path.name, handle)}, data=form)
            )

    def list_adapters(self, base_model: str | None = None, cursor: str | None = None, limit: int = 50) -> Page[Adapter]:
        params = _without_none(base_model=base_model, cursor=cursor, limit=limit)
        return Page[Adapter].model_validate(self._api.json("GET", "/v1/adapters", params=params))

    def get_adapter(self, adapter_id: str) -> Adapter:
        return Adapter.model_validate(self._api.json("GET", f"/v1/adapters/{adapter_id}"))

    def delete_adapter(self, adapter_id: str, force: bool = False) -> None:
        """Raises `Conflict` while an unfinished job uses it, unless `force`."""
        self._api.send("DELETE", f"/v1/adapters/{adapter_id}", params={"force": "true"} if force else None)

    # --- extractions -----------------------------------------------------------------------

    def create_extraction(
        self,
        model: str,
        layers: Sequence[int],
        texts: Sequence[str] | None = None,
        dataset: str | None = None,
        adapter: str | None = None,
        token_position: str | None = None,
        max_length: int | None = None,
        prompt_format: str | None = None,
    ) -> Extraction:
        """Queue an extraction of `texts` or a `dataset`; follow `job_id`, then download.
        `prompt_format`: `raw` (the default), `chat`, or a template naming `{text}`
        (`{question}` and `{choices}` for a multiple-choice dataset)."""
        body = _without_none(
            model=model,
            adapter=adapter,
            texts=list(texts) if texts is not None else None,
            dataset=dataset,
            layers=list(layers),
            token_position=token_position,
            max_length=max_length,
            prompt_format=prompt_format,
        )
        return Extraction.model_validate(self._api.json("POST", "/v1/extractions", json=body)["extraction"])

    def get_extraction(self, extraction_id: str) -> Extraction:
        return Extraction.model_validate(self._api.json("GET", f"/v1/extractions/{extraction_id}"))

    def list_extractions(self, cursor: str | None = None, limit: int = 50) -> Page[Extraction]:
        return Page[Extraction].model_validate(
            self._api.json("GET", "/v1/extractions", params=_without_none(cursor=cursor, limit=limit))
        )

    def delete_extraction(self, extraction_id: str, force: bool = False) -> None:
        """Raises `Conflict` while its job is unfinished, unless `force` (which cancels it)."""
        self._api.send("DELETE", f"/v1/extractions/{extraction_id}", params={"force": "true"} if force else None)

    def download_hidden_states(self, extraction_id: str) -> "np.ndarray":
        """The `(texts, layers, hidden)` float32 array, streamed into memory as `.npy`.
        Raises `Conflict` while it is not computed yet."""
        import numpy as np

        buffer = io.BytesIO()
        with self._api.stream(
            "GET", f"/v1/extractions/{extraction_id}/hidden-states", params={"format": "npy"}
        ) as response:
            for chunk in response.iter_bytes():
                buffer.write(chunk)
        buffer.seek(0)
        return np.load(buffer, allow_pickle=False)

    def extract(
        self,
        model: str,
        layers: Sequence[int],
        texts: Sequence[str] | None = None,
        dataset: str | None = None,
        adapter: str | None = None,
        token_position: str | None = None,
        max_length: int | None = None,
        timeout: float | None = None,
        progress: bool = True,
        prompt_format: str | None = None,
    ) -> "np.ndarray":
        """Extract, wait and download: hidden states shaped `(texts, layers, hidden)`."""
        extraction = self.create_extraction(
            model, layers, texts, dataset, adapter, token_position, max_length, prompt_format=prompt_format
        )
        self.wait(extraction.job_id, timeout=timeout, progress=progress)
        return self.download_hidden_states(extraction.id)

    # --- probes ----------------------------------------------------------------------------

    def train_probes(
        self,
        model: str,
        dataset: str,
        layers: Sequence[int],
        method: str | Sequence[str] | None = None,
        adapter: str | None = None,
        token_position: str | None = None,
        max_length: int | None = None,
        whiten: bool | None = None,
        split: dict[str, float] | None = None,
        seed: int | None = None,
        recalibration: str | None = None,
        prompt_format: str | None = None,
        baselines: bool | None = None,
    ) -> ProbeRun:
        """Queue training of one probe per layer and method; follow the run's `job_id`.
        `baselines=False` skips the statements' P(True) pass."""
        body = _without_none(
            model=model,
            adapter=adapter,
            dataset=dataset,
            layers=list(layers),
            token_position=token_position,
            max_length=max_length,
            prompt_format=prompt_format,
            method=method if method is None or isinstance(method, str) else list(method),
            whiten=whiten,
            split=split,
            seed=seed,
            recalibration=recalibration,
            baselines=baselines,
        )
        return ProbeRun.model_validate(self._api.json("POST", "/v1/probes", json=body)["run"])

    def train(
        self,
        model: str,
        dataset: str,
        layers: Sequence[int],
        method: str | Sequence[str] | None = None,
        adapter: str | None = None,
        token_position: str | None = None,
        max_length: int | None = None,
        whiten: bool | None = None,
        split: dict[str, float] | None = None,
        seed: int | None = None,
        recalibration: str | None = None,
        timeout: float | None = None,
        progress: bool = True,
        prompt_format: str | None = None,
    ) -> ProbeRun:
        """Train, wait, and return the finished run with its probes and the best one marked."""
        run = self.train_probes(
            model,
            dataset,
            layers,
            method,
            adapter,
            token_position,
            max_length,
            whiten,
            split,
            seed,
            recalibration,
            prompt_format=prompt_format,
        )
        self.wait(run.job_id, timeout=timeout, progress=progress)
        return self.get_probe_run(run.id)

    def get_probe_run(self, run_id: str) -> ProbeRun:
        return ProbeRun.model_validate(self._api.json("GET", f"/v1/probe-runs/{run_id}"))

    def list_probes(
        self,
        model: str | None = None,
        dataset: str | None = None,
        best: bool | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> Page[Probe]:
        params = _without_none(model=model, dataset=dataset, best=best, cursor=cursor, limit=limit)
        return Page[Probe].model_validate(self._api.json("GET", "/v1/probes", params=params))

    def get_probe(self, probe_id: str) -> Probe:
        return Probe.model_validate(self._api.json("GET", f"/v1/probes/{probe_id}"))

    def delete_probe(self, probe_id: str, force: bool = False) -> None:
        """Delete the probe with its evaluations (and its run, if it was the run's last probe).
        Raises `Conflict` while a job trains, scores or evaluates it, unless `force`."""
        self._api.send("DELETE", f"/v1/probes/{probe_id}", params={"force": "true"} if force else None)

    def probe_report(self, probe_id: str) -> ProbeReport:
        return ProbeReport.model_validate(self._api.json("GET", f"/v1/probes/{probe_id}/report"))

    def probe_report_html(self, probe_id: str) -> str:
        """A standalone page: reliability diagram, confidence histogram and metrics table."""
        return self._api.send("GET", f"/v1/probes/{probe_id}/report.html").text

    def probe_report_svg(self, probe_id: str) -> str:
        return self._api.send("GET", f"/v1/probes/{probe_id}/report.svg").text

    def probe_report_png(self, probe_id: str) -> bytes:
        return self._api.send("GET", f"/v1/probes/{probe_id}/report.png").content

    def probe_weights(self, probe_id: str) -> bytes:
        """The probe as a safetensors file of float64 arrays, to apply with numpy as its card's
        `formula` says (`safetensors.numpy.load(content)`); the card is JSON under `card` in the
        file's metadata."""
        return self._api.send("GET", f"/v1/probes/{probe_id}/weights").content

    def probe_card(self, probe_id: str) -> dict[str, Any]:
        """What it takes to apply the probe outside the service (formula, arrays, model,
        adapter, layer, token position, prompt format) and what it was trained and measured on."""
        card: dict[str, Any] = self._api.json("GET", f"/v1/probes/{probe_id}/card")
        return card

    def score(
        self, probe_id: str, texts: Sequence[str], timeout_s: float | None = None, prompt_format: str | None = None
    ) -> Score:
        """P(correct) per text, under the probe's own prompt format unless `prompt_format` says
        otherwise. The service answers within `timeout_s` or hands back a job, which this then
        waits for."""
        body = _without_none(texts=list(texts), timeout_s=timeout_s, prompt_format=prompt_format)
        response = self._api.send("POST", f"/v1/probes/{probe_id}/score", json=body)
        if response.status_code != 202:
            return Score.model_validate(response.json())
        job = self.wait(_accepted_job(response.json()).id, progress=False)
        return Score(probe_id=probe_id, layer=self.get_probe(probe_id).layer, confidences=_result(job)["confidences"])

    # --- evaluations -----------------------------------------------------------------------

    def create_evaluation(
        self,
        probe_id: str,
        dataset: str,
        adapter: str | None = None,
        base: bool = False,
        prompt_format: str | None = None,
    ) -> Evaluation:
        """Queue scoring a trained probe on a labelled dataset; follow the evaluation's `job_id`.
        The states scored are those of `adapter`, of the base model when `base`, else of the
        probe's own variant; `prompt_format` defaults to the probe's own."""
        if base and adapter is not None:
            raise ValueError("give an adapter or base=True, not both")
        body = _without_none(dataset=dataset, adapter=adapter, prompt_format=prompt_format)
        if base:
            body["adapter"] = None
        answer = self._api.json("POST", f"/v1/probes/{probe_id}/evaluations", json=body)
        return Evaluation.model_validate(answer["evaluation"])

    def evaluate(
        self,
        probe_id: str,
        dataset: str,
        adapter: str | None = None,
        base: bool = False,
        prompt_format: str | None = None,
        timeout: float | None = None,
        progress: bool = True,
    ) -> Evaluation:
        """Evaluate, wait, and return the finished evaluation with its metrics."""
        evaluation = self.create_evaluation(probe_id, dataset, adapter, base, prompt_format)
        self.wait(evaluation.job_id, timeout=timeout, progress=progress)
        return self.get_evaluation(evaluation.id)

    def get_evaluation(self, evaluation_id: str) -> Evaluation:
        return Evaluation.model_validate(self._api.json("GET", f"/v1/evaluations/{evaluation_id}"))

    def list_evaluations(self, probe_id: str, cursor: str | None = None, limit: int = 50) -> Page[Evaluation]:
        """A probe's evaluations, oldest first."""
        params = _without_none(cursor=cursor, limit=limit)
        return Page[Evaluation].model_validate(
            self._api.json("GET", f"/v1/probes/{probe_id}/evaluations", params=params)
        )

    def evaluation_report(self, evaluation_id: str) -> EvaluationReport:
        return EvaluationReport.model_validate(self._api.json("GET", f"/v1/evaluations/{evaluation_id}/report"))

    def evaluation_report_html(self, evaluation_id: str) -> str:
        return self._api.send("GET", f"/v1/evaluations/{evaluation_id}/report.html").text

    def evaluation_report_svg(self, evaluation_id: str) -> str:
        return self._api.send("GET", f"/v1/evaluations/{evaluation_id}/report.svg").text

    def evaluation_report_png(self, evaluation_id: str) -> bytes:
        return self._api.send("GET", f"/v1/evaluations/{evaluation_id}/report.png").content

    # --- transfer matrices -----------------------------------------------------------------

    def create_transfer(
        self,
        model: str,
        train: Sequence[str],
        test: Sequence[str],
        layers: Sequence[int],
        method: str | None = None,
        adapter: str | None = None,
        union: bool | None = None,
        token_position: str | None = None,
        max_length: int | None = None,
        prompt_format: str | None = None,
        split: dict[str, float] | None = None,
        seed: int | None = None,
    ) -> Transfer:
        """Queue a transfer matrix: a probe per training set (or one on their union with
        `union=True`) scored on every test set; follow its `job_id`, then `get_transfer`."""
        body = _without_none(
            model=model,
            adapter=adapter,
            train=list(train),
            test=list(test),
            union=union,
            layers=list(layers),
            method=method,
            token_position=token_position,
            max_length=max_length,
            prompt_format=prompt_format,
            split=split,
            seed=seed,
        )
        return Transfer.model_validate(self._api.json("POST", "/v1/transfers", json=body)["transfer"])

    def transfer(
        self,
        model: str,
        train: Sequence[str],
        test: Sequence[str],
        layers: Sequence[int],
        timeout: float | None = None,
        progress: bool = True,
        **options: Any,
    ) -> Transfer:
        """Create a transfer matrix, wait, and return it with its cells (`create_transfer`'s options)."""
        transfer = self.create_transfer(model, train, test, layers, **options)
        self.wait(transfer.job_id, timeout=timeout, progress=progress)
        return self.get_transfer(transfer.id)

    def get_transfer(self, transfer_id: str) -> Transfer:
        return Transfer.model_validate(self._api.json("GET", f"/v1/transfers/{transfer_id}"))

    def list_transfers(self, model: str | None = None, cursor: str | None = None, limit: int = 50) -> Page[Transfer]:
        params = _without_none(model=model, cursor=cursor, limit=limit)
        return Page[Transfer].model_validate(self._api.json("GET", "/v1/transfers", params=params))

    def transfer_svg(self, transfer_id: str) -> str:
        """The AUROC heatmap."""
        return self._api.send("GET", f"/v1/transfers/{transfer_id}/matrix.svg").text

    def transfer_png(self, transfer_id: str) -> bytes:
        return self._api.send("GET", f"/v1/transfers/{transfer_id}/matrix.png").content

    def transfer_report_html(self, transfer_id: str) -> str:
        """The heatmap and the AUROC, accuracy and ECE tables with intervals."""
        return self._api.send("GET", f"/v1/transfers/{transfer_id}/report.html").text

    def delete_transfer(self, transfer_id: str, force: bool = False) -> None:
        """Raises `Conflict` while its job is unfinished, unless `force` (which cancels it)."""
        self._api.send("DELETE", f"/v1/transfers/{transfer_id}", params={"force": "true"} if force else None)

    # --- comparisons -----------------------------------------------------------------------

    def compare(
        self,
        model: str,
        adapters: Sequence[str],
        dataset: str,
        layers: Sequence[int],
        method: str | None = None,
        token_position: str | None = None,
        max_length: int | None = None,
        split: dict[str, float] | None = None,
        seed: int | None = None,
        on_mixed_precision: str | None = None,
        prompt_format: str | None = None,
    ) -> Comparison:
        """Queue a base-versus-adapters comparison; follow its `job_id`, then `get_comparison`."""
        body = _without_none(
            model=model,
            adapters=list(adapters),
            dataset=dataset,
            layers=list(layers),
            method=method,
            token_position=token_position,
            max_length=max_length,
            prompt_format=prompt_format,
            split=split,
            seed=seed,
            on_mixed_precision=on_mixed_precision,
        )
        return Comparison.model_validate(self._api.json("POST", "/v1/comparisons", json=body)["comparison"])

    def run_experiment(self, config: str | Path | dict[str, Any]) -> Experiment:
        """Queue an experiment config (the seed framework's format): a YAML or JSON file, YAML text, or a dict."""
        if isinstance(config, dict):
            answer = self._api.json("POST", "/v1/experiments", json=config)
        else:
            text = (
                Path(config).read_text(encoding="utf-8")
                if isinstance(config, Path) or Path(str(config)).is_file()
                else str(config)
            )
            answer = self._api.json(
                "POST", "/v1/experiments", content=text.encode(), headers={"content-type": "application/yaml"}
            )
        return Experiment.model_validate(answer["experiment"])

    def get_experiment(self, experiment_id: str) -> Experiment:
        return Experiment.model_validate(self._api.json("GET", f"/v1/experiments/{experiment_id}"))

    def get_comparison(self, comparison_id: str) -> Comparison:
        return Comparison.model_validate(self._api.json("GET", f"/v1/comparisons/{comparison_id}"))

    def comparison_report_html(self, comparison_id: str) -> str:
        return self._api.send("GET", f"/v1/comparisons/{comparison_id}/report.html").text

    def comparison_report_svg(self, comparison_id: str) -> str:
        return self._api.send("GET", f"/v1/comparisons/{comparison_id}/report.svg").text

    def delete_comparison(self, comparison_id: str, force: bool = False) -> None:
        """Raises `Conflict` while its job is unfinished, unless `force` (which cancels it)."""
        self._api.send("DELETE", f"/v1/comparisons/{comparison_id}", params={"force": "true"} if force else None)

    # --- fine-tunes ------------------------------------------------------------------------

    def create_finetune(
        self,
        base_model: str,
        dataset: str,
        name: str,
        *,
        steps: int | None = None,
        epochs: float | None = None,
        learning_rate: float | None = None,
        batch_size: int | None = None,
        max_length: int | None = None,
        seed: int | None = None,
        validation_fraction: float | None = None,
        r: int | None = None,
        lora_alpha: float | None = None,
        target_modules: Sequence[str] | None = None,
        lora: dict[str, Any] | None = None,
        training: dict[str, Any] | None = None,
        prompt_format: str | None = None,
        backend: str | None = None,
    ) -> Finetune:
        """Queue a LoRA fine-tune of `base_model` on `dataset` (statements, multiple choice or
        chat), whose adapter is registered as `name`; follow its `job_id`, then `get_finetune`.
        The keywords set the common settings; `lora` {r, lora_alpha, dropout, target_modules}
        and `training` {learning_rate, lr_schedule, warmup_steps, weight_decay, max_grad_norm,
        steps, epochs, batch_size, gradient_accumulation_steps, max_length, seed,
        validation_fraction, validation_every, checkpoint_every} take any of them, and the
        service's defaults apply to the rest. A setting given both ways raises `TypeError`."""
        body = _without_none(
            base_model=base_model,
            dataset=dataset,
            name=name,
            backend=backend,
            prompt_format=prompt_format,
            lora=_settings(
                "lora",
                lora,
                r=r,
                lora_alpha=lora_alpha,
                target_modules=list(target_modules) if target_modules is not None else None,
            ),
            training=_settings(
                "training",
                training,
                steps=steps,
                epochs=epochs,
                learning_rate=learning_rate,
                batch_size=batch_size,
                max_length=max_length,
                seed=seed,
                validation_fraction=validation_fraction,
            ),
        )
        return Finetune.model_validate(self._api.json("POST", "/v1/finetunes", json=body)["finetune"])

    def finetune(
        self,
        base_model: str,
        dataset: str,
        name: str,
        *,
        steps: int | None = None,
        epochs: float | None = None,
        learning_rate: float | None = None,
        batch_size: int | None = None,
        max_length: int | None = None,
        seed: int | None = None,
        validation_fraction: float | None = None,
        r: int | None = None,
        lora_alpha: float | None = None,
        target_modules: Sequence[str] | None = None,
        lora: dict[str, Any] | None = None,
        training: dict[str, Any] | None = None,
        prompt_format: str | None = None,
        backend: str | None = None,
        timeout: float | None = None,
        progress: bool = True,
    ) -> Finetune:
        """Fine-tune, wait (the progress bar shows each step's loss), and return the finished
        fine-tune with its `adapter_id` and `summary`; raises `JobFailed` when the run fails
        or is cancelled. The settings are `create_finetune`'s."""
        started = self.create_finetune(
            base_model,
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
            target_modules=target_modules,
            lora=lora,
            training=training,
            prompt_format=prompt_format,
            backend=backend,
        )
        self.wait(started.job_id, timeout=timeout, progress=progress)
        return self.get_finetune(started.id)

    def get_finetune(self, finetune_id: str) -> Finetune:
        return Finetune.model_validate(self._api.json("GET", f"/v1/finetunes/{finetune_id}"))

    def list_finetunes(
        self, base_model: str | None = None, cursor: str | None = None, limit: int = 50
    ) -> Page[Finetune]:
        params = _without_none(base_model=base_model, cursor=cursor, limit=limit)
        return Page[Finetune].model_validate(self._api.json("GET", "/v1/finetunes", params=params))

    def finetune_history(self, finetune_id: str) -> LossHistory:
        """Every step's loss, learning rate and completion tokens, and the validation loss
        where it was computed. Raises `Conflict` until the run has ended (each step's loss is
        in the job's `progress.details` meanwhile)."""
        return LossHistory.model_validate(self._api.json("GET", f"/v1/finetunes/{finetune_id}/history"))

    def finetune_loss_svg(self, finetune_id: str) -> str:
        return self._api.send("GET", f"/v1/finetunes/{finetune_id}/loss.svg").text

    def finetune_loss_png(self, finetune_id: str) -> bytes:
        return self._api.send("GET", f"/v1/finetunes/{finetune_id}/loss.png").content

    def finetune_report_html(self, finetune_id: str) -> str:
        """A standalone page: the loss curve and what the run was (base, dataset, settings,
        summary)."""
        return self._api.send("GET", f"/v1/finetunes/{finetune_id}/report.html").text

    # --- Tinker ----------------------------------------------------------------------------

    def tinker_models(self) -> list[TinkerModel]:
        """The base models the Tinker service supports (the service needs TINKER_API_KEY)."""
        response = self._api.send("GET", "/v1/tinker/models")
        answer = (
            response.json()
            if response.status_code != 202
            else _result(self.wait(_accepted_job(response.json()).id, progress=False))
        )
        return [TinkerModel.model_validate(model) for model in answer["models"]]

    # --- jobs ------------------------------------------------------------------------------

    def get_job(self, job_id: str) -> Job:
        return Job.model_validate(self._api.json("GET", f"/v1/jobs/{job_id}"))

    def list_jobs(
        self, status: JobStatus | None = None, kind: str | None = None, cursor: str | None = None, limit: int = 50
    ) -> Page[Job]:
        """Newest first."""
        params = _without_none(status=status, kind=kind, cursor=cursor, limit=limit)
        return Page[Job].model_validate(self._api.json("GET", "/v1/jobs", params=params))

    def cancel_job(self, job_id: str) -> Job:
        """A queued job is cancelled at once, a running one at its next progress point;
        raises `Conflict` for a finished one."""
        return Job.model_validate(self._api.json("POST", f"/v1/jobs/{job_id}/cancel"))

    def ping(self) -> Job:
        """A canary job that runs the whole path to a worker and back without a model."""
        return _accepted_job(self._api.json("POST", "/v1/jobs/ping"))

    def wait(self, job_id: str, timeout: float | None = None, progress: bool = True) -> Job:
        """Follow a job to its end and return it; raise `JobFailed` (with the job's error
        code and message) when it failed or was cancelled, `WaitTimedOut` after `timeout`
        seconds. Follows the job's server-sent events and falls back to polling when the
        stream is refused or breaks. `progress` draws a progress bar on stderr."""
        return wait_for_job(self._api, job_id, timeout, progress)

    # --- API keys (admin scope) ------------------------------------------------------------

    def create_key(
        self,
        name: str,
        scopes: Sequence[str],
        rate_limit_per_minute: int | None = None,
        rate_limit_burst: int | None = None,
    ) -> CreatedApiKey:
        """A new API key; its `secret` is in this answer only."""
        body = _without_none(
            name=name,
            scopes=list(scopes),
            rate_limit_per_minute=rate_limit_per_minute,
            rate_limit_burst=rate_limit_burst,
        )
        return CreatedApiKey.model_validate(self._api.json("POST", "/v1/keys", json=body))

    def list_keys(self, include_revoked: bool = False, cursor: str | None = None, limit: int = 50) -> Page[ApiKey]:
        params = _without_none(include_revoked=include_revoked or None, cursor=cursor, limit=limit)
        return Page[ApiKey].model_validate(self._api.json("GET", "/v1/keys", params=params))

    def revoke_key(self, key_id: str) -> ApiKey:
        """The key stops working at once."""
        return ApiKey.model_validate(self._api.json("DELETE", f"/v1/keys/{key_id}"))


def _without_none(**fields: Any) -> dict[str, Any]:
    """Request fields the caller gave; the service's defaults apply to the rest."""
    return {name: value for name, value in fields.items() if value is not None}


def _settings(group: str, given: dict[str, Any] | None, **named: Any) -> dict[str, Any] | None:
    """A nested group of settings: `given` with the keywords the caller set added to it."""
    merged = dict(given or {})
    for key, value in named.items():
        if value is None:
            continue
        if key in merged:
            raise TypeError(f"{key} is given twice: as {key}= and in {group}")
        merged[key] = value
    return merged or None


def _last_path_part(source: str) -> str:
    return source.rstrip("/").rsplit("/", 1)[-1] or source


def _accepted_job(answer: dict[str, Any]) -> Job:
    return Job.model_validate(answer["job"])


def _result(job: Job) -> dict[str, Any]:
    return job.result or {}
