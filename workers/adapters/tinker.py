"""The worker's Tinker client: checkpoint paths, weights info, supported models, and the
download of an `external_weights` checkpoint, through the `tinker` SDK.

The SDK (0.38) downloads only `external_weights` checkpoints: it signs one URL per file,
valid until `expires`, and the files are fetched from those URLs directly. `sampler_weights`
checkpoints cannot be downloaded at all any more, and `weights` (training state) only by
exporting them from a training session first, as the SDK's `tinker checkpoint download` does
(`workers/adapters/tinker_training.py`).

The SDK retries a failing request for up to 300 s and offers no setting to shorten that, so
every SDK call here, building the client included, waits at most `SDK_TIMEOUT_S`.
"""

import concurrent.futures
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import TypeVar

import httpx
import tinker
from tinker import types as tinker_types

from workers.errors import JobFailed

T = TypeVar("T")

KINDS = ("weights", "sampler_weights", "external_weights")
SDK_TIMEOUT_S = 60.0
# the SDK's own CLI signs the URLs again this long before they expire
REFRESH_BEFORE_EXPIRY = timedelta(minutes=5)
DOWNLOAD_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class TinkerPath:
    """`tinker://<run_id>/<kind>/<name>`; the run id may hold colons (`<uuid>:train:0`)."""

    run_id: str
    kind: str
    name: str

    def __str__(self) -> str:
        return f"tinker://{self.run_id}/{self.kind}/{self.name}"


@dataclass(frozen=True)
class WeightsInfo:
    base_model: str
    is_lora: bool
    lora_rank: int | None
    train_unembed: bool | None
    train_mlp: bool | None
    train_attn: bool | None


@dataclass(frozen=True)
class SupportedModel:
    model_name: str | None
    max_context_length: int | None
    trainable: bool | None
    sampleable: bool | None


def parse_tinker_path(path: str) -> TinkerPath:
    if not path.startswith("tinker://"):
        raise ValueError(f"{path!r} is not a Tinker path: it must start with tinker://")
    parts = path.removeprefix("tinker://").split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"{path!r} is not a Tinker path: expected tinker://<run_id>/<kind>/<name>")
    run_id, kind, name = parts
    if kind not in KINDS:
        raise ValueError(f"{path!r} has checkpoint kind {kind!r}; expected one of {', '.join(KINDS)}")
    return TinkerPath(run_id=run_id, kind=kind, name=name)


class TinkerClient:
    """Calls to the Tinker service for one API key; every failure becomes a `JobFailed`."""

    def __init__(self, api_key: str, base_url: str | None) -> None:
        if not api_key:
            # without one the SDK would fall back to the machine's stored credentials
            raise JobFailed(
                "tinker_unauthorized", "no Tinker API key is configured: set TINKER_API_KEY for the workers"
            )
        # The SDK reads this whenever it builds a connection; its telemetry would report every
        # failure to Tinker and can hold a failing call for ~30 s while doing so.
        os.environ["TINKER_TELEMETRY"] = "0"
        self.base_url = base_url
        self.api_key = api_key
        with self.failures_as_job_failed("connecting to Tinker"):
            self._rest = in_thread(lambda: tinker.RestClient(base_url=base_url, api_key=api_key), SDK_TIMEOUT_S)

    def weights_info(self, path: TinkerPath) -> WeightsInfo:
        info = self.result(self._rest.get_weights_info_by_tinker_path(str(path)), str(path))
        return WeightsInfo(
            info.base_model, info.is_lora, info.lora_rank, info.train_unembed, info.train_mlp, info.train_attn
        )

    def supported_models(self) -> list[SupportedModel]:
        capabilities = self.result(self._rest.get_server_capabilities(), "the supported models")
        return [
            SupportedModel(m.model_name, m.max_context_length, m.trainable, m.sampleable)
            for m in capabilities.supported_models
        ]

    def download_external_weights(
        self, path: TinkerPath, destination: Path, max_bytes: int, on_file: Callable[[int, int], None] | None = None
    ) -> list[Path]:
        """Download every file of the checkpoint into `destination` (missing or empty) and
        return their paths; on any failure nothing is left in `destination`."""
        _require_downloadable(path)
        if destination.exists() and any(destination.iterdir()):
            raise ValueError(f"{destination} must be missing or empty")
        signed = SignedUrls(lambda: self.result(self._rest.get_external_weights_urls(str(path)), str(path)))
        targets = _safe_targets(path, list(signed.urls), destination)
        created = not destination.exists()
        destination.mkdir(parents=True, exist_ok=True)
        try:
            return _download_all(path, signed, targets, max_bytes, on_file)
        except BaseException:
            _remove_contents(destination, remove_folder=created)
            raise

    def delete_checkpoint(self, path: TinkerPath) -> None:
        self.result(self._rest.delete_checkpoint_from_tinker_path(str(path)), str(path))

    def result(self, future: tinker.APIFuture[T], subject: str, timeout: float | None = None) -> T:
        """The call's answer within `timeout` (default `SDK_TIMEOUT_S`), or a `JobFailed` that
        names `subject`."""
        with self.failures_as_job_failed(subject):
            return wait(future, timeout or SDK_TIMEOUT_S)

    @contextmanager
    def failures_as_job_failed(self, subject: str) -> Iterator[None]:
        try:
            yield
        except (TimeoutError, tinker.TinkerError) as error:
            raise _job_failure(error, subject, self.base_url) from error


def wait(future: tinker.APIFuture[T], timeout: float) -> T:
    try:
        return future.result(timeout=timeout)
    except TimeoutError:
        future.future().cancel()  # ends the SDK's retries too
        raise


def in_thread(call: Callable[[], T], timeout: float) -> T:
    """`call()` in a thread of its own, given up after `timeout`: building an SDK client, or
    a session's first call, posts the client configuration, which the SDK retries for up to
    300 s."""
    running: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            running.set_result(call())
        except BaseException as error:  # handed to the waiting thread
            running.set_exception(error)

    threading.Thread(target=run, name="tinker-call", daemon=True).start()
    return running.result(timeout=timeout)


def _job_failure(error: BaseException, subject: str, base_url: str | None) -> JobFailed:
    if isinstance(error, tinker.AuthenticationError | tinker.PermissionDeniedError):
        return JobFailed(
            "tinker_unauthorized",
            f"{subject}: Tinker refused the API key ({error.message}); check TINKER_API_KEY",
            subject=subject,
        )
    if isinstance(error, tinker.NotFoundError):
        return JobFailed(
            "tinker_not_found",
            f"{subject}: Tinker has no such checkpoint, or this API key cannot see it",
            subject=subject,
        )
    if isinstance(error, tinker.APIConnectionError | TimeoutError):
        service = base_url or "the Tinker service"
        return JobFailed(
            "tinker_unreachable", f"{subject}: {service} did not answer within {SDK_TIMEOUT_S:g} s", subject=subject
        )
    if isinstance(error, tinker.APIError):
        return JobFailed("tinker_error", f"{subject}: Tinker failed ({error.message})", subject=subject)
    if isinstance(error, tinker.RequestFailedError):
        return JobFailed(
            "tinker_request_failed",
            f"{subject}: Tinker failed the request ({error.message})",
            subject=subject,
            category=str(error.category),
        )
    # the SDK's own checks before any request, such as a key without the `tml-` prefix
    return JobFailed("tinker_unauthorized", f"{subject}: the Tinker API key cannot be used ({error})", subject=subject)


def _require_downloadable(path: TinkerPath) -> None:
    """Only external weights can be downloaded with the SDK; say what to do with the rest."""
    if path.kind == "external_weights":
        return
    what = "a training checkpoint" if path.kind == "weights" else "a sampler checkpoint"
    raise JobFailed(
        "tinker_checkpoint_kind",
        f"{path} is {what}, which the Tinker SDK cannot download; only external_weights checkpoints can be imported. "
        "Export the run's training checkpoint as external weights from a training session "
        "(ServiceClient.create_training_client_from_state(), then TrainingClient.save_weights_external()) "
        "and import the tinker://<run_id>/external_weights/<name> path it returns; or, if you downloaded the "
        "adapter's .tar archive with an older SDK, upload it with POST /v1/adapters/upload.",
        path=str(path),
    )


class SignedUrls:
    """A checkpoint's signed file URLs, asked for again when they are about to expire."""

    def __init__(self, ask: Callable[[], tinker_types.ExternalWeightsUrlsResponse]) -> None:
        self._ask = ask
        self.refresh()

    def refresh(self) -> None:
        response = self._ask()
        self.urls = response.urls
        # a server that sends no timezone means UTC
        self.expires = response.expires if response.expires.tzinfo else response.expires.replace(tzinfo=UTC)

    def url_for(self, name: str) -> str:
        if datetime.now(UTC) >= self.expires - REFRESH_BEFORE_EXPIRY:
            self.refresh()
        return self.urls[name]


def _safe_targets(path: TinkerPath, names: list[str], destination: Path) -> dict[str, Path]:
    """Where each file goes, refusing the whole checkpoint if any name would land outside
    `destination` (absolute, `..`, or the folder itself)."""
    base = destination.resolve()
    targets: dict[str, Path] = {}
    for name in sorted(names):
        pure = PurePosixPath(name)
        target = (base / name).resolve()
        if pure.is_absolute() or ".." in pure.parts or base not in target.parents:
            raise JobFailed(
                "tinker_unsafe_file_name",
                f"{path} names a file {name!r} that would land outside the download folder; nothing was downloaded",
                path=str(path),
                file=name,
            )
        targets[name] = target
    return targets


def _download_all(
    path: TinkerPath,
    signed: SignedUrls,
    targets: dict[str, Path],
    max_bytes: int,
    on_file: Callable[[int, int], None] | None,
) -> list[Path]:
    with httpx.Client(timeout=DOWNLOAD_TIMEOUT, follow_redirects=True) as http:
        downloads = FileDownloads(path, signed, http, max_bytes)
        for done, (name, target) in enumerate(targets.items(), start=1):
            downloads.fetch(name, target)
            if on_file is not None:
                on_file(done, len(targets))
    return list(targets.values())


@dataclass
class FileDownloads:
    """The files of one checkpoint, fetched from their signed URLs, `max_bytes` in all."""

    path: TinkerPath
    signed: SignedUrls
    http: httpx.Client
    max_bytes: int
    fetched_bytes: int = 0

    def fetch(self, name: str, target: Path) -> None:
        """Stream one file to a temporary name beside `target`, then rename it. A 403 means the
        URL died before its `expires` (a revoked signature, clocks apart): sign again, retry once."""
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            for attempt in (1, 2):
                with self.http.stream("GET", self.signed.url_for(name)) as response:
                    if response.status_code == 403 and attempt == 1:
                        self.signed.refresh()
                        continue
                    if response.status_code != 200:
                        # not raise_for_status(): its message would carry the signed URL
                        raise self._failure(name, f"the file host answered HTTP {response.status_code}")
                    self._save(response, target)
                    return
        except httpx.HTTPError as error:
            raise self._failure(name, str(error)) from error

    def _save(self, response: httpx.Response, target: Path) -> None:
        with tempfile.NamedTemporaryFile(
            dir=target.parent, prefix=f".{target.name}.", suffix=".partial", delete=False
        ) as partial:
            for chunk in response.iter_bytes(CHUNK_BYTES):
                self.fetched_bytes += len(chunk)
                if self.fetched_bytes > self.max_bytes:
                    raise JobFailed(
                        "adapter_too_large",
                        f"{self.path} is larger than the {self.max_bytes} bytes an adapter may have",
                        path=str(self.path),
                        limit_bytes=self.max_bytes,
                    )
                partial.write(chunk)
        Path(partial.name).replace(target)

    def _failure(self, name: str, reason: str) -> JobFailed:
        return JobFailed(
            "tinker_download_failed",
            f"{self.path}: downloading {name} failed: {reason}",
            path=str(self.path),
            file=name,
        )


def _remove_contents(folder: Path, remove_folder: bool) -> None:
    if remove_folder:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
