"""transfer matrices: probes trained on some datasets, scored on others

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 16:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "transfers",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("model_id", sa.String(length=40), nullable=False),
        sa.Column("adapter_id", sa.String(length=40), nullable=True),
        sa.Column("train_dataset_ids", sa.JSON(), nullable=False),
        sa.Column("test_dataset_ids", sa.JSON(), nullable=False),
        sa.Column("union_train", sa.Boolean(), nullable=False),
        sa.Column("layers", sa.JSON(), nullable=False),
        sa.Column("method", sa.String(length=20), nullable=False),
        sa.Column("token_position", sa.String(length=10), nullable=False),
        sa.Column("max_length", sa.Integer(), nullable=True),
        sa.Column("prompt_format", sa.Text(), nullable=False),
        sa.Column("split", sa.JSON(), nullable=False),
        sa.Column("artifact", sa.String(length=500), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("transfers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_transfers_job_id"), ["job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_transfers_model_id"), ["model_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("transfers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_transfers_model_id"))
        batch_op.drop_index(batch_op.f("ix_transfers_job_id"))
    op.drop_table("transfers")
