"""`/v1/datasets`: upload statements, multiple-choice sets or chat conversations, list and show them."""

import tempfile
from dataclasses import replace
from typing import Annotated, BinaryIO

from fastapi import APIRouter, File, Form, Query, Response, UploadFile, status
from pydantic import AfterValidator

from app.api.deps import ArtifactsDep, Force, RedisDep, SessionDep, SessionsDep, SettingsDep
from app.deletions import DELETE_RESPONSES, delete_resource
from app.errors import ServiceError, nul_free_filename
from app.inputs.datasets import InvalidDataset, NormalisedDataset, default_name, normalise_upload
from app.registry.datasets import RegistrationRace, get_dataset, list_datasets, register_dataset
from app.schemas.common import ERROR_RESPONSES, without_nul
from app.schemas.datasets import DatasetOut, DatasetPage

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=ERROR_RESPONSES)


def _normalised(source: BinaryIO, filename: str | None, out: BinaryIO) -> NormalisedDataset:
    """The upload's rows, normalised into `out` as they are read; a file that is not a
    dataset is a 422 naming its line and field."""
    try:
        return replace(normalise_upload(source, filename, out), stored=out)
    except InvalidDataset as exc:
        raise ServiceError(422, exc.code, exc.message, **exc.details) from exc


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": DatasetOut, "description": "The same rows are already registered: that dataset."}},
)
def upload_dataset(
    file: Annotated[
        UploadFile,
        File(
            description="JSONL or CSV (by the `.jsonl`/`.csv` extension, else by content), UTF-8. "
            "Statements: `text` (or `statement`), `label` 0/1. Multiple choice: `question`, `choices` "
            "(in CSV a JSON list), `answer` (0-based index). Chat: `messages`, a list of `{role, content}` "
            "(in CSV a JSON list): system only first, a user message before the first assistant one, "
            "the assistant's last."
        ),
    ],
    response: Response,
    sessions: SessionsDep,
    artifacts: ArtifactsDep,
    name: Annotated[
        str | None,
        Form(min_length=1, max_length=200, description="Display name; default: the file name."),
        AfterValidator(without_nul),
    ] = None,
) -> DatasetOut:
    """Upload a dataset. A malformed row is a 422 naming its line and field, and nothing is
    kept. Rows already uploaded (as CSV or JSONL) answer 200 with the existing dataset."""
    filename = nul_free_filename(file.filename)
    # rows are read, checked and written out one at a time (the upload itself is spooled to
    # disk by the multipart parser): memory does not grow with the dataset
    with tempfile.TemporaryFile() as normalised:
        upload = _normalised(file.file, filename, normalised)
        try:
            dataset, created = register_dataset(sessions, artifacts, upload, name or default_name(filename))
        except RegistrationRace as exc:
            raise ServiceError(409, "conflict", exc.message) from None
    if created:
        response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    else:
        response.status_code = status.HTTP_200_OK
    return DatasetOut.of(dataset)


@router.get("")
def list_uploaded_datasets(
    session: SessionDep,
    settings: SettingsDep,
    cursor: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> DatasetPage:
    datasets, next_cursor = list_datasets(session, cursor=cursor, limit=min(limit, settings.page_size_max))
    return DatasetPage(items=[DatasetOut.of(dataset) for dataset in datasets], next_cursor=next_cursor)


@router.get("/{dataset_id}")
def show_dataset(dataset_id: str, session: SessionDep) -> DatasetOut:
    return DatasetOut.of(get_dataset(session, dataset_id))


@router.delete("/{dataset_id}", status_code=204, responses=DELETE_RESPONSES)
def delete_dataset(
    dataset_id: str,
    sessions: SessionsDep,
    artifacts: ArtifactsDep,
    connection: RedisDep,
    settings: SettingsDep,
    force: Force = False,
) -> Response:
    """Delete the dataset and its file. Refused while an unfinished job reads it, and while
    extractions, probes, evaluations, comparisons, transfers or fine-tunes made from its rows
    exist: `force=true` deletes them with it. Cached hidden states stay: they are kept by
    text, for every dataset holding the same texts."""
    delete_resource(sessions, artifacts, connection, settings, "datasets", dataset_id, force)
    return Response(status_code=204)
