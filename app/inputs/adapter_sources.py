"""Where an adapter import may read from, decided before any job is queued: Tinker paths
(external weights, and training state the worker exports first), folders and archives under the configured roots — regular files
only, so no worker blocks on a FIFO or reads a device for ever — and `https` URLs on the
configured hosts."""

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from app.errors import ServiceError, invalid_field
from app.inputs.user_files import NotARegularFile, file_kind, regular_file_or_none
from app.settings import Settings

TINKER_PATH = re.compile(r"^tinker://(?P<run_id>[^/]+)/(?P<kind>[^/]+)/(?P<name>[^/]+)$")
SourceKind = Literal["tinker", "local_folder", "local_archive", "url", "upload"]


@dataclass(frozen=True)
class AdapterSource:
    kind: SourceKind
    location: str  # the tinker path, the resolved local path, or the URL
    tinker_run_id: str | None = None


def _tinker_source(source: str, settings: Settings) -> AdapterSource:
    match = TINKER_PATH.match(source)
    if match is None:
        raise invalid_field("source", "a Tinker path has exactly three parts: tinker://<run_id>/<kind>/<name>")
    kind = match["kind"]
    if kind == "sampler_weights":
        raise invalid_field(
            "source",
            "sampler_weights checkpoints cannot be downloaded with the current Tinker SDK: save the checkpoint as "
            "external weights and import tinker://…/external_weights/…, or upload the legacy .tar archive you "
            "already have with POST /v1/adapters/upload",
            tinker_kind=kind,
        )
    if kind not in ("external_weights", "weights"):
        raise invalid_field(
            "source", f"unknown Tinker checkpoint kind {kind!r} (external_weights, sampler_weights or weights)"
        )
    require_tinker_key(settings, "Tinker imports")
    return AdapterSource(kind="tinker", location=source, tinker_run_id=match["run_id"])


def require_tinker_key(settings: Settings, what: str) -> None:
    """A 503 naming the setting when the service has no Tinker API key for `what`."""
    if not settings.tinker_api_key:
        raise ServiceError(
            503,
            "unavailable",
            f"{what} need the TINKER_API_KEY setting, which is not set",
            setting="TINKER_API_KEY",
        )


def _url_source(source: str, settings: Settings) -> AdapterSource:
    parts = urlsplit(source)
    if parts.scheme != "https":
        raise invalid_field("source", f"only https URLs are imported, not {parts.scheme}://")
    host = (parts.hostname or "").lower()
    if host not in {allowed.lower() for allowed in settings.adapter_url_hosts}:
        raise ServiceError(
            403,
            "forbidden",
            f"source: {host!r} is not on the allow-list of adapter hosts (ADAPTER_URL_HOSTS)",
            field="source",
            host=host,
        )
    return AdapterSource(kind="url", location=source)


def _local_source(source: str, settings: Settings) -> AdapterSource:
    try:
        path = Path(source).expanduser().resolve()
        exists, is_folder = path.exists(), path.is_dir()
    except (OSError, ValueError) as exc:  # too long, or a NUL byte
        reason = (
            exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        )  # an OSError's text repeats the path
        raise invalid_field("source", f"not a usable path: {reason}") from exc
    roots = [root.expanduser().resolve() for root in settings.adapter_roots]
    if not any(path.is_relative_to(root) for root in roots):
        raise ServiceError(
            403,
            "forbidden",
            f"source: {source!r} is outside the folders adapters may be imported from (ADAPTER_ROOTS)",
            field="source",
        )
    if not exists:
        raise ServiceError(404, "not_found", f"source: no such file or folder {source!r}", field="source")
    if is_folder:
        _check_folder(path, settings.max_archive_files)
    else:
        _check_regular_file(path)
    return AdapterSource(kind="local_folder" if is_folder else "local_archive", location=str(path))


def _check_regular_file(path: Path) -> None:
    """A FIFO or a device would hang or never end the worker's read; refused here, where the
    user can still be told."""
    try:
        regular_file_or_none(path)
    except NotARegularFile as exc:
        raise invalid_field(
            "source", f"{exc}; only regular files and folders of them are imported", kind=exc.kind
        ) from exc


def _check_folder(folder: Path, max_entries: int) -> None:
    """Every entry of `folder` (links followed, without opening anything) is a regular file
    or a folder, and there are at most `max_entries` files and as many folders, the limits an
    archive has: the worker reads and walks this folder as it is. Listed entry by entry, so a
    folder of millions of files is refused without being listed whole."""
    counts = {"files": 0, "folders": 0}
    pending = [folder]
    while pending:
        try:
            listing = os.scandir(pending.pop())
        except OSError as exc:
            raise invalid_field("source", f"a folder in it cannot be listed: {exc.strerror}") from exc
        with listing as entries:
            for entry in entries:
                is_folder = entry.is_dir(follow_symlinks=False)
                counts["folders" if is_folder else "files"] += 1
                if max(counts.values()) > max_entries:
                    raise ServiceError(
                        413,
                        "too_many_files",
                        f"source: the folder holds more than {max_entries} files or folders (MAX_ARCHIVE_FILES)",
                        field="source",
                    )
                if is_folder:
                    pending.append(Path(entry.path))
                else:
                    _check_folder_entry(Path(entry.path), folder)


def _check_folder_entry(path: Path, folder: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # a dangling link: nothing there to read, and never chosen as adapter files
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise invalid_field(
            "source",
            f"{str(path.relative_to(folder))!r} in the folder is a {file_kind(mode)}; an adapter folder may hold only regular files and folders",
            kind=file_kind(mode),
        )


def classify_source(source: str, settings: Settings) -> AdapterSource:
    if source.startswith("tinker://"):
        return _tinker_source(source, settings)
    if "://" in source:
        return _url_source(source, settings)
    return _local_source(source, settings)
