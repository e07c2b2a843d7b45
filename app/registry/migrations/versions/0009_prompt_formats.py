"""prompt formats: recorded on extractions, probe runs, probes and comparisons; models say
whether they have a chat template

Rows made before prompt formats existed read their texts as they are: `raw`. Whether an
existing model has a chat template is not known until it is checked again (null).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 08:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("extractions", "probe_runs", "probes", "comparisons")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("prompt_format", sa.Text(), nullable=False, server_default="raw"))
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("has_chat_template", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("has_chat_template")
    for table in reversed(TABLES):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("prompt_format")
