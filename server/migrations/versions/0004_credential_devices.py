"""Credentials say how many devices they may speak for (``max_devices``, 1 unless issued otherwise).

With authentication on, a client's identity is derived from its credential, not from the client id it
asserts: a credential with ``max_devices = 1`` is one device (one open assignment, one rate limit). A
credential issued for a gateway or a test harness may speak for up to ``max_devices`` devices, told apart
by their client ids within that credential only.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("credentials") as batch:
        batch.add_column(sa.Column("max_devices", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("credentials") as batch:
        batch.drop_column("max_devices")
