"""adapter identity: adapters are one per base model and (weights, output-changing config)

Until now an adapter was unique by its weights' sha256 alone, so the same weights imported
with another lora_alpha came back as the existing adapter, with the old scale. Rows
converted so far all have a config of r, lora_alpha and target_modules (their row's columns)
with use_rslora false, bias "none" and fan_in_fan_out false, so their identity is computed
from the row exactly as `app.registry.adapters.adapter_identity` computes it for new imports. Their
files stay where they are (`adapters/<sha256>/`); the row names them.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 01:50:00.000000
"""

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def identity_of_row(sha256: str, r: int, lora_alpha: float, target_modules: list[str]) -> str:
    """A frozen copy of `app.registry.adapters.adapter_identity` for a config as converters before
    this revision wrote it (a test checks they agree)."""
    config: dict[str, Any] = {
        "r": r,
        "lora_alpha": float(lora_alpha),
        "target_modules": sorted(target_modules),
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
    }
    canonical = json.dumps(
        {"weights_sha256": sha256, "config": config}, sort_keys=True, separators=(",", ":"), allow_nan=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def upgrade() -> None:
    with op.batch_alter_table("adapters", schema=None) as batch_op:
        batch_op.add_column(sa.Column("identity", sa.String(length=64), nullable=True))
    adapters = sa.table(
        "adapters",
        sa.column("id", sa.String()),
        sa.column("sha256", sa.String()),
        sa.column("r", sa.Integer()),
        sa.column("lora_alpha", sa.Double()),
        sa.column("target_modules", sa.JSON()),
        sa.column("identity", sa.String()),
    )
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(adapters.c.id, adapters.c.sha256, adapters.c.r, adapters.c.lora_alpha, adapters.c.target_modules)
    ).all()
    for row in rows:
        identity = identity_of_row(row.sha256, row.r, row.lora_alpha, row.target_modules)
        connection.execute(sa.update(adapters).where(adapters.c.id == row.id).values(identity=identity))
    with op.batch_alter_table("adapters", schema=None) as batch_op:
        batch_op.alter_column("identity", existing_type=sa.String(length=64), nullable=False)
        batch_op.drop_constraint("uq_adapters_base_weights", type_="unique")
        batch_op.create_unique_constraint("uq_adapters_base_identity", ["base_model_id", "identity"])


def downgrade() -> None:
    # fails if two adapters of one base now share weights (with different configs): only
    # one of them could stay, and choosing is not a migration's to do
    with op.batch_alter_table("adapters", schema=None) as batch_op:
        batch_op.drop_constraint("uq_adapters_base_identity", type_="unique")
        batch_op.create_unique_constraint("uq_adapters_base_weights", ["base_model_id", "sha256"])
        batch_op.drop_column("identity")
