"""datasets, extractions and the hidden-state cache

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 10:27:36.211912
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("source_format", sa.String(length=10), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("label_balance", sa.JSON(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("upload_sha256", sa.String(length=64), nullable=False),
        sa.Column("artifact", sa.String(length=500), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sha256"),
    )
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
    op.create_table(
        "extractions",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("model_id", sa.String(length=40), nullable=False),
        sa.Column("adapter_id", sa.String(length=40), nullable=True),
        sa.Column("dataset_id", sa.String(length=40), nullable=True),
        sa.Column("text_count", sa.Integer(), nullable=False),
        sa.Column("layers", sa.JSON(), nullable=False),
        sa.Column("token_position", sa.String(length=10), nullable=False),
        sa.Column("max_length", sa.Integer(), nullable=True),
        sa.Column("artifact", sa.String(length=500), nullable=True),
        sa.Column("shape", sa.JSON(), nullable=True),
        sa.Column("dtype", sa.String(length=20), nullable=True),
        sa.Column("truncated_count", sa.Integer(), nullable=True),
        sa.Column("cache_hits", sa.Integer(), nullable=True),
        sa.Column("model_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("adapter_fingerprint", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["datasets.id"],
        ),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("extractions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_extractions_dataset_id"), ["dataset_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_extractions_job_id"), ["job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_extractions_model_id"), ["model_id"], unique=False)

    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fingerprint", sa.String(length=64), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("fingerprint")

    with op.batch_alter_table("extractions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_extractions_model_id"))
        batch_op.drop_index(batch_op.f("ix_extractions_job_id"))
        batch_op.drop_index(batch_op.f("ix_extractions_dataset_id"))

    op.drop_table("extractions")
    op.drop_table("hidden_state_cache")
    op.drop_table("datasets")
