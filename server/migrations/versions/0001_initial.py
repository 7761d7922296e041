"""Initial schema: tasks, model versions, rounds, participations, evaluations.

Revision ID: 0001
Revises:
Create Date: 2026-11-24

Written to equal `fedrecon.server.store.schema` exactly (tests/test_store.py compares them). Column types
are spelled out here rather than imported so that this revision never changes when the code does.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROUND_STATES = ("open", "aggregating", "committed", "failed")
OUTCOMES = ("accepted", "refused", "late", "aborted", "dropped")


def _string_enum(values: Sequence[str], name: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=16)


def upgrade() -> None:
    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
        sa.UniqueConstraint("name", name=op.f("uq_tasks_name")),
    )
    op.create_table(
        "rounds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("round_num", sa.Integer(), nullable=False),
        sa.Column("state", _string_enum(ROUND_STATES, "round_state"), nullable=False),
        sa.Column("base_version", sa.Integer(), nullable=False),
        sa.Column("target", sa.Integer(), nullable=False),
        sa.Column("min_reports", sa.Integer(), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("num_selected", sa.Integer(), nullable=False),
        sa.Column("num_reported", sa.Integer(), nullable=False),
        sa.Column("num_accepted", sa.Integer(), nullable=False),
        sa.Column("num_refused", sa.Integer(), nullable=False),
        sa.Column("total_weight", sa.Float(), nullable=False),
        sa.Column("new_version", sa.Integer(), nullable=True),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name=op.f("fk_rounds_task_id_tasks")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rounds")),
        sa.UniqueConstraint("task_id", "round_num", name=op.f("uq_rounds_task_id_round_num")),
    )
    op.create_index(op.f("ix_rounds_task_id_state"), "rounds", ["task_id", "state"], unique=False)
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("parent_version", sa.Integer(), nullable=True),
        sa.Column("round_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("parameters", sa.LargeBinary(), nullable=False),
        sa.Column("optimizer_state", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["round_id"], ["rounds.id"], name=op.f("fk_model_versions_round_id_rounds")),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name=op.f("fk_model_versions_task_id_tasks")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        sa.UniqueConstraint("task_id", "version", name=op.f("uq_model_versions_task_id_version")),
    )
    op.create_table(
        "participations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("client_key", sa.String(length=64), nullable=False),
        sa.Column("outcome", _string_enum(OUTCOMES, "outcome"), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["round_id"], ["rounds.id"], name=op.f("fk_participations_round_id_rounds")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_participations")),
        sa.UniqueConstraint("round_id", "client_key", name=op.f("uq_participations_round_id_client_key")),
    )
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("client_key", sa.String(length=64), nullable=False),
        sa.Column("squared_error", sa.Float(), nullable=False),
        sa.Column("num_correct", sa.Integer(), nullable=False),
        sa.Column("num_examples", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["task_id", "version"],
            ["model_versions.task_id", "model_versions.version"],
            name=op.f("fk_evaluations_task_id_version_model_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluations")),
    )
    op.create_index(
        op.f("ix_evaluations_task_id_version"), "evaluations", ["task_id", "version"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_evaluations_task_id_version"), table_name="evaluations")
    op.drop_table("evaluations")
    op.drop_table("participations")
    op.drop_table("model_versions")
    op.drop_index(op.f("ix_rounds_task_id_state"), table_name="rounds")
    op.drop_table("rounds")
    op.drop_table("tasks")
