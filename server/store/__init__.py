"""The coordinator's durable state: tasks, model versions, rounds, participations and evaluations.

Design:

* All state sits behind one interface, `SqlStore`, whose methods are domain verbs (`open_round`,
  `commit_round`, ...) rather than tables and queries, so the coordinator holds no SQL and the storage can
  change without touching it.
* Out come plain frozen dataclasses (`records`), never ORM objects: they are safe to pass between threads
  and to keep after the transaction that produced them.
* Refusals are typed errors (`UnknownTask`, `InvalidTransition`, `StaleRound`, ... all `StoreError`), so the
  coordinator reacts to what happened instead of parsing messages. Outages (`StoreUnavailable`: retry)
  and faults (`StoreFault`: a broken store or schema, log and answer INTERNAL, never retry) are told
  apart; values that do not fit their columns are refused in Python (``ValueError``) before any SQL.
* A round is closed and its model version written in ONE transaction: a crash or a lost race never leaves a
  committed round without its version, or a version without its round.
* Operators' commands open a store through `open_store` (``opening``), which turns every way opening can
  fail (a missing folder, a relative path meant as absolute, a database never created, a server that is
  down, a bad URL) into a one-line diagnosis: `StoreUnopenable` / `StoreNotFound` (fix the command) or
  `StoreUnavailable` (retry); a command that only reads never creates a store.
* SQLite is the default (a file next to the coordinator, nothing to operate); any SQLAlchemy URL works, and
  the test suite runs the same contract against PostgreSQL. The schema is migrated by Alembic on start
  (`fedrecon.server.migrations`).
* The records and errors import no database driver: SQLAlchemy loads only when `SqlStore`, `open_store` or
  `require_label` is first used, so pure code (the round state machine) can speak the store's types.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .records import (
    DEFAULT_LEASE_TTL_S,
    CredentialRecord,
    DuplicateTask,
    EvaluationSummary,
    InvalidTransition,
    Lease,
    LeaseHeld,
    LeaseLost,
    Outcome,
    Participation,
    RoundRecord,
    RoundState,
    RoundSummary,
    SchemaOutOfDate,
    SchemaPolicy,
    StaleRound,
    StoreError,
    StoreFault,
    StoreNotFound,
    StoreUnavailable,
    StoreUnopenable,
    StoreVanished,
    TaskRecord,
    UnknownCredential,
    UnknownRound,
    UnknownTask,
    UnknownVersion,
    VersionRecord,
)

if TYPE_CHECKING:
    from .opening import open_store
    from .sql_store import SqlStore, require_label

_LAZY = {"SqlStore": "sql_store", "require_label": "sql_store", "open_store": "opening"}


def __getattr__(name: str) -> Any:
    """The SQL parts on first use (PEP 562), so importing a record does not import SQLAlchemy."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DEFAULT_LEASE_TTL_S",
    "CredentialRecord",
    "DuplicateTask",
    "EvaluationSummary",
    "InvalidTransition",
    "Lease",
    "LeaseHeld",
    "LeaseLost",
    "Outcome",
    "Participation",
    "RoundRecord",
    "RoundState",
    "RoundSummary",
    "SchemaOutOfDate",
    "SchemaPolicy",
    "SqlStore",
    "StaleRound",
    "StoreError",
    "StoreFault",
    "StoreNotFound",
    "StoreUnavailable",
    "StoreUnopenable",
    "StoreVanished",
    "TaskRecord",
    "UnknownCredential",
    "UnknownRound",
    "UnknownTask",
    "UnknownVersion",
    "VersionRecord",
    "open_store",
    "require_label",
]
