"""probe evaluations: a trained probe scored on another labelled dataset

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 16:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "probe_evaluations",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("probe_id", sa.String(length=40), nullable=False),
        sa.Column("model_id", sa.String(length=40), nullable=False),
        sa.Column("adapter_id", sa.String(length=40), nullable=True),
        sa.Column("dataset_id", sa.String(length=40), nullable=False),
        sa.Column("prompt_format", sa.Text(), nullable=False),
        sa.Column("rows", sa.String(length=10), nullable=False),
        sa.Column("n", sa.Integer(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("artifact", sa.String(length=500), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["probe_id"], ["probes.id"]),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"]),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("probe_evaluations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_probe_evaluations_job_id"), ["job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_probe_evaluations_probe_id"), ["probe_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_probe_evaluations_model_id"), ["model_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("probe_evaluations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_probe_evaluations_model_id"))
        batch_op.drop_index(batch_op.f("ix_probe_evaluations_probe_id"))
        batch_op.drop_index(batch_op.f("ix_probe_evaluations_job_id"))
    op.drop_table("probe_evaluations")
