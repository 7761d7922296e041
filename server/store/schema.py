"""The coordinator's tables, as SQLAlchemy 2 typed declarative models.

This module is the single source of truth for the schema: the Alembic revisions in
`fedrecon.server.migrations` are written to equal `Base.metadata` exactly, and a test compares the migrated
database against it. Constraint names come from a naming convention so that migrations can refer to them
and autogenerate is deterministic on every backend.

These classes never leave the store: `sql_store` converts rows into the plain records of `records`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from .records import Outcome, RoundState

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

CLIENT_KEY_LENGTH = 64
"""A client key is a hex digest (SHA-256 is 64 characters), never a raw client id."""

DIGEST_LENGTH = 64
"""An update digest is a SHA-256 hex digest."""

TASK_NAME_LENGTH = 128
LABEL_LENGTH = 200
SALT_LENGTH = 64

INTEGER_RANGE = (-(2**31), 2**31 - 1)
"""What an ``Integer`` column holds on every backend (PostgreSQL's ``integer`` is 32 bits; SQLite would
store more). Values outside are refused in Python before a flush (`check_fits`), so both backends behave
alike and a client's oversized number is a bad value, not a database error."""


class UtcDateTime(TypeDecorator[datetime]):
    """A ``DateTime(timezone=True)`` that only accepts aware datetimes and always returns aware UTC ones.

    SQLite has no time zone type and hands back naive values; PostgreSQL hands them back in the session's
    zone. Normalising here means no caller ever compares a naive datetime with an aware one.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store only accepts timezone-aware datetimes")
        value = value.astimezone(UTC)
        # SQLite's DATETIME storage would silently drop the offset; store naive UTC explicitly instead.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _string_enum(enum: type[RoundState] | type[Outcome], name: str) -> Enum:
    """A VARCHAR plus CHECK constraint storing the enum's *values*, so the column reads well in plain SQL and
    adding a state never needs a PostgreSQL ``ALTER TYPE``."""
    return Enum(
        enum,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 (SQLAlchemy reads this class attribute)
        datetime: UtcDateTime(),
        dict[str, Any]: JSON(),
        bytes: LargeBinary(),
    }


HOLDER_LENGTH = 128  # a coordinator's replica id (host:pid:random by default)


class Task(Base):
    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(TASK_NAME_LENGTH), unique=True)
    spec: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    # The HMAC key of client pseudonyms: a secret, kept out of the spec that status prints (migration 0005).
    # Always written; nullable only because SQLite cannot add a NOT NULL column to a referenced table
    # inside a transaction (see the migration).
    pseudonym_salt: Mapped[str | None] = mapped_column(String(SALT_LENGTH))


class TaskLease(Base):
    """Which coordinator leads a task's rounds (migration 0007). ``epoch`` is the fencing token: it grows
    whenever another holder takes the lease, and every round write of a leader carries the epoch it led
    under, so a leader that was paused past its lease can never write over its successor."""

    __tablename__ = "task_leases"

    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), primary_key=True)
    holder: Mapped[str] = mapped_column(String(HOLDER_LENGTH))
    epoch: Mapped[int]
    expires_at: Mapped[datetime]


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (
        UniqueConstraint("task_id", "round_num"),
        Index(None, "task_id", "state"),  # fail_unfinished_rounds
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    round_num: Mapped[int]
    state: Mapped[RoundState] = mapped_column(_string_enum(RoundState, "round_state"))
    base_version: Mapped[int]
    target: Mapped[int]
    min_reports: Mapped[int]
    opened_at: Mapped[datetime]
    deadline: Mapped[datetime]
    closed_at: Mapped[datetime | None]
    num_selected: Mapped[int] = mapped_column(default=0)
    num_reported: Mapped[int] = mapped_column(default=0)
    num_accepted: Mapped[int] = mapped_column(default=0)
    num_refused: Mapped[int] = mapped_column(default=0)
    total_weight: Mapped[float] = mapped_column(Float, default=0.0)
    new_version: Mapped[int | None]
    failure_reason: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any]]
    # The aggregation stages that ran, in order (e.g. uniform_weights, norm_clip, gaussian_sum); null for
    # rounds closed before migration 0006 and for rounds still open.
    stages: Mapped[list[str] | None] = mapped_column(JSON)


class ModelVersion(Base):
    """A global model. The payloads are deferred: listing versions must not load megabytes of weights."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("task_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    version: Mapped[int]
    parent_version: Mapped[int | None]
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id"))
    created_at: Mapped[datetime]
    parameters: Mapped[bytes] = mapped_column(deferred=True)
    optimizer_state: Mapped[bytes] = mapped_column(deferred=True)


class ParticipationRow(Base):
    __tablename__ = "participations"
    __table_args__ = (UniqueConstraint("round_id", "client_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"))
    client_key: Mapped[str] = mapped_column(String(CLIENT_KEY_LENGTH))
    outcome: Mapped[Outcome] = mapped_column(_string_enum(Outcome, "outcome"))
    weight: Mapped[float] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]]
    reason: Mapped[str] = mapped_column(Text, default="")
    # SHA-256 of an accepted update, to recognise a retry after a restart (migration 0005).
    update_digest: Mapped[str | None] = mapped_column(String(DIGEST_LENGTH))


class Evaluation(Base):
    """One client's evaluation of one model version; the composite foreign key makes evaluating a version
    that does not exist impossible at the database level."""

    __tablename__ = "evaluations"
    __table_args__ = (
        ForeignKeyConstraint(["task_id", "version"], ["model_versions.task_id", "model_versions.version"]),
        Index(None, "task_id", "version"),
        UniqueConstraint("task_id", "version", "client_key"),  # a retried report replaces (migration 0002)
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int]
    version: Mapped[int]
    client_key: Mapped[str] = mapped_column(String(CLIENT_KEY_LENGTH))
    # Doubles, as on the wire (ReportEvaluationRequest): an integer column overflowed on PostgreSQL at 2**31
    # (migration 0005). The coordinator accepts only whole, bounded counts.
    squared_error: Mapped[float] = mapped_column(Float)
    num_correct: Mapped[float] = mapped_column(Float)
    num_examples: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime]


class Credential(Base):
    """A client credential: only a salted SHA-256 of the secret is kept, never the secret itself."""

    __tablename__ = "credentials"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    label: Mapped[str] = mapped_column(String(LABEL_LENGTH))
    salt: Mapped[str] = mapped_column(String(64))
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    # How many devices this credential may speak for (1: it is one device); see migration 0004.
    max_devices: Mapped[int] = mapped_column(Integer, server_default="1", default=1)


def check_fits(row: Base) -> None:
    """Raise ``ValueError`` when a value of ``row`` cannot be stored as its column declares: an integer
    outside `INTEGER_RANGE`, a string longer than its ``String(n)``, a float that is NaN or infinite (SQLite
    turns NaN into NULL, PostgreSQL would store it and break sums).

    Called for every new or changed row before a flush, so a bad value is refused in Python with a message
    naming the column, the same way on every backend, and never reaches the database as a ``DataError``.
    """
    check_values(type(row), {column.key: getattr(row, column.key, None) for column in row.__table__.columns})


def check_values(model: type[Base], values: Mapping[str, Any]) -> None:
    """``check_fits`` for a row of ``model`` given as column values (a bulk insert, which no flush sees)."""
    for column in model.__table__.columns:
        value = values.get(column.key)
        if value is None or isinstance(value, bool):
            continue
        where = f"{model.__tablename__}.{column.key}"
        kind = column.type
        if isinstance(kind, Integer) and isinstance(value, int):
            lo, hi = INTEGER_RANGE
            if not lo <= value <= hi:
                raise ValueError(f"{where} must be an integer in [{lo}, {hi}], got {value}")
        elif isinstance(kind, String) and isinstance(value, str):
            if kind.length is not None and len(value) > kind.length:
                raise ValueError(f"{where} holds at most {kind.length} characters, got {len(value)}")
        elif isinstance(kind, Float) and isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number, got {value}")
