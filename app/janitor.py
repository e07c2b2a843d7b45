"""The janitor: removes artifacts no registry row refers to.

Writes are atomic and rows are committed only after their files, so orphans come only from
work that stopped half-way: a worker killed between publishing a folder and committing its
row, a temporary name a killed writer never renamed, an uploaded archive whose import job
was cancelled before it ran, a scratch folder of a job that died. They are harmless to
readers but take space, and the store should hold exactly what the registry describes.
Two kinds of leftover are not objects at all: on a bucket, a multipart upload a killed
worker never completed or aborted (its parts are invisible, yet stored and billed); and on
each machine, the local temporaries of a killed process — files being prepared for upload,
downloads being received, scratch folders (on a folder store, only their empty folders: their
files are objects).

An object is removed only when nothing refers to it *and* it is older than both the grace
period and the start of the oldest running job — so the files of a job still at work, not
yet registered, are never touched; an upload or a local temporary goes only when nothing
has happened to it since that same cutoff. Only the service's own top-level folders are
looked at; anything else in a shared bucket is left alone.

`sweep` runs on one machine a turn and sees only that machine's temporaries; `sweep_local`
is the part for every other machine."""

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.registry.tables import (
    Adapter,
    CacheShard,
    Comparison,
    Dataset,
    Extraction,
    Finetune,
    Job,
    Probe,
    ProbeEvaluation,
    ProbeRun,
    Transfer,
    utcnow,
)
from app.schemas.jobs import TERMINAL_STATUSES
from app.storage import ArtifactStore

log = logging.getLogger("app.janitor")

SERVICE_FOLDERS = (
    "adapters",
    "cache",
    "comparisons",
    "datasets",
    "evaluations",
    "extractions",
    "finetunes",
    "probe_runs",
    "probes",
    "staging",
    "transfers",
)


@dataclass
class SweepReport:
    """What a sweep removed (or, in a dry run, would remove), and the cutoff it used."""

    cutoff: datetime
    dry_run: bool = False
    removed: list[str] = field(default_factory=list)  # keys of orphan objects
    aborted_uploads: list[str] = field(default_factory=list)  # keys of stale incomplete uploads
    local_removed: list[str] = field(default_factory=list)  # paths of this machine's temporaries
    cache_evicted: list[str] = field(default_factory=list)  # paths of this machine's least recently used copies
    freed_bytes: int = 0  # by all four
    kept: int = 0  # objects left in place

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values."""
        return {
            "dry_run": self.dry_run,
            "cutoff": self.cutoff.isoformat(),
            "removed": self.removed,
            "aborted_uploads": self.aborted_uploads,
            "local_removed": self.local_removed,
            "cache_evicted": self.cache_evicted,
            "freed_bytes": self.freed_bytes,
            "kept": self.kept,
        }


def referenced(session: Session) -> tuple[set[str], tuple[str, ...]]:
    """Keys the registry refers to, and folder prefixes (with their trailing slash) whose
    contents it refers to."""
    files: set[str] = set()
    for column in (Dataset.artifact, Extraction.artifact):
        files.update(key for key in session.scalars(select(column)) if key is not None)
    files.update(session.scalars(select(CacheShard.path)))
    for params in session.scalars(select(Job.params).where(Job.status.not_in(sorted(TERMINAL_STATUSES)))):
        if isinstance(params, dict) and isinstance(params.get("upload"), str):
            files.add(params["upload"])  # an uploaded archive its import job has yet to read
    folders = {
        f"{prefix.rstrip('/')}/"
        for column in (
            Adapter.artifact,
            Finetune.artifact,
            Probe.artifact,
            ProbeEvaluation.artifact,
            ProbeRun.artifact,
            Transfer.artifact,
        )
        for prefix in session.scalars(select(column))
        if prefix is not None
    }
    # a comparison's folder holds its report and the renderings of it
    folders.update(
        f"{key.rsplit('/', 1)[0]}/" for key in session.scalars(select(Comparison.artifact)) if key is not None
    )
    return files, tuple(sorted(folders))


def cutoff_time(session: Session, grace_s: float) -> datetime:
    """Objects modified after this may belong to work in progress."""
    cutoff = utcnow() - timedelta(seconds=grace_s)
    oldest_running = session.scalar(select(func.min(Job.started_at)).where(Job.status == "running"))
    return min(cutoff, oldest_running) if oldest_running is not None else cutoff


def sweep(sessions: sessionmaker[Session], store: ArtifactStore, grace_s: float, dry_run: bool = False) -> SweepReport:
    """Remove (or, with `dry_run`, list) every orphan object and stale incomplete upload older
    than the cutoff, and this machine's stale temporaries."""
    with sessions() as session:
        cutoff = cutoff_time(session, grace_s)
        files, folders = referenced(session)
    report = SweepReport(cutoff=cutoff, dry_run=dry_run)
    for folder in SERVICE_FOLDERS:
        for stored in list(store.iter_objects(folder)):
            in_use = not stored.partial and (stored.key in files or stored.key.startswith(folders))
            if in_use or stored.modified >= cutoff:
                report.kept += 1
                continue
            if not dry_run:
                store.delete(stored.key)
            report.removed.append(stored.key)
            report.freed_bytes += stored.size
        # an upload never completed holds no artifact, whatever its key: only its age matters
        for upload in store.list_multipart_uploads(folder):
            if upload.last_activity >= cutoff:
                continue
            if not dry_run:
                store.abort_multipart_upload(upload.key, upload.upload_id)
            report.aborted_uploads.append(upload.key)
            report.freed_bytes += upload.size
    if report.removed or report.aborted_uploads:
        log.info(
            "artifact sweep %s %d orphan objects and %d incomplete uploads (%d bytes)",
            "found" if dry_run else "removed",
            len(report.removed),
            len(report.aborted_uploads),
            report.freed_bytes,
        )
    remove_local_leftovers(store, report)
    return report


def remove_unreferenced(
    sessions: sessionmaker[Session], store: ArtifactStore, keys: Iterable[str] = (), folders: Iterable[str] = ()
) -> list[str]:
    """Remove the objects `keys` and everything under `folders` that no registry row refers
    to, as a sweep would, and say what went (a folder removed whole ends in `/`): the safe
    path for what a deletion let go, called once its rows are committed. Artifacts can be
    shared (an adapter's files by adapters of the same weights on other bases, a cache shard
    by other spaces), so each is checked against the registry, not assumed to be free. No
    grace period: a folder named by a deleted row's id cannot be claimed again, and what
    is named by content (a dataset, an adapter, a shard) is kept if a row refers to it at
    the moment of the check. Rows go first, so a removal that fails half-way leaves orphans
    for the next sweep, never a row without its files."""
    with sessions() as session:
        files, referenced_folders = referenced(session)
    removed: list[str] = []
    for key in keys:
        if key not in files and not key.startswith(referenced_folders):
            store.delete(key)
            removed.append(key)
    for folder in folders:
        prefix = f"{folder.rstrip('/')}/"
        if prefix.startswith(referenced_folders):
            continue  # inside (or the same as) a folder a row refers to
        if not any(key.startswith(prefix) for key in files) and not any(
            inner.startswith(prefix) for inner in referenced_folders
        ):
            store.delete_prefix(folder)
            removed.append(prefix)
            continue
        for stored in list(store.iter_objects(folder)):
            # a temporary may be a live writer's, in a folder others still use: the sweep's to judge
            if not stored.partial and stored.key not in files and not stored.key.startswith(referenced_folders):
                store.delete(stored.key)
                removed.append(stored.key)
    if removed:
        log.info("removed %d deleted artifacts", len(removed))
    return removed


def sweep_local(
    sessions: sessionmaker[Session], store: ArtifactStore, grace_s: float, dry_run: bool = False
) -> SweepReport:
    """Remove (or list) this machine's stale temporaries only: for every machine that runs
    workers, since a deployment-wide `sweep` sees the temporaries of its own machine alone."""
    with sessions() as session:
        report = SweepReport(cutoff=cutoff_time(session, grace_s), dry_run=dry_run)
    remove_local_leftovers(store, report)
    return report


def remove_local_leftovers(store: ArtifactStore, report: SweepReport) -> None:
    """This machine's temporaries untouched since the report's cutoff go (unless it is a dry
    run), into the report."""
    freed = 0
    for leftover in store.local_leftovers(report.cutoff):
        if report.dry_run or store.remove_local_leftover(leftover):
            report.local_removed.append(str(leftover.path))
            freed += leftover.size
    report.freed_bytes += freed
    if report.local_removed:
        log.info(
            "artifact sweep %s %d local temporaries (%d bytes)",
            "found" if report.dry_run else "removed",
            len(report.local_removed),
            freed,
        )
    evicted = store.trim_local_cache(report.cutoff, dry_run=report.dry_run)
    report.cache_evicted += [str(copy.path) for copy in evicted]
    report.freed_bytes += sum(copy.size for copy in evicted)
    if evicted:
        log.info(
            "artifact sweep %s %d cached copies over the cache limit",
            "would evict" if report.dry_run else "evicted",
            len(evicted),
        )
