"""Experiments in the registry: the row a submitted config makes, and how it is shown with
links to everything it made or reused."""

from sqlalchemy.orm import Session

from app.errors import not_found
from app.registry.tables import Experiment, Job, ProbeRun, new_id
from app.schemas.experiments import ExperimentConfig, ExperimentOut


def new_experiment(config: ExperimentConfig, job_id: str, model_id: str) -> Experiment:
    """The row of an experiment about to be submitted as the job `job_id`; the config is kept
    as given, with its defaults filled in."""
    return Experiment(
        id=new_id("exp"),
        job_id=job_id,
        name=config.experiment.name,
        config=config.model_dump(mode="json"),
        model_id=model_id,
    )


def shown_experiment(session: Session, experiment_id: str) -> ExperimentOut:
    """The experiment with its job's status and its best probe, or 404."""
    experiment = session.get(Experiment, experiment_id)
    if experiment is None:
        raise not_found("experiment", experiment_id)
    job = session.get(Job, experiment.job_id)
    run = session.get(ProbeRun, experiment.probe_run_id) if experiment.probe_run_id else None
    return experiment_view(experiment, job.status if job else "failed", run.best_probe_id if run else None)


def links(experiment: Experiment, best_probe_id: str | None) -> dict[str, str | None]:
    def path(prefix: str, value: str | None) -> str | None:
        return f"{prefix}/{value}" if value else None

    return {
        "model": path("/v1/models", experiment.model_id),
        "adapter": path("/v1/adapters", experiment.adapter_id),
        "dataset": path("/v1/datasets", experiment.dataset_id),
        "extraction": path("/v1/extractions", experiment.extraction_id),
        "hidden_states": path("/v1/extractions", experiment.extraction_id)
        and f"/v1/extractions/{experiment.extraction_id}/hidden-states",
        "probe_run": path("/v1/probe-runs", experiment.probe_run_id),
        "best_probe": path("/v1/probes", best_probe_id),
        "report": best_probe_id and f"/v1/probes/{best_probe_id}/report.html",
        "job": f"/v1/jobs/{experiment.job_id}",
    }


def experiment_view(experiment: Experiment, status: str, best_probe_id: str | None) -> ExperimentOut:
    return ExperimentOut(
        id=experiment.id,
        name=experiment.name,
        status=status,
        job_id=experiment.job_id,
        config=experiment.config,
        links=links(experiment, best_probe_id),
        created_at=experiment.created_at,
        finished_at=experiment.finished_at,
    )
