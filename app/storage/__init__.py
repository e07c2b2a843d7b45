"""The artifact store: datasets, hidden states, adapters, probes, reports.

One interface (`ArtifactStore`, in `base`), three places, chosen by the `ARTIFACT_STORE`
setting: a folder on this machine (the default), a folder on a shared filesystem, or an
S3-compatible bucket.
"""

from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from app.storage.base import (
    PARTIAL_SUFFIX,
    ArtifactMissing,
    ArtifactStore,
    LocalLeftover,
    PendingUpload,
    StoredObject,
    StoreUnavailable,
)
from app.storage.folder import FolderStore

if TYPE_CHECKING:
    from app.settings import Settings

__all__ = [
    "PARTIAL_SUFFIX",
    "ArtifactMissing",
    "ArtifactStore",
    "FolderStore",
    "LocalLeftover",
    "PendingUpload",
    "StoreUnavailable",
    "StoredObject",
    "open_store",
]


def open_store(settings: "Settings") -> ArtifactStore:
    """The store the settings name (checked when the settings were read)."""
    if settings.artifact_store is None:
        return FolderStore(settings.resolved_artifact_dir)
    url = urlsplit(settings.artifact_store)
    if url.scheme == "file":
        return FolderStore(settings.resolved_artifact_dir, durable=True)
    from app.storage.bucket import BucketStore

    return BucketStore(
        url.netloc,
        unquote(url.path).strip("/"),
        settings.resolved_artifact_cache_dir,
        endpoint_url=settings.s3_endpoint_url,
        cache_max_bytes=settings.artifact_cache_max_mb * 2**20 or None,
    )
