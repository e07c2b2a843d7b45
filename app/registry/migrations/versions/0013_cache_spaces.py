"""cache spaces: which model each space of the hidden-state cache belongs to

A cache space is a hash of everything a vector depends on besides its text and layer, so
the spaces of a model cannot be worked out from the model's row alone; from now on the cache
records the model of a space before it first writes to it, and deleting the model deletes
its spaces by that record. Spaces written before this revision are recorded here from what
the registry says was computed: every extraction, probe run, evaluation, comparison and
transfer names its model variant, token position, max_length and prompt format, and their
space is computed as `workers/state_cache.py` `cache_space` computes it (a frozen copy, which
a test checks against it). Texts scored with a probe under another prompt format than its
own leave no row behind, and their spaces stay unrecorded.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03 10:00:00.000000
"""

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RAW = "raw"


def space_of(
    model: tuple[Any, ...],
    adapter_identity: str | None,
    token_position: str,
    max_length: int | None,
    prompt_format: str,
) -> str:
    """A frozen copy of `workers.state_cache.cache_space`, for a model given as its row's
    (source, revision, fingerprint, quantization, dtype)."""
    source, model_revision, fingerprint, quantization, dtype = model
    key: list[Any] = [
        source,
        model_revision,
        fingerprint,
        adapter_identity,
        quantization,
        dtype,
        token_position,
        max_length,
    ]
    if prompt_format != RAW:
        key.append(prompt_format)
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def _table(name: str, *columns: str) -> sa.TableClause:
    return sa.table(name, *(sa.column(column) for column in columns))


def _recorded_spaces(connection: sa.Connection) -> set[tuple[str, str]]:
    """(space, model id) of every variant, token position, max_length and prompt format the
    registry's rows say hidden states were computed for."""
    models_table = _table("models", "id", "source", "revision", "fingerprint", "quantization", "dtype")
    models = {
        row[0]: tuple(row[1:])
        for row in connection.execute(
            sa.select(
                models_table.c.id,
                models_table.c.source,
                models_table.c.revision,
                models_table.c.fingerprint,
                models_table.c.quantization,
                models_table.c.dtype,
            )
        )
    }
    adapters_table = _table("adapters", "id", "base_model_id", "identity")
    adapters = {
        row[0]: (row[1], row[2])
        for row in connection.execute(
            sa.select(adapters_table.c.id, adapters_table.c.base_model_id, adapters_table.c.identity)
        )
    }
    found: set[tuple[str, str]] = set()

    def add(
        model_id: str, adapter_identity: str | None, token_position: str, max_length: int | None, prompt_format: str
    ) -> None:
        if model_id in models:
            found.add(
                (space_of(models[model_id], adapter_identity, token_position, max_length, prompt_format), model_id)
            )

    def add_variant(
        model_id: str, adapter_id: str | None, token_position: str, max_length: int | None, prompt_format: str
    ) -> None:
        if adapter_id is None:
            add(model_id, None, token_position, max_length, prompt_format)
        elif adapter_id in adapters:  # the identity of a deleted adapter is gone with it
            add(model_id, adapters[adapter_id][1], token_position, max_length, prompt_format)

    variant_columns = ("model_id", "adapter_id", "token_position", "max_length", "prompt_format")
    extractions = _table(
        "extractions", "model_id", "adapter_fingerprint", "token_position", "max_length", "prompt_format"
    )
    for row in connection.execute(sa.select(*extractions.c)):
        add(*row)
    for name in ("probe_runs", "transfers"):
        table = _table(name, *variant_columns)
        for row in connection.execute(sa.select(*table.c)):
            add_variant(*row)
    evaluations = _table("probe_evaluations", "probe_id", "model_id", "adapter_id", "prompt_format")
    probes = _table("probes", "id", "token_position", "max_length")
    for model_id, adapter_id, token_position, max_length, prompt_format in connection.execute(
        sa.select(
            evaluations.c.model_id,
            evaluations.c.adapter_id,
            probes.c.token_position,
            probes.c.max_length,
            evaluations.c.prompt_format,
        ).join(probes, probes.c.id == evaluations.c.probe_id)
    ):
        add_variant(model_id, adapter_id, token_position, max_length, prompt_format)
    comparisons = _table("comparisons", "model_id", "adapter_ids", "token_position", "prompt_format", "job_id")
    jobs = _table("jobs", "id", "params")
    for model_id, adapter_ids, token_position, prompt_format, params in connection.execute(
        sa.select(
            comparisons.c.model_id,
            comparisons.c.adapter_ids,
            comparisons.c.token_position,
            comparisons.c.prompt_format,
            jobs.c.params,
        ).join(jobs, jobs.c.id == comparisons.c.job_id)
    ):
        params = json.loads(params) if isinstance(params, str) else params
        max_length = params.get("max_length") if isinstance(params, dict) else None
        add(model_id, None, token_position, max_length, prompt_format)
        for adapter_id in json.loads(adapter_ids) if isinstance(adapter_ids, str) else adapter_ids:
            if adapter_id in adapters:  # an adapter runs on its own base model
                base_model_id, identity = adapters[adapter_id]
                add(base_model_id, identity, token_position, max_length, prompt_format)
    return found


def upgrade() -> None:
    op.create_table(
        "cache_spaces",
        sa.Column("space", sa.String(length=64), nullable=False),
        sa.Column("model_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("space", "model_id"),
    )
    with op.batch_alter_table("cache_spaces", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_cache_spaces_model_id"), ["model_id"], unique=False)
    found = sorted(_recorded_spaces(op.get_bind()))
    if found:
        now = datetime.now(UTC)
        table = sa.table(
            "cache_spaces",
            sa.column("space", sa.String()),
            sa.column("model_id", sa.String()),
            sa.column("created_at", sa.DateTime(timezone=True)),
        )
        op.bulk_insert(table, [{"space": space, "model_id": model_id, "created_at": now} for space, model_id in found])


def downgrade() -> None:
    with op.batch_alter_table("cache_spaces", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_cache_spaces_model_id"))
    op.drop_table("cache_spaces")
