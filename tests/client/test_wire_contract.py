"""The client's own types against the service's OpenAPI document.

The client keeps copies of the response bodies so that it imports without the service (and
without torch); these tests keep the copies true. A field, a type, an enum's values or a
required flag that differs fails here, naming the class, the field and the difference.
"""

import types
from datetime import datetime
from typing import Any, Literal, Union, get_args, get_origin

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from confprobe_client import types as client_types
from confprobe_client.types import (
    TERMINAL_STATUSES,
    Adapter,
    Answer,
    AnswerDifference,
    ApiKey,
    BaselineDifference,
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
    Evaluation,
    EvaluationReport,
    Experiment,
    Extraction,
    Finetune,
    Health,
    Job,
    JobError,
    JobPart,
    JobStatus,
    LossHistory,
    LossPoint,
    Model,
    Page,
    Precision,
    Probe,
    ProbeReport,
    ProbeRun,
    Progress,
    RateDifference,
    Readiness,
    ReliabilityBin,
    RiskCoverage,
    Score,
    SelfLabelSummary,
    TinkerModel,
    Transfer,
    TransferCell,
    TransferColumn,
    TransferMatrix,
    TransferRow,
    ValidationSummary,
)
from tests.conftest import make_settings

Schema = dict[str, Any]
# A type both sides can be read into: ("str",), ("enum", values), ("list", item),
# ("dict", value), ("model", client class name), ("union", alternatives)…
Shape = tuple[Any, ...]

# Each client type and the service's schema it mirrors.
MIRRORS: dict[type[BaseModel], str] = {
    Health: "HealthOut",
    Readiness: "ReadinessOut",
    Progress: "Progress",
    JobError: "JobError",
    JobPart: "JobPart",
    Job: "JobOut",
    Model: "ModelOut",
    Dataset: "DatasetOut",
    Adapter: "AdapterOut",
    Extraction: "ExtractionOut",
    Probe: "ProbeOut",
    ProbeRun: "ProbeRunOut",
    ProbeReport: "ProbeReportOut",
    Evaluation: "EvaluationOut",
    EvaluationReport: "EvaluationReportOut",
    Transfer: "TransferOut",
    TransferMatrix: "TransferMatrix",
    TransferRow: "TransferRow",
    TransferColumn: "TransferColumn",
    TransferCell: "TransferCell",
    CalibrationReport: "CalibrationReport",
    Estimate: "Estimate",
    BaselineDifference: "BaselineDifference",
    Estimator: "Estimator",
    ReliabilityBin: "ReliabilityBin",
    ConfidenceHistogram: "ConfidenceHistogram",
    RiskCoverage: "RiskCoverage",
    BootstrapSettings: "BootstrapSettings",
    Comparison: "ComparisonOut",
    ComparisonReport: "ComparisonReport",
    ComparisonVariant: "ComparisonVariant",
    Precision: "Precision",
    CrossTransfer: "CrossTransfer",
    ValidationSummary: "ValidationSummary",
    SelfLabelSummary: "SelfLabelSummary",
    RateDifference: "RateDifference",
    AnswerDifference: "AnswerDifference",
    Experiment: "ExperimentOut",
    Finetune: "FinetuneOut",
    LossPoint: "LossPoint",
    LossHistory: "LossHistory",
    ApiKey: "ApiKeyOut",
    CreatedApiKey: "ApiKeyCreated",
    Score: "ScoreOut",
    TinkerModel: "TinkerModel",
    Page[Job]: "JobPage",
    Page[Model]: "ModelPage",
    Page[Dataset]: "DatasetPage",
    Page[Adapter]: "AdapterPage",
    Page[Extraction]: "ExtractionPage",
    Page[Probe]: "ProbePage",
    Page[Evaluation]: "EvaluationPage",
    Page[Transfer]: "TransferPage",
    Page[ApiKey]: "ApiKeyPage",
    Page[Finetune]: "FinetunePage",
}

# Server schemas the document does not name, read from the service's own models instead.
UNNAMED_IN_DOCUMENT = {
    "ScoreOut": "POST /v1/probes/{id}/score answers 200 or 202 and declares only the 202 body",
    "TinkerModels": "GET /v1/tinker/models answers 200 or 202 and declares only the 202 body",
}

# Client types with no schema on the service's side at all.
UNDESCRIBED: dict[type[Answer], str] = {}

# Answers the client unwraps by one key rather than reading into a type of their own.
ENVELOPES: dict[tuple[str, str], Any] = {
    ("JobAccepted", "job"): Job,
    ("ExtractionAccepted", "extraction"): Extraction,
    ("ProbeAccepted", "run"): ProbeRun,
    ("EvaluationAccepted", "evaluation"): Evaluation,
    ("TransferAccepted", "transfer"): Transfer,
    ("ComparisonAccepted", "comparison"): Comparison,
    ("ExperimentAccepted", "experiment"): Experiment,
    ("FinetuneAccepted", "finetune"): Finetune,
    ("TinkerModels", "models"): list[TinkerModel],
}

# Answers the service documents and the client has no type for.
NOT_MIRRORED = {
    "WorkerList": "the client has no call for GET /v1/workers",
    "WorkerOut": "the client has no call for GET /v1/workers",
    "ResidentModel": "the client has no call for GET /v1/workers",
    "ErrorOut": "confprobe_client.errors reads the error envelope by key into exceptions",
    "ErrorBody": "confprobe_client.errors reads the error envelope by key into exceptions",
    "ProbeCard": "Client.probe_card gives the card as the JSON object it is, as the exported weights hold it",
    "ProbeCardModel": "part of ProbeCard, given as JSON",
    "ProbeCardAdapter": "part of ProbeCard, given as JSON",
    "ProbeCardDataset": "part of ProbeCard, given as JSON",
    "ProbeCardSplit": "part of ProbeCard, given as JSON",
}

# Fields the service sends and the client leaves out on purpose, each with why.
OMITTED: dict[tuple[type[BaseModel], str], str] = {}

# Fields the client accepts missing or null because older gateways answer without them.
OLDER_GATEWAYS: dict[tuple[type[BaseModel], str], str] = {
    (Adapter, "identity"): "gateways before adapter identities answer without it",
    (ProbeRun, "baselines"): "gateways before baselines could be skipped answer without it",
}

ANY: Shape = ("any",)
NULL: Shape = ("null",)
SCALARS: dict[Any, Shape] = {
    str: ("str",),
    int: ("int",),
    float: ("float",),
    bool: ("bool",),
    type(None): NULL,
    datetime: ("datetime",),
    Any: ANY,
}
JSON_TYPES: dict[str, Shape] = {
    "string": ("str",),
    "integer": ("int",),
    "number": ("float",),
    "boolean": ("bool",),
    "null": NULL,
}


@pytest.fixture(scope="module")
def service_schemas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Schema]:
    """The component schemas of the app's /openapi.json, built in-process. `.openapi()` runs
    no lifespan, so neither the registry nor Redis is touched."""
    from app.main import create_app
    from app.schemas.adapters import TinkerModels
    from app.schemas.probes import ScoreOut

    var_dir = tmp_path_factory.mktemp("wire") / "var"
    settings = make_settings(f"sqlite:///{var_dir.parent / 'registry.db'}", "redis://127.0.0.1:1/0", var_dir)
    document = create_app(settings).openapi()
    components: dict[str, Schema] = dict(document["components"]["schemas"])
    components["#responses"] = {"anyOf": _response_schemas(document)}
    unnamed: dict[str, type[BaseModel]] = {"ScoreOut": ScoreOut, "TinkerModels": TinkerModels}
    assert set(unnamed) == set(UNNAMED_IN_DOCUMENT)
    for name in UNNAMED_IN_DOCUMENT:
        schema = unnamed[name].model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
        for inner, definition in schema.pop("$defs", {}).items():
            components.setdefault(inner, definition)
        components.setdefault(name, schema)
    return components


def _response_schemas(document: Schema) -> list[Schema]:
    """Every JSON body any route of the document answers with, errors included."""
    return [
        content["application/json"]["schema"]
        for path in document["paths"].values()
        for operation in path.values()
        for response in operation.get("responses", {}).values()
        if "application/json" in (content := response.get("content", {})) and content["application/json"].get("schema")
    ]


def _client_names() -> dict[str, str]:
    """Service schema name -> client class name, for the models a field refers to."""
    return {server: client.__name__ for client, server in MIRRORS.items()}


def _alternatives(shape: Shape) -> tuple[Shape, ...]:
    return shape[1] if shape[0] == "union" else (shape,)


def _union(shapes: list[Shape]) -> Shape:
    flat = {alternative for shape in shapes for alternative in _alternatives(shape)}
    ordered = tuple(sorted(flat, key=lambda shape: (shape == NULL, repr(shape))))
    return ordered[0] if len(ordered) == 1 else ("union", ordered)


def client_shape(annotation: Any) -> Shape:
    """A client field's annotation as a Shape."""
    if annotation in SCALARS:
        return SCALARS[annotation]
    origin, arguments = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return ("enum", tuple(sorted(arguments)))
    if origin in (Union, types.UnionType):
        return _union([client_shape(argument) for argument in arguments])
    if origin is list:
        return ("list", client_shape(arguments[0]))
    if origin is dict:
        return ("dict", client_shape(arguments[1]))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return ("model", annotation.__name__)
    raise AssertionError(f"the contract test cannot read the client annotation {annotation!r}: teach client_shape")


def service_shape(schema: Schema, names: dict[str, str]) -> Shape:
    """A JSON schema of the document as a Shape; a `$ref` becomes the client class that
    mirrors it, or `service:<name>` when none does."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return ("model", names.get(name, f"service:{name}"))
    if "anyOf" in schema or "oneOf" in schema:
        alternatives = schema["anyOf"] if "anyOf" in schema else schema["oneOf"]
        return _union([service_shape(inner, names) for inner in alternatives])
    if "const" in schema:
        return ("enum", (schema["const"],))
    if "enum" in schema:
        return ("enum", tuple(sorted(schema["enum"])))
    kind = schema.get("type")
    if kind == "string" and schema.get("format") == "date-time":
        return ("datetime",)
    if kind in JSON_TYPES:
        return JSON_TYPES[kind]
    if kind == "array":
        return ("list", service_shape(schema.get("items", {}), names))
    if kind == "object":
        values = schema.get("additionalProperties", True)
        return ("dict", ANY if values is True else service_shape(values, names))
    if not schema or (kind is None and set(schema) <= {"title", "description", "default"}):
        return ANY
    raise AssertionError(f"the contract test cannot read the JSON schema {schema!r}: teach service_shape")


def render(shape: Shape) -> str:
    """A Shape as the Python annotation that would declare it."""
    kind: str = shape[0]
    if kind == "union":
        return " | ".join(render(alternative) for alternative in shape[1])
    if kind == "enum":
        return f"Literal[{', '.join(repr(value) for value in shape[1])}]"
    if kind == "list":
        return f"list[{render(shape[1])}]"
    if kind == "dict":
        return f"dict[str, {render(shape[1])}]"
    if kind == "model":
        return shape[1]
    return {"null": "None", "any": "Any"}.get(kind, kind)


def compatible(client: Shape, service: Shape) -> bool:
    """Whether the client reads every value the service may send into this type, and expects
    nothing the service never sends. `Any` on either side leaves the other free; a float
    field reads integers."""
    if client == service or ANY in (client, service) or (client, service) == (("float",), ("int",)):
        return True
    clients, services = _alternatives(client), _alternatives(service)
    if len(clients) > 1 or len(services) > 1:
        return all(any(compatible(c, s) for c in clients) for s in services) and all(
            any(compatible(c, s) for s in services) for c in clients
        )
    if client[0] == service[0] and client[0] in ("list", "dict"):
        return compatible(client[1], service[1])
    return False


def _enum_values(shape: Shape) -> set[Any]:
    if shape[0] == "enum":
        return set(shape[1])
    if shape[0] == "union":
        return set().union(*(_enum_values(alternative) for alternative in shape[1]))
    if shape[0] in ("list", "dict"):
        return _enum_values(shape[1])
    return set()


def type_difference(client: Shape, service: Shape) -> str:
    """What differs, with the enum values only one side has when enums are what differs."""
    text = f"type differs: client {render(client)}, service {render(service)}"
    client_values, service_values = _enum_values(client), _enum_values(service)
    if client_values and service_values and client_values != service_values:
        text += f" (only the service: {sorted(service_values - client_values)}; only the client: {sorted(client_values - service_values)})"
    return text


def _without_null(shape: Shape) -> Shape:
    return _union([alternative for alternative in _alternatives(shape) if alternative != NULL])


def field_problems(client_type: type[BaseModel], service_name: str, schemas: dict[str, Schema]) -> list[str]:
    """Every way `client_type` differs from the service's schema `service_name`, one line each."""
    schema, label = schemas[service_name], client_type.__name__
    properties, required = schema.get("properties", {}), set(schema.get("required", []))
    fields = {field.alias or name: field for name, field in client_type.model_fields.items()}
    problems = []
    for name in sorted(properties.keys() | fields.keys()):
        where, omitted = f"{label}.{name}", (client_type, name) in OMITTED
        if name not in fields:
            if not omitted:
                problems.append(
                    f"{where}: the service sends it ({render(service_shape(properties[name], _client_names()))}), the client has no field"
                )
        elif name not in properties:
            problems.append(
                f"{where}: the client expects it ({render(client_shape(fields[name].annotation))}), the service has no such field"
            )
        else:
            if omitted:
                problems.append(f"{where}: listed as omitted, but the client has the field")
            differences = _field_differences(client_type, name, fields[name], properties[name], name in required)
            problems.extend(f"{where}: {difference}" for difference in differences)
    stale = [name for kind, name in OMITTED if kind is client_type and name not in properties]
    return problems + [f"{label}.{name}: listed as omitted, but the service has no such field" for name in stale]


def _field_differences(
    client_type: type[BaseModel], name: str, field: FieldInfo, schema: Schema, service_required: bool
) -> list[str]:
    """How one field both sides have differs: its type, and whether it is required."""
    client, service, client_required = (
        client_shape(field.annotation),
        service_shape(schema, _client_names()),
        field.is_required(),
    )
    differences = []
    if (client_type, name) in OLDER_GATEWAYS:
        if client_required or NULL not in _alternatives(client):
            differences.append("listed for older gateways, so the client must accept it missing and null")
        client, client_required = _without_null(client), service_required
    if not compatible(client, service):
        differences.append(type_difference(client, service))
    if client_required != service_required:
        says = {True: "required", False: "optional"}
        differences.append(f"required differs: client {says[client_required]}, service {says[service_required]}")
    return differences


def _fail_on(problems: list[str], what: str) -> None:
    if problems:
        pytest.fail(f"{what}:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.mark.parametrize("client_type", list(MIRRORS), ids=lambda client_type: client_type.__name__)
def test_a_client_type_has_the_fields_types_enums_and_required_flags_of_the_services_schema(
    client_type: type[BaseModel], service_schemas: dict[str, Schema]
) -> None:
    service_name = MIRRORS[client_type]
    _fail_on(
        field_problems(client_type, service_name, service_schemas),
        f"{client_type.__name__} differs from the service's {service_name}",
    )


@pytest.mark.parametrize(("envelope", "key"), list(ENVELOPES), ids=lambda part: str(part))
def test_the_client_unwraps_an_answer_by_a_key_the_service_sends(
    envelope: str, key: str, service_schemas: dict[str, Schema]
) -> None:
    schema = service_schemas[envelope]
    assert key in schema.get("properties", {}), (
        f"{envelope} has no key {key!r}; it has {sorted(schema.get('properties', {}))}"
    )
    assert key in schema.get("required", []), (
        f"{envelope}.{key} is optional on the service's side; the client reads it unconditionally"
    )
    client, service = client_shape(ENVELOPES[envelope, key]), service_shape(schema["properties"][key], _client_names())
    assert compatible(client, service), f"{envelope}.{key}: {type_difference(client, service)}"


def test_every_client_type_is_compared_or_says_why_it_cannot_be() -> None:
    answers = {value for value in vars(client_types).values() if isinstance(value, type) and issubclass(value, Answer)}
    compared = {client_type for client_type in MIRRORS if client_type.__pydantic_generic_metadata__["origin"] is None}
    unaccounted = answers - compared - set(UNDESCRIBED) - {Answer, Page}
    assert not unaccounted, (
        f"client types neither in MIRRORS nor in UNDESCRIBED: {sorted(answer.__name__ for answer in unaccounted)}"
    )


def test_every_answer_the_service_documents_has_a_client_type_or_a_reason(service_schemas: dict[str, Schema]) -> None:
    documented = _reachable(service_schemas, "#responses") - {"#responses"}
    accounted = set(MIRRORS.values()) | {envelope for envelope, _ in ENVELOPES} | set(NOT_MIRRORED)
    assert not documented - accounted, (
        f"answers of the service the client neither mirrors nor lists: {sorted(documented - accounted)}"
    )
    assert not set(NOT_MIRRORED) - documented, (
        f"NOT_MIRRORED names schemas the service no longer has: {sorted(set(NOT_MIRRORED) - documented)}"
    )


def _reachable(schemas: dict[str, Schema], start: str) -> set[str]:
    """The schema names `start` refers to, directly or through others."""
    seen, pending = set(), [start]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        pending.extend(_references(schemas[name]))
    return seen


def _references(value: Any) -> list[str]:
    if isinstance(value, dict):
        own = [value["$ref"].rsplit("/", 1)[-1]] if "$ref" in value else []
        return own + [name for inner in value.values() for name in _references(inner)]
    if isinstance(value, list):
        return [name for inner in value for name in _references(inner)]
    return []


def test_the_job_statuses_are_the_services_and_the_terminal_ones_are_among_them(
    service_schemas: dict[str, Schema],
) -> None:
    assert set(get_args(JobStatus)) == set(service_schemas["JobOut"]["properties"]["status"]["enum"])
    assert {"succeeded", "failed", "cancelled"} == TERMINAL_STATUSES
    # the pydantic plugin asks model_construct for every field; it needs none, so status alone
    assert all(
        Job.model_construct(status=status).is_final  # type: ignore[call-arg]
        == (status in TERMINAL_STATUSES)
        for status in get_args(JobStatus)
    )


def test_a_drifted_client_type_is_reported_by_class_field_and_difference() -> None:
    """The differ itself, on a schema of its own, so that it does not move with the service's."""
    schemas = {
        "ThingOut": {
            "properties": {
                "status": {"type": "string", "enum": ["queued", "running", "failed"]},
                "attempts": {"type": "integer", "default": 0},
                "owner": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "progress": {"$ref": "#/components/schemas/Progress"},
            },
            "required": ["status", "owner", "progress"],
        }
    }

    class Thing(Answer):
        status: Literal["queued", "running", "paused"]
        attempts: int
        progress: Progress
        queue: str

    assert field_problems(Thing, "ThingOut", schemas) == [
        "Thing.attempts: required differs: client required, service optional",
        "Thing.owner: the service sends it (str | None), the client has no field",
        "Thing.queue: the client expects it (str), the service has no such field",
        "Thing.status: type differs: client Literal['paused', 'queued', 'running'], service Literal['failed', 'queued', 'running'] "
        "(only the service: ['failed']; only the client: ['paused'])",
    ]
