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
"""

from .opening import open_store
from .records import (
    CredentialRecord,
    DuplicateTask,
    EvaluationSummary,
    InvalidTransition,
    Outcome,
    Participation,
    RoundRecord,
    RoundState,
    RoundSummary,
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
from .sql_store import SqlStore, require_label

__all__ = [
    "CredentialRecord",
    "DuplicateTask",
    "EvaluationSummary",
    "InvalidTransition",
    "Outcome",
    "Participation",
    "RoundRecord",
    "RoundState",
    "RoundSummary",
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
