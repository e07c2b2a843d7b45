"""What deleting a resource takes with it (`plan`), which unfinished jobs it would pull the
ground from under (`unfinished_jobs`), and the removal of the rows (`delete_rows`), which
answers with the artifacts they leave for the janitor's safe path.

A resource takes with it everything computed from it: a model its adapters, extractions,
probe runs, probes, evaluations, comparisons (also those of another base that compare one of
its adapters), transfers, fine-tunes, experiments and cache spaces; a dataset the
extractions, probe runs, probes, evaluations, comparisons, transfers and fine-tunes made
from its rows; a probe run its probes; a probe its evaluations, and its run once the run has
no other probe left. Kinds are named as the API names them, which are also the top-level
folders of their artifacts (`probe_runs/<id>/`, `evaluations/<id>/`…)."""

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy import delete as delete_statement
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.registry.cache_spaces import forget_models
from app.registry.tables import (
    Adapter,
    Base,
    Comparison,
    Dataset,
    Experiment,
    Extraction,
    Finetune,
    Job,
    Model,
    Probe,
    ProbeEvaluation,
    ProbeRun,
    Transfer,
)

CHUNK = 500  # ids in one IN (…) list
UNFINISHED = ("queued", "running")

TABLES: dict[str, type[Base]] = {
    "models": Model,
    "datasets": Dataset,
    "adapters": Adapter,
    "extractions": Extraction,
    "probe_runs": ProbeRun,
    "probes": Probe,
    "evaluations": ProbeEvaluation,
    "comparisons": Comparison,
    "transfers": Transfer,
    "finetunes": Finetune,
    "experiments": Experiment,
}
# kinds whose artifacts are the folder `<kind>/<id>/`, whether or not their row names it yet
# (a failed or cancelled job may have left files there)
ID_FOLDERS = ("extractions", "probe_runs", "probes", "evaluations", "comparisons", "transfers", "finetunes")
# children before parents: the order that never breaks a foreign key
DELETION_ORDER = (
    "evaluations",
    "probes",
    "probe_runs",
    "extractions",
    "comparisons",
    "transfers",
    "finetunes",
    "experiments",
    "adapters",
    "datasets",
    "models",
)


@dataclass
class Doomed:
    """Ids of the rows a deletion removes, by kind."""

    ids: dict[str, set[str]] = field(default_factory=lambda: {kind: set() for kind in TABLES})

    def dependants(self, kind: str, resource_id: str) -> dict[str, list[str]]:
        """Everything but the resource itself, by kind, for a refusal to name."""
        others = {other: ids - {resource_id} if other == kind else ids for other, ids in self.ids.items()}
        return {other: sorted(ids) for other, ids in others.items() if ids}


@dataclass(frozen=True)
class LeftArtifacts:
    """What the deleted rows' artifacts were: single objects and folders."""

    keys: list[str]
    folders: list[str]


def _chunks(ids: Collection[str]) -> Iterable[list[str]]:
    ordered = sorted(ids)
    for start in range(0, len(ordered), CHUNK):
        yield ordered[start : start + CHUNK]


def _ids_where(
    session: Session, id_column: InstrumentedAttribute[str], column: Any, values: Collection[str]
) -> set[str]:
    found: set[str] = set()
    for chunk in _chunks(values):
        found.update(session.scalars(select(id_column).where(column.in_(chunk))))
    return found


def _comparisons_of_adapters(session: Session, adapter_ids: set[str]) -> set[str]:
    return {
        comparison_id
        for comparison_id, compared in session.execute(select(Comparison.id, Comparison.adapter_ids))
        if adapter_ids.intersection(compared)
    }


def _transfers_of_datasets(session: Session, dataset_ids: set[str]) -> set[str]:
    return {
        transfer_id
        for transfer_id, train, test in session.execute(
            select(Transfer.id, Transfer.train_dataset_ids, Transfer.test_dataset_ids)
        )
        if dataset_ids.intersection(train) or dataset_ids.intersection(test)
    }


def _made_from(session: Session, kind: str, ids: set[str]) -> dict[str, set[str]]:
    """The rows of each kind computed from these rows of `kind`."""
    if kind == "models":
        return {
            "adapters": _ids_where(session, Adapter.id, Adapter.base_model_id, ids),
            "extractions": _ids_where(session, Extraction.id, Extraction.model_id, ids),
            "probe_runs": _ids_where(session, ProbeRun.id, ProbeRun.model_id, ids),
            "probes": _ids_where(session, Probe.id, Probe.model_id, ids),
            "evaluations": _ids_where(session, ProbeEvaluation.id, ProbeEvaluation.model_id, ids),
            "comparisons": _ids_where(session, Comparison.id, Comparison.model_id, ids),
            "transfers": _ids_where(session, Transfer.id, Transfer.model_id, ids),
            "finetunes": _ids_where(session, Finetune.id, Finetune.base_model_id, ids),
            "experiments": _ids_where(session, Experiment.id, Experiment.model_id, ids),
        }
    if kind == "adapters":
        # an adapter's own extractions, probes… are its base model's, doomed with it
        return {"comparisons": _comparisons_of_adapters(session, ids)}
    if kind == "datasets":
        return {
            "extractions": _ids_where(session, Extraction.id, Extraction.dataset_id, ids),
            "probe_runs": _ids_where(session, ProbeRun.id, ProbeRun.dataset_id, ids),
            "probes": _ids_where(session, Probe.id, Probe.dataset_id, ids),
            "evaluations": _ids_where(session, ProbeEvaluation.id, ProbeEvaluation.dataset_id, ids),
            "comparisons": _ids_where(session, Comparison.id, Comparison.dataset_id, ids),
            "transfers": _transfers_of_datasets(session, ids),
            "finetunes": _ids_where(session, Finetune.id, Finetune.dataset_id, ids),
        }
    if kind == "probe_runs":
        return {"probes": _ids_where(session, Probe.id, Probe.run_id, ids)}
    if kind == "probes":
        return {"evaluations": _ids_where(session, ProbeEvaluation.id, ProbeEvaluation.probe_id, ids)}
    return {}


def plan(session: Session, kind: str, resource_id: str) -> Doomed:
    """Every row that goes when the `kind` row `resource_id` goes (`kind` in `TABLES`)."""
    doomed = Doomed()
    doomed.ids[kind].add(resource_id)
    pending: list[tuple[str, set[str]]] = [(kind, {resource_id})]
    while pending:
        parent_kind, parent_ids = pending.pop()
        for child_kind, child_ids in _made_from(session, parent_kind, parent_ids).items():
            new = child_ids - doomed.ids[child_kind]
            if new:
                doomed.ids[child_kind] |= new
                pending.append((child_kind, new))
    # a run whose last probe goes is gone too: its sweep compares probes that no longer exist
    touched_runs = _ids_where(session, Probe.run_id, Probe.id, doomed.ids["probes"]) - doomed.ids["probe_runs"]
    keeping_probes: set[str] = set()
    for chunk in _chunks(touched_runs):
        keeping_probes.update(
            run_id
            for probe_id, run_id in session.execute(select(Probe.id, Probe.run_id).where(Probe.run_id.in_(chunk)))
            if probe_id not in doomed.ids["probes"]
        )
    doomed.ids["probe_runs"] |= touched_runs - keeping_probes
    return doomed


def unfinished_jobs(session: Session, doomed: Doomed) -> list[str]:
    """Queued or running jobs that work on a doomed row or read one: the jobs of the rows
    themselves, of the runs writing doomed probes, jobs on a doomed model, scoring with a
    doomed probe, and experiments reading a doomed dataset."""
    own_jobs: set[str] = set()
    for kind in ("extractions", "probe_runs", "evaluations", "comparisons", "transfers", "finetunes", "experiments"):
        table: Any = TABLES[kind]
        own_jobs |= _ids_where(session, table.job_id, table.id, doomed.ids[kind])
    own_jobs |= _ids_where(
        session, ProbeRun.job_id, ProbeRun.id, _ids_where(session, Probe.run_id, Probe.id, doomed.ids["probes"])
    )
    models, probes, datasets = doomed.ids["models"], doomed.ids["probes"], doomed.ids["datasets"]
    found = []
    for job_id, kind, model_id in session.execute(
        select(Job.id, Job.kind, Job.model_id).where(Job.status.in_(UNFINISHED)).order_by(Job.id)
    ):
        if job_id in own_jobs or model_id in models:
            found.append(job_id)
        elif (kind == "probe_scoring" and probes) or (kind == "experiment" and datasets):
            params = session.scalar(select(Job.params).where(Job.id == job_id)) or {}
            if params.get("probe_id") in probes or params.get("dataset") in datasets:
                found.append(job_id)
    return found


def jobs_using_adapter(session: Session, adapter_id: str) -> list[str]:
    """Queued or running jobs that read the adapter: the jobs of extractions, probe runs,
    evaluations, transfers, experiments and comparisons of it, scoring with a probe of it,
    and parts computing its states."""
    own_jobs: set[str] = set()
    for table in (Extraction, ProbeRun, ProbeEvaluation, Transfer, Experiment):
        column: Any = table
        own_jobs.update(session.scalars(select(column.job_id).where(column.adapter_id == adapter_id)))
    own_jobs |= {
        job_id
        for job_id, compared in session.execute(select(Comparison.job_id, Comparison.adapter_ids))
        if adapter_id in (compared or [])
    }
    probes = set(session.scalars(select(Probe.id).where(Probe.adapter_id == adapter_id)))
    found = []
    for job_id, kind in session.execute(select(Job.id, Job.kind).where(Job.status.in_(UNFINISHED)).order_by(Job.id)):
        if job_id in own_jobs:
            found.append(job_id)
        elif kind in ("states_part", "probe_scoring"):
            params = session.scalar(select(Job.params).where(Job.id == job_id)) or {}
            if params.get("adapter_id") == adapter_id or params.get("probe_id") in probes:
                found.append(job_id)
    return found


def _column_values(session: Session, column: Any, id_column: Any, ids: Collection[str]) -> list[str]:
    values: list[str] = []
    for chunk in _chunks(ids):
        values.extend(value for value in session.scalars(select(column).where(id_column.in_(chunk))) if value)
    return values


def _delete_ids(session: Session, table: Any, ids: Collection[str]) -> None:
    for chunk in _chunks(ids):
        condition: ColumnElement[bool] = table.id.in_(chunk)
        session.execute(delete_statement(table).where(condition))


def delete_rows(session: Session, doomed: Doomed) -> LeftArtifacts:
    """Delete every doomed row (and a doomed model's cache entries); what their artifacts
    were, to remove once this transaction has committed."""
    keys = _column_values(session, Dataset.artifact, Dataset.id, doomed.ids["datasets"])
    folders = _column_values(session, Adapter.artifact, Adapter.id, doomed.ids["adapters"])
    folders += [f"{kind}/{row_id}" for kind in ID_FOLDERS for row_id in sorted(doomed.ids[kind])]
    for chunk in _chunks(doomed.ids["probes"]):
        session.execute(
            update(ProbeRun).where(ProbeRun.best_probe_id.in_(chunk)).values(best_probe_id=None)
        )  # a run that keeps other probes has no best one any more
    for kind in DELETION_ORDER:
        if kind == "models":
            # each shard's folder, rather than the shard: failed attempts' shards lie beside it
            folders += sorted({shard.rsplit("/", 1)[0] for shard in forget_models(session, doomed.ids["models"])})
            for chunk in _chunks(doomed.ids["models"]):
                session.execute(update(Job).where(Job.model_id.in_(chunk)).values(model_id=None))
        _delete_ids(session, TABLES[kind], doomed.ids[kind])
    return LeftArtifacts(keys=keys, folders=folders)
