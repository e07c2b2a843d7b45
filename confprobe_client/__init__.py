"""Python client of the Confidence Probing Service (v1 API).

    from confprobe_client import Client

    with Client("http://127.0.0.1:8000") as client:
        model = client.register_model("/models/Llama-3.1-8B", name="llama-8b")
        client.wait(model.check_job_id)
        states = client.extract(model.id, layers=[8, 16], texts=["Paris is in France."])

It needs httpx and pydantic (numpy for hidden states, tqdm for progress bars, click for the
`confprobe` API commands in `confprobe_client.cli`), never torch or the service's own packages.
"""

from confprobe_client.client import Client
from confprobe_client.errors import (
    ApiError,
    Conflict,
    ConfprobeError,
    Forbidden,
    InvalidRequest,
    JobFailed,
    NotFound,
    RateLimited,
    Unauthorized,
    Unavailable,
    Unreachable,
    WaitTimedOut,
)
from confprobe_client.transport import API_KEY_VARIABLE, DEFAULT_URL
from confprobe_client.types import (
    Adapter,
    ApiKey,
    BootstrapSettings,
    CalibrationReport,
    Comparison,
    ComparisonReport,
    ComparisonVariant,
    ConfidenceHistogram,
    CreatedApiKey,
    CrossTransfer,
    Dataset,
    Estimate,
    Estimator,
    Experiment,
    Extraction,
    Health,
    Job,
    JobError,
    Model,
    Page,
    Precision,
    Probe,
    ProbeReport,
    ProbeRun,
    Progress,
    Readiness,
    ReliabilityBin,
    Score,
    TinkerModel,
    ValidationSummary,
)

__all__ = [
    "API_KEY_VARIABLE",
    "DEFAULT_URL",
    "Adapter",
    "ApiError",
    "ApiKey",
    "BootstrapSettings",
    "CalibrationReport",
    "Client",
    "Comparison",
    "ComparisonReport",
    "ComparisonVariant",
    "ConfidenceHistogram",
    "Conflict",
    "ConfprobeError",
    "CreatedApiKey",
    "CrossTransfer",
    "Dataset",
    "Estimate",
    "Estimator",
    "Experiment",
    "Extraction",
    "Forbidden",
    "Health",
    "InvalidRequest",
    "Job",
    "JobError",
    "JobFailed",
    "Model",
    "NotFound",
    "Page",
    "Precision",
    "Probe",
    "ProbeReport",
    "ProbeRun",
    "Progress",
    "RateLimited",
    "Readiness",
    "ReliabilityBin",
    "Score",
    "TinkerModel",
    "Unauthorized",
    "Unavailable",
    "Unreachable",
    "ValidationSummary",
    "WaitTimedOut",
]
