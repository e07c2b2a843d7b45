"""Where an adapter import may read from, decided before any job is queued: Tinker paths
(external weights only), folders and archives under the configured roots, and `https` URLs
on the configured hosts."""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from app.errors import ServiceError, invalid_field
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
    if kind == "weights":
        raise invalid_field(
            "source",
            "weights checkpoints hold training state and are not importable: load them in a training session, save "
            "them as external weights, and import tinker://…/external_weights/…",
            tinker_kind=kind,
        )
    if kind != "external_weights":
        raise invalid_field("source", f"unknown Tinker checkpoint kind {kind!r} (external_weights, sampler_weights or weights)")
    if not settings.tinker_api_key:
        raise ServiceError(503, "unavailable", "Tinker imports need the TINKER_API_KEY setting, which is not set", setting="TINKER_API_KEY")
    return AdapterSource(kind="tinker", location=source, tinker_run_id=match["run_id"])


def _url_source(source: str, settings: Settings) -> AdapterSource:
    parts = urlsplit(source)
    if parts.scheme != "https":
        raise invalid_field("source", f"only https URLs are imported, not {parts.scheme}://")
    host = (parts.hostname or "").lower()
    if host not in {allowed.lower() for allowed in settings.adapter_url_hosts}:
        raise ServiceError(403, "forbidden", f"source: {host!r} is not on the allow-list of adapter hosts (ADAPTER_URL_HOSTS)", field="source", host=host)
    return AdapterSource(kind="url", location=source)


def _local_source(source: str, settings: Settings) -> AdapterSource:
    try:
        path = Path(source).expanduser().resolve()
        exists, is_folder = path.exists(), path.is_dir()
    except (OSError, ValueError) as exc:  # too long, or a NUL byte
        raise invalid_field("source", f"not a usable path: {exc}") from exc
    roots = [root.expanduser().resolve() for root in settings.adapter_roots]
    if not any(path.is_relative_to(root) for root in roots):
        raise ServiceError(
            403, "forbidden", f"source: {str(path)!r} is outside the folders adapters may be imported from (ADAPTER_ROOTS)", field="source"
        )
    if not exists:
        raise ServiceError(404, "not_found", f"source: no such file or folder {str(path)!r}", field="source")
    return AdapterSource(kind="local_folder" if is_folder else "local_archive", location=str(path))


def classify_source(source: str, settings: Settings) -> AdapterSource:
    if source.startswith("tinker://"):
        return _tinker_source(source, settings)
    if "://" in source:
        return _url_source(source, settings)
    return _local_source(source, settings)
