"""The janitor: removes artifacts no registry row refers to.

Writes are atomic and rows are committed only after their files, so orphans come only from
work that stopped half-way: a worker killed between publishing a folder and committing its
row, a temporary name a killed writer never renamed, an uploaded archive whose import job
was cancelled before it ran, a scratch folder of a job that died. They are harmless to
readers but take space, and the store should hold exactly what the registry describes.

An object is removed only when nothing refers to it *and* it is older than both the grace
period and the start of the oldest running job — so the files of a job still at work, not
yet registered, are never touched. Only the service's own top-level folders are looked at;
anything else in a shared bucket is left alone."""

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.registry.tables import (
    Adapter,
    CachedHiddenState,
    Comparison,
    Dataset,
    Extraction,
    Job,
    Probe,
    ProbeRun,
    utcnow,
)
from app.storage import ArtifactStore

log = logging.getLogger("app.janitor")

SERVICE_FOLDERS = ("adapters", "cache", "comparisons", "datasets", "extractions", "probe_runs", "probes", "staging")
TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class SweepReport:
    cutoff: datetime
    removed: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept: int = 0


def referenced(session: Session) -> tuple[set[str], tuple[str, ...]]:
    """Keys the registry refers to, and folder prefixes (with their trailing slash) whose
    contents it refers to."""
    files: set[str] = set()
    for column in (Dataset.artifact, Extraction.artifact):
        files.update(key for key in session.scalars(select(column).where(column.is_not(None))))
    files.update(session.scalars(select(CachedHiddenState.shard).distinct()))
    for params in session.scalars(select(Job.params).where(Job.status.not_in(TERMINAL))):
        if isinstance(params, dict) and isinstance(params.get("upload"), str):
            files.add(params["upload"])  # an uploaded archive its import job has yet to read
    folders = {f"{prefix.rstrip('/')}/" for column in (Adapter.artifact, Probe.artifact, ProbeRun.artifact) for prefix in session.scalars(select(column).where(column.is_not(None)))}
    # a comparison's folder holds its report and the renderings of it
    folders.update(f"{key.rsplit('/', 1)[0]}/" for key in session.scalars(select(Comparison.artifact).where(Comparison.artifact.is_not(None))))
    return files, tuple(sorted(folders))


def cutoff_time(session: Session, grace_s: float) -> datetime:
    """Objects modified after this may belong to work in progress."""
    cutoff = utcnow() - timedelta(seconds=grace_s)
    oldest_running = session.scalar(select(func.min(Job.started_at)).where(Job.status == "running"))
    return min(cutoff, oldest_running) if oldest_running is not None else cutoff


def sweep(sessions: sessionmaker[Session], store: ArtifactStore, grace_s: float, dry_run: bool = False) -> SweepReport:
    """Remove (or, with `dry_run`, list) every orphan object older than the cutoff."""
    with sessions() as session:
        cutoff = cutoff_time(session, grace_s)
        files, folders = referenced(session)
    report = SweepReport(cutoff=cutoff)
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
    if report.removed:
        log.info("artifact sweep %s %d orphan objects (%d bytes)", "found" if dry_run else "removed", len(report.removed), report.freed_bytes)
    return report
