"""Queries on uploaded datasets, their registration (the stored file first, then the row),
their stored rows read back, and the check every request that probes a dataset's rows makes
(`labelled_dataset`): chat conversations, having no labels, are refused."""

import json
import shutil
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app.errors import invalid_field, not_found
from app.inputs.datasets import NormalisedDataset, UnlabelledDataset, require_labelled
from app.registry.database import keyset_page, transaction
from app.registry.tables import Dataset, new_id
from app.storage import ArtifactStore

COPY_CHUNK_BYTES = 2**20


def find_dataset(session: Session, sha256: str) -> Dataset | None:
    return session.scalar(select(Dataset).where(Dataset.sha256 == sha256))


def new_dataset(name: str, upload: NormalisedDataset) -> Dataset:
    return Dataset(
        id=new_id("dst"),
        name=name,
        kind=upload.kind,
        source_format=upload.source_format,
        rows=upload.rows,
        label_balance=upload.label_balance,
        sha256=upload.sha256,
        upload_sha256=upload.upload_sha256,
        artifact=upload.artifact_key,
        size_bytes=upload.size_bytes,
    )


def get_dataset(session: Session, dataset_id: str) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id)
    return dataset


def checked_labelled(dataset: Dataset, field: str = "dataset") -> Dataset:
    """`dataset` itself when its rows have labels to probe, else a 422 naming `field`."""
    try:
        require_labelled(dataset.kind, f"dataset {dataset.id}")
    except UnlabelledDataset as exc:
        raise invalid_field(field, str(exc), dataset=dataset.id) from None
    return dataset


def labelled_dataset(session: Session, dataset_id: str, field: str = "dataset") -> Dataset:
    """The dataset an extraction, probe run or comparison reads: a 404 when there is none,
    a 422 naming `field` when it holds chat conversations (`checked_labelled`)."""
    return checked_labelled(get_dataset(session, dataset_id), field)


def list_datasets(session: Session, *, cursor: str | None, limit: int) -> tuple[list[Dataset], str | None]:
    return keyset_page(session, select(Dataset), Dataset.id, cursor, limit)


def _registered(sessions: sessionmaker[Session], sha256: str) -> Dataset | None:
    with sessions() as session:
        return find_dataset(session, sha256)


class RegistrationRace(Exception):
    """Another request inserted the same rows and rolled back: registering again succeeds."""

    message = "the dataset is being registered by another request; retry"


def register_dataset(
    sessions: sessionmaker[Session], store: ArtifactStore, upload: NormalisedDataset, name: str
) -> tuple[Dataset, bool]:
    """The dataset holding the upload's rows, and whether this call created it.

    The file is written (atomically) before the row is inserted, so no row ever lacks its
    file. Its key is its content's hash: a concurrent upload of the same rows writes the
    same bytes to the same key, and the loser of the insert keeps the file for the winner.
    `RegistrationRace` when the other insert was rolled back meanwhile.
    """
    existing = _registered(sessions, upload.sha256)
    if existing is not None:
        return existing, False
    _store_content(store, upload)
    dataset = new_dataset(name, upload)
    try:
        with transaction(sessions) as session:
            session.add(dataset)
        return dataset, True
    except IntegrityError:
        existing = _registered(sessions, upload.sha256)
        if existing is None:
            _discard_unregistered_file(sessions, store, upload)
            raise RegistrationRace() from None
        return existing, False
    except Exception:
        _discard_unregistered_file(sessions, store, upload)
        raise


def _store_content(store: ArtifactStore, upload: NormalisedDataset) -> None:
    """Write the normalised rows under the dataset's key, from memory or from the file the
    upload was streamed into."""
    if upload.content is not None:
        store.write_bytes(upload.artifact_key, upload.content)
        return
    if upload.stored is None:
        raise ValueError("a normalised dataset carries its content or a file holding it")
    upload.stored.seek(0)
    with store.writer(upload.artifact_key) as handle:
        shutil.copyfileobj(upload.stored, handle, COPY_CHUNK_BYTES)


def _discard_unregistered_file(
    sessions: sessionmaker[Session], store: ArtifactStore, upload: NormalisedDataset
) -> None:
    """After a failed insert: delete the file, unless a concurrent upload of the same rows
    has registered it meanwhile and its row needs the file."""
    try:
        registered = _registered(sessions, upload.sha256) is not None
    except SQLAlchemyError:
        registered = False  # the database is out of reach, most likely for the other upload too
    if not registered:
        store.delete(upload.artifact_key)


def read_rows(store: ArtifactStore, dataset: Dataset) -> list[dict[str, Any]]:
    """The stored rows: `{text, label}`, `{question, choices, answer}` or `{messages}`, in upload order."""
    return list(iter_rows(store, dataset))


# the row offsets of the most recently read dataset files, by path, size and modification time
_OFFSETS: "OrderedDict[tuple[str, int, int], np.ndarray]" = OrderedDict()
OFFSETS_KEPT = 8


def row_offsets(path: Path) -> np.ndarray:
    """The byte offset of every row (non-blank line) of a stored dataset file, in order, and
    the file's size last: found in one pass the first time, then kept for the file as it is
    (8 bytes a row; the few most recent files)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    offsets = _OFFSETS.get(key)
    if offsets is not None:
        _OFFSETS.move_to_end(key)
        return offsets
    starts = array("q")
    position = 0
    with path.open("rb") as handle:
        for line in handle:
            if line.strip():
                starts.append(position)
            position += len(line)
    starts.append(position)
    offsets = np.frombuffer(starts, dtype=np.int64)
    _OFFSETS[key] = offsets
    while len(_OFFSETS) > OFFSETS_KEPT:
        _OFFSETS.popitem(last=False)
    return offsets


def rows_at(store: ArtifactStore, dataset: Dataset, indices: Sequence[int]) -> list[dict[str, Any]]:
    """The stored rows at `indices` (0-based, in upload order), in the order asked: each row
    read where it starts (`row_offsets`), so a few rows of a large dataset cost a few reads.
    IndexError for a position past the last row."""
    wanted = sorted(set(indices))
    if not wanted:
        return []
    path = store.local_path(dataset.artifact)
    offsets = row_offsets(path)
    if wanted[0] < 0 or wanted[-1] >= len(offsets) - 1:
        bad = wanted[0] if wanted[0] < 0 else wanted[-1]
        raise IndexError(f"dataset {dataset.id} has no row {bad}")
    found: dict[int, dict[str, Any]] = {}
    with path.open("rb") as handle:
        for index in wanted:
            handle.seek(int(offsets[index]))
            found[index] = json.loads(handle.readline())
    return [found[index] for index in indices]


def rows_between(store: ArtifactStore, dataset: Dataset, start: int, stop: int) -> list[dict[str, Any]]:
    """The stored rows from position `start` up to (not including) `stop`, read in one pass
    from where row `start` begins."""
    path = store.local_path(dataset.artifact)
    offsets = row_offsets(path)
    stop = min(stop, len(offsets) - 1)
    if start >= stop:
        return []
    rows: list[dict[str, Any]] = []
    with path.open("rb") as handle:
        handle.seek(int(offsets[start]))
        while len(rows) < stop - start:
            line = handle.readline()
            if line.strip():
                rows.append(json.loads(line))
    return rows


def iter_rows(store: ArtifactStore, dataset: Dataset) -> Iterator[dict[str, Any]]:
    """The stored rows one at a time, read from the local copy of the file as they are
    used: a dataset of any size is never held whole."""
    # lines end at "\n" only: str.splitlines would also split at U+2028, which JSON leaves raw
    with store.local_path(dataset.artifact).open("rb") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)
