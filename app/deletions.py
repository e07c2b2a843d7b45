"""Deleting a model, dataset, extraction, probe, comparison or transfer (`DELETE /v1/<kind>/{id}`).

Every deletion refuses with 409 while a queued or running job works on what it would
remove; a model or dataset also refuses while results computed from it exist (its
adapters, extractions, probes…): deleting an input should not silently take weeks of
results with it. `force=true` deletes anyway — the resource, everything computed from it
(`app/registry/deletions.py` says what that is), and a model's cache entries — and cancels
the unfinished jobs, whose work would have nowhere to go. The rows go in one transaction,
then their artifacts through the janitor's safe path (`janitor.remove_unreferenced`): rows
first, so that a failure in between leaves orphan files the next sweep removes, and never a
row pointing at files that are gone."""

import logging
from typing import Any

import redis
from sqlalchemy.orm import Session, sessionmaker

from app import janitor, jobs
from app.errors import ServiceError, not_found
from app.registry.database import transaction
from app.registry.deletions import TABLES, delete_rows, plan, unfinished_jobs
from app.schemas.common import ErrorOut
from app.settings import Settings
from app.storage import ArtifactStore, StoreUnavailable

log = logging.getLogger("app.deletions")

SINGULAR = {
    "models": "model",
    "datasets": "dataset",
    "extractions": "extraction",
    "probes": "probe",
    "comparisons": "comparison",
    "transfers": "transfer",
}
# inputs, which refuse (without force) while results computed from them exist
REFUSED_WHILE_USED = frozenset({"models", "datasets"})
LISTED_IDS = 100  # per kind, in a refusal's details

DELETE_RESPONSES: dict[int | str, dict[str, Any]] = {
    204: {"description": "Deleted, with everything computed from it."},
    409: {
        "model": ErrorOut,
        "description": "An unfinished job uses it (`details.used_by`: job ids), or — for a model or dataset — results "
        "computed from it exist (`details.referenced_by`: ids by kind, `details.referenced_counts`); "
        "`?force=true` deletes anyway, with those results, and cancels the jobs.",
    },
}


def _refusal(kind: str, resource_id: str, used_by: list[str], referenced_by: dict[str, list[str]]) -> ServiceError:
    reasons = []
    if used_by:
        reasons.append(f"is used by {len(used_by)} unfinished job(s)")
    if referenced_by:
        made = ", ".join(f"{len(ids)} {other}" for other, ids in referenced_by.items())
        reasons.append(f"has {made} made from it")
    return ServiceError(
        409,
        "conflict",
        f"{SINGULAR[kind]} {resource_id} {' and '.join(reasons)}; pass force=true to delete "
        + ("it with them" if referenced_by else "it anyway"),
        used_by=used_by,
        referenced_by={other: ids[:LISTED_IDS] for other, ids in referenced_by.items()},
        referenced_counts={other: len(ids) for other, ids in referenced_by.items()},
    )


def delete_resource(
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    connection: redis.Redis,
    settings: Settings,
    kind: str,
    resource_id: str,
    force: bool,
) -> None:
    """Delete the `kind` row `resource_id` (a key of `SINGULAR`) as the module says: 404
    when there is none, 409 when it is in use and not `force`."""
    with transaction(sessions) as session:
        if session.get(TABLES[kind], resource_id) is None:
            raise not_found(SINGULAR[kind], resource_id)
        doomed = plan(session, kind, resource_id)
        used_by = unfinished_jobs(session, doomed)
        referenced_by = doomed.dependants(kind, resource_id) if kind in REFUSED_WHILE_USED else {}
        if (used_by or referenced_by) and not force:
            raise _refusal(kind, resource_id, used_by, referenced_by)
        left = delete_rows(session, doomed)
    for job_id in used_by:
        try:
            jobs.cancel(sessions, connection, settings, job_id)
        except ServiceError:
            pass  # it finished meanwhile
    removed = ", ".join(f"{len(ids)} {other}" for other, ids in doomed.ids.items() if ids)
    log.info("deleted %s %s: %s", SINGULAR[kind], resource_id, removed)
    try:
        janitor.remove_unreferenced(sessions, store, left.keys, left.folders)
    except (StoreUnavailable, OSError) as exc:
        # the rows are gone; what is left of their files is an orphan the next sweep removes
        log.warning("the artifacts of deleted %s %s were left for the janitor: %s", SINGULAR[kind], resource_id, exc)
