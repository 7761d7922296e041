"""The aggregation stages each round ran.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05

* ``rounds.stages``: the names of the aggregation stages that ran, in order (for example
  ``["uniform_weights", "norm_clip", "gaussian_sum"]``), so a round says whether it was clipped, noised or
  robustly reduced. Nullable: rounds closed before this revision did not record them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("stages", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("stages")
