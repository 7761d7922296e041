"""One evaluation per client and model version: a retried evaluation report replaces, never adds.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24

Keeps the newest row of any (task, version, client) that was reported more than once, then adds the
unique constraint the store's upsert relies on.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ["task_id", "version", "client_key"]


def upgrade() -> None:
    evaluations = sa.table("evaluations", sa.column("id"), *(sa.column(c) for c in COLUMNS))
    keep = sa.select(sa.func.max(evaluations.c.id)).group_by(*(evaluations.c[c] for c in COLUMNS))
    op.execute(evaluations.delete().where(evaluations.c.id.not_in(keep)))
    with op.batch_alter_table("evaluations") as batch:
        batch.create_unique_constraint("uq_evaluations_task_id_version_client_key", COLUMNS)


def downgrade() -> None:
    with op.batch_alter_table("evaluations") as batch:
        batch.drop_constraint("uq_evaluations_task_id_version_client_key", type_="unique")
