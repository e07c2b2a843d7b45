"""Migration 0008 gives every adapter converted before it the identity a new import of the
same weights and config gets, and lets the same weights with another config be a second
adapter."""

import importlib.util
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.exc import IntegrityError

from app.inputs.model_sources import ModelShape, ResolvedSource
from app.registry.adapters import adapter_identity
from app.registry.database import (
    MIGRATIONS_DIR,
    create_registry_engine,
)
from app.registry.models import new_model
from app.registry.tables import Model, UTCDateTime

SHAPE = ModelShape(architecture="LlamaForCausalLM", model_type="llama", num_layers=2, hidden_size=16)
WEIGHTS = "ab" * 32
CONVERTED_CONFIG = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": "/models/x",
    "r": 4,
    "lora_alpha": 8.0,
    "target_modules": ["k_proj", "q_proj"],
    "lora_dropout": 0.0,
    "bias": "none",
    "fan_in_fan_out": False,
    "inference_mode": True,
}  # what converters before 0008 wrote


def alembic_config(connection: sa.Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def adapters_table(with_identity: bool = True) -> sa.TableClause:
    """The adapters table as migration 0007 left it, and with the identity column after."""
    columns: list[sa.ColumnClause[Any]] = [
        sa.column("id", sa.String()),
        sa.column("name", sa.String()),
        sa.column("base_model_id", sa.String()),
        sa.column("source_kind", sa.String()),
        sa.column("source", sa.String()),
        sa.column("r", sa.Integer()),
        sa.column("lora_alpha", sa.Double()),
        sa.column("target_modules", sa.JSON()),
        sa.column("sha256", sa.String()),
        sa.column("size_bytes", sa.BigInteger()),
        sa.column("artifact", sa.String()),
        sa.column("conversion", sa.JSON()),
        sa.column("training", sa.JSON()),
        sa.column("created_at", UTCDateTime()),
    ]
    if with_identity:
        columns.append(sa.column("identity", sa.String()))
    return sa.table("adapters", *columns)


def old_row(adapter_id: str, model_id: str, sha256: str, lora_alpha: float) -> dict[str, object]:
    return {
        "id": adapter_id,
        "name": adapter_id,
        "base_model_id": model_id,
        "source_kind": "local_folder",
        "source": "/adapters/x",
        "r": 4,
        "lora_alpha": lora_alpha,
        "target_modules": ["q_proj", "k_proj"],
        "sha256": sha256,
        "size_bytes": 10,
        "artifact": f"adapters/{sha256}",
        "conversion": {},
        "training": {},
        "created_at": datetime.now(UTC),
    }


def test_rows_converted_before_get_the_identity_a_new_import_computes(database_url: str) -> None:
    engine = create_registry_engine(database_url)
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0007")
    model = new_model(
        "m",
        ResolvedSource(kind="local", identity="/models/x", path=Path("/models/x")),
        None,
        "float32",
        None,
        SHAPE,
        "f",
    )
    model_id = model.id
    table = adapters_table()
    with engine.begin() as connection:
        # the model as a row of that revision: only the columns it had (the table's defaults fill the rest)
        old_columns = {column["name"] for column in sa.inspect(connection).get_columns("models")}
        values = {name: getattr(model, name) for name in old_columns if getattr(model, name, None) is not None}
        connection.execute(sa.insert(Model).values(**values))
        connection.execute(
            sa.insert(adapters_table(with_identity=False)).values(**old_row("adp_old", model_id, WEIGHTS, 8.0))
        )
        command.upgrade(alembic_config(connection), "head")
    with engine.begin() as connection:
        identity = connection.execute(sa.select(table.c.identity).where(table.c.id == "adp_old")).scalar_one()
        assert identity == adapter_identity(WEIGHTS, CONVERTED_CONFIG)
        # the same weights with another lora_alpha are another adapter now
        connection.execute(
            sa.insert(table).values(
                **old_row("adp_new", model_id, WEIGHTS, 16.0),
                identity=adapter_identity(WEIGHTS, CONVERTED_CONFIG | {"lora_alpha": 16.0}),
            )
        )
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(sa.insert(table).values(**old_row("adp_same", model_id, WEIGHTS, 8.0), identity=identity))


def test_the_migrations_frozen_identity_agrees_with_the_live_one() -> None:
    spec = importlib.util.spec_from_file_location(
        "migration_0008", MIGRATIONS_DIR / "versions" / "0008_adapter_identity.py"
    )
    assert spec is not None and spec.loader is not None
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    for alpha, modules in ((8.0, ["q_proj", "k_proj"]), (16, ["lm_head"]), (0.5, ["embed_tokens", "v_proj"])):
        config = CONVERTED_CONFIG | {"lora_alpha": float(alpha), "target_modules": sorted(modules)}
        assert migration.identity_of_row(WEIGHTS, 4, alpha, modules) == adapter_identity(WEIGHTS, config)
