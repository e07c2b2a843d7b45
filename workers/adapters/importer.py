"""The `adapter_import` job: fetch the files (Tinker, folder, archive, URL, upload) into a
staging folder, convert them to a PEFT adapter checked against the base model, publish it
to the artifact store and register it. Whatever fails, the staging folder and the uploaded
archive go, and no row or file is left without the other."""

import errno
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, assert_never

import httpx
from sqlalchemy.exc import IntegrityError

from app.errors import disk_full
from app.inputs.archives import ArchiveLimits, ArchiveRejected, extract_archive
from app.job_kinds import AdapterImportParameters
from app.registry.adapters import artifact_in_use, find_adapter
from app.registry.tables import Adapter, Model, new_id
from app.settings import Settings
from app.storage.base import ArtifactStore
from workers.adapters.convert import convert, model_base_modules, read_config
from workers.context import subject_row
from workers.errors import AttemptSuperseded, JobFailed

if TYPE_CHECKING:
    from workers.context import JobContext

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
DOWNLOAD_CHUNK = 1 << 20


def _limits(settings: Settings) -> ArchiveLimits:
    return ArchiveLimits(max_files=settings.max_archive_files, max_total_bytes=settings.max_adapter_bytes)


def _unpack(archive: Path, destination: Path, settings: Settings) -> Path:
    try:
        extract_archive(archive, destination, _limits(settings))
    except ArchiveRejected as exc:
        raise JobFailed(exc.code, exc.message, member=exc.member) from exc
    return destination


def _download(url: str, destination: Path, max_bytes: int) -> Path:
    """An allow-listed https URL; redirects are not followed (they could leave the allow-list)."""
    received = 0
    try:
        with httpx.stream("GET", url, follow_redirects=False, timeout=60) as response:
            if response.status_code != 200:
                raise JobFailed("download_failed", f"{url} answered {response.status_code}", url=url)
            with destination.open("wb") as handle:
                for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
                    received += len(chunk)
                    if received > max_bytes:
                        raise JobFailed("too_large", f"{url} is larger than {max_bytes} bytes", url=url)
                    handle.write(chunk)
    except httpx.HTTPError as exc:
        raise JobFailed("download_failed", f"could not download {url}: {exc}", url=url) from exc
    return destination


def names_match(tinker_base: str, model: Model) -> bool:
    wanted = tinker_base.lower()
    candidates = {model.source.lower(), model.name.lower(), Path(model.source).name.lower()}
    return wanted in candidates or wanted.rsplit("/", 1)[-1] in candidates


def _fetch_tinker(
    context: "JobContext[AdapterImportParameters]", model: Model, staging: Path
) -> tuple[Path, dict[str, Any]]:
    from workers.adapters.tinker import TinkerClient, parse_tinker_path
    from workers.adapters.tinker_training import download_training_state

    settings = context.runtime.settings
    if not settings.tinker_api_key:
        raise JobFailed("tinker_unconfigured", "the worker has no TINKER_API_KEY setting")
    source = context.params.source
    path = parse_tinker_path(source)
    client = TinkerClient(settings.tinker_api_key, settings.tinker_base_url)
    info = client.weights_info(path)
    if not info.is_lora:
        raise JobFailed("unsupported_adapter", f"{source} is not a LoRA checkpoint")
    if not names_match(info.base_model, model):
        raise JobFailed(
            "base_model_mismatch",
            f"{source} was trained on {info.base_model}, but model {model.id} is {model.source}",
            tinker_base_model=info.base_model,
        )
    folder = staging / "files"

    def on_file(done: int, total: int) -> None:
        context.progress("downloading", done, total)

    if path.kind == "weights":  # training state: exported for the download, then the export deleted
        download_training_state(client, path, folder, settings.max_adapter_bytes, on_file)
    else:
        client.download_external_weights(path, folder, settings.max_adapter_bytes, on_file)
    training = {key: value for key, value in vars(info).items() if value is not None}
    return folder, {"tinker": training}


def _fetch(context: "JobContext[AdapterImportParameters]", model: Model, staging: Path) -> tuple[Path, dict[str, Any]]:
    """The folder holding the adapter's files, and what the source says about training."""
    settings, store = context.runtime.settings, context.runtime.artifacts
    kind, source = context.params.source_kind, context.params.source
    if kind == "tinker":
        return _fetch_tinker(context, model, staging)
    if kind == "local_folder":
        return Path(source), {}
    if kind == "local_archive":
        return _unpack(Path(source), staging / "files", settings), {}
    if kind == "url":
        return _unpack(
            _download(source, staging / "download", settings.max_adapter_bytes), staging / "files", settings
        ), {}
    if kind == "upload":  # staged in the store by the gateway, which may be on another machine
        assert context.params.upload is not None  # the parameters' model requires it for an upload
        return _unpack(store.local_path(context.params.upload), staging / "files", settings), {}
    assert_never(kind)


def _locate(folder: Path) -> tuple[Path, Path]:
    """(weights, config) inside the fetched files: the one `adapter_config.json`, and the
    safetensors weights beside it."""
    configs = [path for path in folder.rglob(CONFIG_FILE) if path.is_file() and not path.is_symlink()]
    if len(configs) != 1:
        raise JobFailed("unsupported_adapter", f"expected one {CONFIG_FILE}, found {len(configs)}")
    config = configs[0]
    weights = config.parent / WEIGHTS_FILE
    if not weights.is_file():
        candidates = sorted(config.parent.glob("*.safetensors"))
        if len(candidates) != 1:
            pickled = sorted(p.name for p in config.parent.iterdir() if p.suffix in {".bin", ".pt", ".pth"})
            hint = f"; {', '.join(pickled)} are pickle-based: convert them to safetensors" if pickled else ""
            raise JobFailed("unsupported_adapter", f"no {WEIGHTS_FILE} beside {CONFIG_FILE}{hint}")
        weights = candidates[0]
    if weights.is_symlink() or config.is_symlink():
        raise JobFailed("link", "adapter files must not be symbolic links")
    return weights, config


@dataclass(frozen=True)
class AdapterRecord:
    """What the registry records of where an adapter came from."""

    name: str
    source_kind: str  # `tinker`, `local_folder`, …, or `finetune` for one the service trained
    source: str
    provenance: dict[str, Any]
    tinker_path: str | None = None
    tinker_run_id: str | None = None


def register_adapter(
    context: "JobContext[Any]", model: Model, files: Path, staging: Path, record: AdapterRecord
) -> tuple[Adapter, bool, list[str]]:
    """The PEFT or Tinker adapter in the folder `files`, converted against `model` (in
    `staging`), published and registered: what every job that brings an adapter in ends with.
    Returns the adapter, whether it is new, and the conversion's notes."""
    weights, config_path = _locate(files)
    converted = staging / "converted"
    converted.mkdir()
    summary = convert(weights, read_config(config_path), model_base_modules(model), converted, model.source)
    adapter, created = _register(context, model, converted, summary, record)
    return adapter, created, summary.notes


def _register(
    context: "JobContext[Any]",
    model: Model,
    converted: Path,
    summary: Any,
    record: AdapterRecord,
) -> tuple[Adapter, bool]:
    """The adapter with this identity for this base: the existing one, or a new row over
    files published under `adapters/<identity>/` — keyed by identity, not by weights, so
    two adapters sharing weights never share a config file."""
    store, sessions = context.runtime.artifacts, context.runtime.sessions
    artifact = f"adapters/{summary.identity}"
    with sessions() as session:
        existing = find_adapter(session, model.id, summary.identity)
    if existing is not None:
        return existing, False
    published = store.publish_folder(artifact, converted)
    adapter = Adapter(
        id=new_id("adp"),
        name=record.name,
        base_model_id=model.id,
        source_kind=record.source_kind,
        source=record.source,
        tinker_path=record.tinker_path,
        tinker_run_id=record.tinker_run_id,
        r=summary.r,
        lora_alpha=summary.lora_alpha,
        target_modules=summary.target_modules,
        sha256=summary.sha256,
        identity=summary.identity,
        size_bytes=summary.size_bytes,
        artifact=artifact,
        conversion={"notes": summary.notes},
        training=record.provenance,
        import_job_id=context.job_id,
    )
    try:
        with sessions() as session, session.begin():
            session.add(adapter)
    except IntegrityError:
        with sessions() as session:
            existing = find_adapter(session, model.id, summary.identity)
        if existing is not None:  # the same adapter was registered meanwhile
            return existing, False
        _unpublish(context, artifact, published)
        raise
    except BaseException:
        _unpublish(context, artifact, published)
        raise
    return adapter, True


def _unpublish(context: "JobContext[Any]", artifact: str, published: bool) -> None:
    """Files this attempt published, removed when no row came to name them."""
    with context.runtime.sessions() as session:
        if published and not artifact_in_use(session, artifact):
            context.runtime.artifacts.delete_prefix(artifact)


def os_failure(error: OSError) -> JobFailed | None:
    """The job failure an operating-system error stands for when it is about the machine, not
    a bug — with a message naming the problem and no path of the server; None otherwise."""
    if disk_full(error) and error.errno is not None:
        return JobFailed(
            "store_full",
            "no space is left on the worker's disk or in the artifact store for this adapter; free some and import it again",
            errno=errno.errorcode[error.errno],
        )
    if error.errno == errno.EFBIG:
        return JobFailed(
            "too_large", "a file of the adapter is larger than the worker's filesystem accepts", errno="EFBIG"
        )
    if error.errno == errno.ENAMETOOLONG:
        return JobFailed(
            "name_too_long",
            "a file name of the adapter is longer than the worker's filesystem accepts",
            errno="ENAMETOOLONG",
        )
    return None


def _remove_earlier_attempts(store: ArtifactStore, job_id: str, attempt: int) -> None:
    """Scratch folders of this job's earlier attempts: a worker taken for lost cannot have
    removed its own, and this one knows their names."""
    for earlier in range(1, attempt):
        shutil.rmtree(store.scratch_root / f"{job_id}-{earlier}", ignore_errors=True)


def run(context: "JobContext[AdapterImportParameters]") -> dict[str, Any]:
    try:
        adapter, created, notes = _import(context)
    except AttemptSuperseded:
        raise  # the job runs again elsewhere, and needs its upload
    except BaseException as exc:
        _drop_upload(context)
        failure = os_failure(exc) if isinstance(exc, OSError) else None
        if failure is not None:
            raise failure from exc
        raise
    _drop_upload(context)
    return {
        "adapter_id": adapter.id,
        "sha256": adapter.sha256,
        "identity": adapter.identity,
        "created": created,
        "conversion_notes": notes,
    }


def _import(context: "JobContext[AdapterImportParameters]") -> tuple[Adapter, bool, list[str]]:
    store, sessions = context.runtime.artifacts, context.runtime.sessions
    with sessions() as session:
        model = subject_row(session, Model, context.params.base_model_id, "model")
    _remove_earlier_attempts(store, context.job_id, context.attempt)
    with store.scratch(f"{context.job_id}-{context.attempt}") as staging:  # attempts never share one
        context.progress("fetching", 0, 3)
        files, provenance = _fetch(context, model, staging)
        context.progress("converting", 1, 3)
        params = context.params
        record = AdapterRecord(
            name=params.name,
            source_kind=params.source_kind,
            source=params.source,
            provenance=provenance | {"user": params.metadata},
            tinker_path=params.source if params.source_kind == "tinker" else None,
            tinker_run_id=params.tinker_run_id,
        )
        adapter, created, notes = register_adapter(context, model, files, staging, record)
        context.progress("done", 3, 3)
    return adapter, created, notes


def _drop_upload(context: "JobContext[AdapterImportParameters]") -> None:
    """An uploaded archive is read by its job's one finishing attempt, then removed."""
    if context.params.upload:
        context.runtime.artifacts.delete(context.params.upload)
