"""cache shards: the hidden-state cache indexed by text and shard, not by text and layer

`hidden_state_cache` had one row per (space, text, layer), the shard's path repeated in each.
Now `cache_shards` has one row per shard file (its space, path, layers in slot order and row
count) and `cached_texts` one per text in a shard (its row, whether it was truncated): a
text cached at eight layers is one row, not eight.

The old rows are moved shard by shard: a shard's layers are the layers its entries name,
ordered by slot (a slot no entry names — every text of it was indexed by an earlier shard
first — is `null`, never read); its row count is the highest row its entries name plus one;
each text it has entries for gets one row with the row and truncation those entries give. A
shard file is written under its space's folder, so all of a shard's entries name one space;
were there entries of another space too, they would be left out (a cache entry left out costs
only its recomputation). The old table is read in its key order, in batches, never whole.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-10 10:00:00.000000
"""

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 5000  # rows read or written at a time

OLD = sa.table(
    "hidden_state_cache",
    sa.column("space", sa.String()),
    sa.column("text_sha256", sa.String()),
    sa.column("layer", sa.Integer()),
    sa.column("shard", sa.String()),
    sa.column("row", sa.Integer()),
    sa.column("slot", sa.Integer()),
    sa.column("truncated", sa.Boolean()),
)
SHARDS = sa.table(
    "cache_shards",
    sa.column("id", sa.Integer()),
    sa.column("space", sa.String()),
    sa.column("path", sa.String()),
    sa.column("layers", sa.JSON()),
    sa.column("rows", sa.Integer()),
    sa.column("created_at", sa.DateTime(timezone=True)),
)
TEXTS = sa.table(
    "cached_texts",
    sa.column("text_sha256", sa.String()),
    sa.column("shard_id", sa.Integer()),
    sa.column("row", sa.Integer()),
    sa.column("truncated", sa.Boolean()),
)


def _create_new_tables() -> None:
    op.create_table(
        "cache_shards",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("space", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(length=500), nullable=False),
        sa.Column("layers", sa.JSON(), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("path"),
    )
    with op.batch_alter_table("cache_shards", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_cache_shards_space"), ["space"], unique=False)
    op.create_table(
        "cached_texts",
        sa.Column("text_sha256", sa.String(length=64), nullable=False),
        sa.Column("shard_id", sa.Integer(), nullable=False),
        sa.Column("row", sa.Integer(), nullable=False),
        sa.Column("truncated", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["shard_id"], ["cache_shards.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("text_sha256", "shard_id"),
    )
    with op.batch_alter_table("cached_texts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_cached_texts_shard_id"), ["shard_id"], unique=False)


def _create_old_table() -> None:
    op.create_table(
        "hidden_state_cache",
        sa.Column("space", sa.String(length=64), nullable=False),
        sa.Column("text_sha256", sa.String(length=64), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("shard", sa.String(length=500), nullable=False),
        sa.Column("row", sa.Integer(), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("truncated", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("space", "text_sha256", "layer"),
    )


def _old_shards(connection: sa.Connection) -> dict[str, tuple[str, list[int | None], int]]:
    """Per shard path: its space, its layers by slot, its row count."""
    slots: dict[str, dict[int, int]] = {}
    spaces: dict[str, str] = {}
    rows: dict[str, int] = {}
    query = (
        sa.select(OLD.c.shard, OLD.c.space, OLD.c.slot, OLD.c.layer, sa.func.max(OLD.c.row))
        .group_by(OLD.c.shard, OLD.c.space, OLD.c.slot, OLD.c.layer)
        .order_by(OLD.c.shard, OLD.c.space, OLD.c.slot)
    )
    for shard, space, slot, layer, last_row in connection.execute(query):
        if spaces.setdefault(shard, space) != space:
            continue
        slots.setdefault(shard, {}).setdefault(slot, layer)
        rows[shard] = max(rows.get(shard, 0), last_row + 1)
    return {
        shard: (spaces[shard], [by_slot.get(slot) for slot in range(max(by_slot) + 1)], rows[shard])
        for shard, by_slot in slots.items()
    }


def _insert_pending(connection: sa.Connection, table: sa.TableClause, rows: list[dict[str, Any]]) -> None:
    """Insert `rows` (one executemany) and empty the list."""
    if rows:
        connection.execute(sa.insert(table), rows)
        rows.clear()


def upgrade() -> None:
    _create_new_tables()
    connection = op.get_bind()
    now = datetime.now(UTC)
    shard_ids: dict[str, tuple[int, str]] = {}
    for path, (space, layers, row_count) in sorted(_old_shards(connection).items()):
        shard_id = connection.execute(
            sa.insert(SHARDS)
            .values(space=space, path=path, layers=layers, rows=row_count, created_at=now)
            .returning(SHARDS.c.id)
        ).scalar_one()
        shard_ids[path] = (shard_id, space)

    pending: list[dict[str, Any]] = []
    current: tuple[str, str] | None = None  # the (space, text) whose entries are being read
    seen: set[int] = set()  # the shards already given a row for it
    entries = connection.execute(
        sa.select(OLD.c.space, OLD.c.text_sha256, OLD.c.shard, OLD.c.row, OLD.c.truncated)
        .order_by(OLD.c.space, OLD.c.text_sha256, OLD.c.layer)
        .execution_options(yield_per=BATCH)
    )
    for batch in entries.partitions():
        for space, sha, shard, row, truncated in batch:
            if (space, sha) != current:
                current, seen = (space, sha), set()
            shard_id, shard_space = shard_ids[shard]
            if shard_id in seen or shard_space != space:
                continue
            seen.add(shard_id)
            pending.append({"text_sha256": sha, "shard_id": shard_id, "row": row, "truncated": bool(truncated)})
        if len(pending) >= BATCH:
            _insert_pending(connection, TEXTS, pending)
    _insert_pending(connection, TEXTS, pending)
    op.drop_table("hidden_state_cache")


def downgrade() -> None:
    _create_old_table()
    connection = op.get_bind()
    shards = {
        shard_id: (space, path, layers)
        for shard_id, space, path, layers in connection.execute(
            sa.select(SHARDS.c.id, SHARDS.c.space, SHARDS.c.path, SHARDS.c.layers)
        )
    }
    pending: list[dict[str, Any]] = []
    current: str | None = None
    seen: set[tuple[str, int]] = set()  # the (space, layer) already given an entry for the text
    texts = connection.execute(
        sa.select(TEXTS.c.text_sha256, TEXTS.c.shard_id, TEXTS.c.row, TEXTS.c.truncated)
        .order_by(TEXTS.c.text_sha256, TEXTS.c.shard_id)
        .execution_options(yield_per=BATCH)
    )
    for batch in texts.partitions():
        for sha, shard_id, row, truncated in batch:
            if sha != current:
                current, seen = sha, set()
            space, path, layers = shards[shard_id]
            for slot, layer in enumerate(layers):
                if layer is None or (space, layer) in seen:
                    continue
                seen.add((space, layer))
                pending.append(
                    {
                        "space": space,
                        "text_sha256": sha,
                        "layer": layer,
                        "shard": path,
                        "row": row,
                        "slot": slot,
                        "truncated": bool(truncated),
                    }
                )
        if len(pending) >= BATCH:
            _insert_pending(connection, OLD, pending)
    _insert_pending(connection, OLD, pending)
    with op.batch_alter_table("cached_texts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_cached_texts_shard_id"))
    op.drop_table("cached_texts")
    with op.batch_alter_table("cache_shards", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_cache_shards_space"))
    op.drop_table("cache_shards")
