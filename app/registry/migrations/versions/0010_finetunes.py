"""fine-tunes: the finetunes table, progress details on jobs (a training step's loss), and
the linear layers a model's blocks hold (the default LoRA targets)

Models checked before this know no linear layers (null) until checked again; fine-tunes of
them are checked against their layers on the worker.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "finetunes",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("backend", sa.String(length=20), nullable=False),
        sa.Column("base_model_id", sa.String(length=40), nullable=False),
        sa.Column("dataset_id", sa.String(length=40), nullable=False),
        sa.Column("dataset_sha256", sa.String(length=64), nullable=False),
        sa.Column("prompt_format", sa.Text(), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("artifact", sa.String(length=500), nullable=False),
        sa.Column("adapter_id", sa.String(length=40), nullable=True),
        sa.Column("summary", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["base_model_id"], ["models.id"]),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("finetunes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_finetunes_job_id"), ["job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_finetunes_base_model_id"), ["base_model_id"], unique=False)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("progress_details", sa.JSON(), nullable=True))
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("linear_modules", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("linear_modules")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("progress_details")
    with op.batch_alter_table("finetunes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_finetunes_base_model_id"))
        batch_op.drop_index(batch_op.f("ix_finetunes_job_id"))
    op.drop_table("finetunes")
