"""Job parameters as typed models: stored in the shape job rows had when they were plain
dicts, so rows written before still validate, and each kind takes only its own model."""

from typing import Any

import pytest

from app import jobs
from app.job_kinds import (
    AdapterImportParameters,
    ComparisonParameters,
    ExperimentParameters,
    ExtractionParameters,
    ImportSource,
    JobParameters,
    ModelCheckParameters,
    NoParameters,
    ProbeScoringParameters,
    ProbeTrainingParameters,
    SplitParameters,
)

SPLIT = {"train": 0.6, "validation": 0.2, "test": 0.2, "seed": 0}
STORED: list[tuple[JobParameters, dict[str, Any]]] = [
    (NoParameters(), {}),
    (ModelCheckParameters(model_id="mdl_1"), {"model_id": "mdl_1"}),
    (ExtractionParameters(extraction_id="ext_1"), {"extraction_id": "ext_1"}),
    (ExtractionParameters(extraction_id="ext_1", texts=["a"]), {"extraction_id": "ext_1", "texts": ["a"]}),
    (
        AdapterImportParameters(
            source_kind="local_folder", source="/a", base_model_id="mdl_1", name="ft", metadata={"run": 1}
        ),
        {
            "source_kind": "local_folder",
            "source": "/a",
            "tinker_run_id": None,
            "base_model_id": "mdl_1",
            "name": "ft",
            "metadata": {"run": 1},
        },
    ),
    (ProbeTrainingParameters(run_id="prr_1"), {"run_id": "prr_1"}),
    (
        ProbeScoringParameters(probe_id="prb_1", texts=["a"]),
        {"probe_id": "prb_1", "texts": ["a"], "prompt_format": "raw"},
    ),
    (
        ComparisonParameters(comparison_id="cmp_1", split=SplitParameters(**SPLIT), max_length=None),
        {"comparison_id": "cmp_1", "split": SPLIT, "max_length": None},
    ),
    (
        ExperimentParameters(
            experiment_id="exp_1",
            layers=[1, -1],
            adapter=ImportSource(source_kind="tinker", source="tinker://run/external_weights/x", tinker_run_id="run"),
            dataset="dst_1",
            dataset_path=None,
        ),
        {
            "experiment_id": "exp_1",
            "layers": [1, -1],
            "adapter": {"source_kind": "tinker", "source": "tinker://run/external_weights/x", "tinker_run_id": "run"},
            "dataset": "dst_1",
            "dataset_path": None,
        },
    ),
]


@pytest.mark.parametrize(("params", "stored"), STORED, ids=[type(params).__name__ for params, _ in STORED])
def test_parameters_are_stored_as_the_json_object_their_rows_always_had(
    params: JobParameters, stored: dict[str, Any]
) -> None:
    assert params.model_dump(mode="json") == stored
    assert type(params).model_validate(stored) == params


def test_rows_written_before_the_parameters_were_typed_still_validate() -> None:
    upload = {"source_kind": "upload", "source": "a.zip", "upload": "staging/uploads/upl_1.archive", "name": "ft"}
    imported = AdapterImportParameters.model_validate(upload | {"metadata": {}, "base_model_id": "mdl_1"})
    assert (imported.upload, imported.tinker_run_id) == ("staging/uploads/upl_1.archive", None)
    comparison = {"comparison_id": "cmp_1", "split": SPLIT, "max_length": 32, "on_mixed_precision": "flag"}
    assert ComparisonParameters.model_validate(comparison).max_length == 32


def test_an_upload_import_names_its_archive_and_no_other_import_does() -> None:
    with pytest.raises(ValueError, match="upload"):
        AdapterImportParameters(source_kind="upload", source="a.zip", base_model_id="mdl_1", name="ft")
    with pytest.raises(ValueError, match="upload"):
        AdapterImportParameters(source_kind="url", source="https://x/a.zip", upload="k", base_model_id="m", name="ft")


def test_a_job_takes_only_the_parameter_model_of_its_kind() -> None:
    assert jobs.new_job("model_check", ModelCheckParameters(model_id="mdl_1"), "q").params == {"model_id": "mdl_1"}
    with pytest.raises(TypeError, match="ModelCheckParameters"):
        jobs.new_job("model_check", ProbeTrainingParameters(run_id="prr_1"), "q")


def test_a_scoring_row_from_before_prompt_formats_reads_its_texts_raw() -> None:
    assert ProbeScoringParameters.model_validate({"probe_id": "prb_1", "texts": ["a"]}).prompt_format == "raw"
