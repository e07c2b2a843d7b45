"""probes and comparisons

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 10:58:32.175456
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "comparisons",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("model_id", sa.String(length=40), nullable=False),
        sa.Column("adapter_ids", sa.JSON(), nullable=False),
        sa.Column("dataset_id", sa.String(length=40), nullable=False),
        sa.Column("layers", sa.JSON(), nullable=False),
        sa.Column("method", sa.String(length=20), nullable=False),
        sa.Column("token_position", sa.String(length=10), nullable=False),
        sa.Column("artifact", sa.String(length=500), nullable=True),
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
    with op.batch_alter_table("comparisons", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_comparisons_job_id"), ["job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_comparisons_model_id"), ["model_id"], unique=False)

    op.create_table(
        "probe_runs",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("model_id", sa.String(length=40), nullable=False),
        sa.Column("adapter_id", sa.String(length=40), nullable=True),
        sa.Column("dataset_id", sa.String(length=40), nullable=False),
        sa.Column("layers", sa.JSON(), nullable=False),
        sa.Column("methods", sa.JSON(), nullable=False),
        sa.Column("token_position", sa.String(length=10), nullable=False),
        sa.Column("max_length", sa.Integer(), nullable=True),
        sa.Column("split", sa.JSON(), nullable=False),
        sa.Column("recalibration", sa.String(length=20), nullable=True),
        sa.Column("artifact", sa.String(length=500), nullable=True),
        sa.Column("best_probe_id", sa.String(length=40), nullable=True),
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
    with op.batch_alter_table("probe_runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_probe_runs_adapter_id"), ["adapter_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_probe_runs_job_id"), ["job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_probe_runs_model_id"), ["model_id"], unique=False)

    op.create_table(
        "probes",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("run_id", sa.String(length=40), nullable=False),
        sa.Column("model_id", sa.String(length=40), nullable=False),
        sa.Column("adapter_id", sa.String(length=40), nullable=True),
        sa.Column("dataset_id", sa.String(length=40), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(length=20), nullable=False),
        sa.Column("token_position", sa.String(length=10), nullable=False),
        sa.Column("max_length", sa.Integer(), nullable=True),
        sa.Column("recalibration", sa.String(length=20), nullable=True),
        sa.Column("is_best", sa.Boolean(), nullable=False),
        sa.Column("artifact", sa.String(length=500), nullable=False),
        sa.Column("validation", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["datasets.id"],
        ),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["probe_runs.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("probes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_probes_adapter_id"), ["adapter_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_probes_model_id"), ["model_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_probes_run_id"), ["run_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("probes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_probes_run_id"))
        batch_op.drop_index(batch_op.f("ix_probes_model_id"))
        batch_op.drop_index(batch_op.f("ix_probes_adapter_id"))

    op.drop_table("probes")
    with op.batch_alter_table("probe_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_probe_runs_model_id"))
        batch_op.drop_index(batch_op.f("ix_probe_runs_job_id"))
        batch_op.drop_index(batch_op.f("ix_probe_runs_adapter_id"))

    op.drop_table("probe_runs")
    with op.batch_alter_table("comparisons", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_comparisons_model_id"))
        batch_op.drop_index(batch_op.f("ix_comparisons_job_id"))

    op.drop_table("comparisons")
