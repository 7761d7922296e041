"""Pseudonym salts in their own column, update digests with participations, evaluation counts as doubles.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04

* ``tasks.pseudonym_salt``: the secret that keys client pseudonyms used to live inside the task's spec
  JSON (under ``pseudonym_salt``), so comparing or printing the spec had to step around it. Each task's
  salt moves to the new column and out of the spec, unchanged (every stored pseudonym stays valid). A task
  whose spec holds no salt (written by hand or by tests) gets a fresh random one. The column stays
  nullable: SQLite can make an added column NOT NULL only by rebuilding ``tasks``, and dropping ``tasks``
  inside the migration's transaction is refused while other tables' foreign keys point at it. The store
  writes a salt with every task, and this migration fills every existing row.
* ``participations.update_digest``: SHA-256 of an accepted update, so that a coordinator that committed a
  round and died before answering can tell the client's retry that its update is in the model.
* ``evaluations.num_correct`` / ``num_examples``: doubles, as on the wire (``ReportEvaluationRequest``); as
  32-bit integers on PostgreSQL a large count was a database error instead of a refused value.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SALT_KEY = "pseudonym_salt"  # where releases before 0005 kept the salt inside tasks.spec
COUNTS = ("num_correct", "num_examples")


def _tasks() -> sa.TableClause:
    return sa.table("tasks", sa.column("id", sa.Integer()), sa.column("spec", sa.JSON()),
                    sa.column("pseudonym_salt", sa.String(64)))


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("pseudonym_salt", sa.String(length=64), nullable=True))
    tasks = _tasks()
    connection = op.get_bind()
    for task_id, spec in connection.execute(sa.select(tasks.c.id, tasks.c.spec)).all():
        spec = dict(spec or {})
        salt = spec.pop(SALT_KEY, None) or secrets.token_hex(32)
        connection.execute(tasks.update().where(tasks.c.id == task_id).values(spec=spec, pseudonym_salt=salt))

    with op.batch_alter_table("participations") as batch:
        batch.add_column(sa.Column("update_digest", sa.String(length=64), nullable=True))

    with op.batch_alter_table("evaluations") as batch:
        for name in COUNTS:
            batch.alter_column(name, existing_type=sa.Integer(), type_=sa.Float(), existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("evaluations") as batch:
        for name in COUNTS:  # whole numbers by the coordinator's rules; rounded in case one is not
            batch.alter_column(name, existing_type=sa.Float(), type_=sa.Integer(), existing_nullable=False,
                               postgresql_using=f"round({name})::integer")

    with op.batch_alter_table("participations") as batch:
        batch.drop_column("update_digest")

    tasks = _tasks()
    connection = op.get_bind()
    rows = connection.execute(sa.select(tasks.c.id, tasks.c.spec, tasks.c.pseudonym_salt)).all()
    for task_id, spec, salt in rows:
        connection.execute(tasks.update().where(tasks.c.id == task_id)
                           .values(spec={**dict(spec or {}), SALT_KEY: salt}))
    op.drop_column("tasks", "pseudonym_salt")  # SQLite >= 3.35 drops a column in place
