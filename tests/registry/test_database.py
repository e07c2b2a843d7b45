import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.exc import IntegrityError

from app.inputs.model_sources import ModelShape, ResolvedSource
from app.registry.database import (
    MIGRATIONS_DIR,
    create_registry_engine,
    session_factory,
    transaction,
)
from app.registry.models import find_model, new_model
from app.registry.tables import Job, new_id

SHAPE = ModelShape(architecture="LlamaForCausalLM", model_type="llama", num_layers=2, hidden_size=16)


def source(path: str) -> ResolvedSource:
    from pathlib import Path

    return ResolvedSource(kind="local", identity=path, path=Path(path))


def test_migrations_bring_the_database_to_the_newest_revision(database_url: str) -> None:
    engine = create_registry_engine(database_url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.connect() as connection:
        assert (
            MigrationContext.configure(connection).get_current_revision()
            == ScriptDirectory.from_config(config).get_current_head()
        )
        assert {"models", "jobs"} <= set(inspect(connection).get_table_names())


def test_times_come_back_timezone_aware_in_utc(database_url: str) -> None:
    sessions = session_factory(create_registry_engine(database_url))
    created = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    with transaction(sessions) as session:
        session.add(Job(id="job_t", kind="k", params={}, queue="q", created_at=created))
    with sessions() as session:
        job = session.get(Job, "job_t")
        assert job is not None
        assert job.created_at.tzinfo is not None
        assert job.created_at == created
        assert job.created_at.astimezone(UTC).hour == 1


def test_a_model_is_unique_by_source_revision_dtype_and_quantization(database_url: str) -> None:
    sessions = session_factory(create_registry_engine(database_url))
    with transaction(sessions) as session:
        session.add(new_model("a", source("/models/x"), None, "float32", None, SHAPE, "f"))
        session.add(new_model("b", source("/models/x"), None, "bfloat16", None, SHAPE, "f"))
        session.add(new_model("c", source("/models/x"), None, "float32", "8bit", SHAPE, "f"))
    with pytest.raises(IntegrityError), transaction(sessions) as session:
        session.add(new_model("d", source("/models/x"), None, "float32", None, SHAPE, "f"))
    with sessions() as session:
        assert find_model(session, source("/models/x"), None, "float32", None).name == "a"  # type: ignore[union-attr]


def test_ids_sort_by_creation_time() -> None:
    ids = []
    for _ in range(5):
        ids.append(new_id("job"))
        time.sleep(0.002)
    assert all(item.startswith("job_") for item in ids)
    assert sorted(reversed(ids)) == ids
