"""Task leases: which coordinator leads a task's rounds, with a fencing epoch.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05

* ``task_leases``: one row per task once a coordinator led it: the holder's replica id, the epoch (the
  fencing token, growing with every change of holder) and when the lease expires. Round writes carry the
  epoch their coordinator leads under and are refused when it is no longer the task's.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "task_leases",
        sa.Column("task_id", sa.Integer(), sa.ForeignKey("tasks.id"), primary_key=True),
        sa.Column("holder", sa.String(length=128), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("task_leases")
