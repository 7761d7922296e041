"""What the store hands out and what it raises.

The store returns frozen dataclasses of plain values, never ORM objects: a record can cross threads, outlive
its session and be logged or serialised without touching the database again (no lazy loads, no detached
instance errors). The errors are typed so that the coordinator can tell "this round lost the race"
(`StaleRound`) from "the caller asked for something that does not exist" (`UnknownTask`, ...) without
parsing messages.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any


class RoundState(StrEnum):
    """Where a round is in its life; only `OPEN` and `AGGREGATING` are unfinished.

    Legal transitions: open -> aggregating, open -> failed, aggregating -> committed, aggregating -> failed.
    A round is never committed straight from open: `SqlStore.commit_round` on an open round passes through
    aggregating inside its own transaction, so the rule holds for every committed round.
    """

    OPEN = "open"
    AGGREGATING = "aggregating"
    COMMITTED = "committed"
    FAILED = "failed"

    def can_become(self, target: RoundState) -> bool:
        """Whether ``self -> target`` is a legal transition."""
        return target in _TRANSITIONS[self]

    @property
    def is_finished(self) -> bool:
        """Committed and failed rounds are final: nothing may change them any more."""
        return not _TRANSITIONS[self]


_TRANSITIONS: MappingProxyType[RoundState, frozenset[RoundState]] = MappingProxyType({
    RoundState.OPEN: frozenset({RoundState.AGGREGATING, RoundState.FAILED}),
    RoundState.AGGREGATING: frozenset({RoundState.COMMITTED, RoundState.FAILED}),
    RoundState.COMMITTED: frozenset(),
    RoundState.FAILED: frozenset(),
})

UNFINISHED_STATES: frozenset[RoundState] = frozenset(s for s in RoundState if not s.is_finished)
"""Rounds in these states are still in flight (and are failed when a coordinator restarts)."""


class Outcome(StrEnum):
    """How one selected client's participation in a round ended."""

    ACCEPTED = "accepted"  # its update went into the aggregate
    REFUSED = "refused"  # it reported, but the update was rejected (malformed, non-finite, ...)
    LATE = "late"  # it reported after the round's deadline
    ABORTED = "aborted"  # it reported after the round had reached its goal; not needed any more
    DROPPED = "dropped"  # it was assigned work and never reported


@dataclass(frozen=True, slots=True)
class CredentialRecord:
    """A client credential as stored: its salted hash, never the secret."""

    credential_id: int
    label: str
    salt: str
    secret_hash: str
    created_at: datetime
    revoked_at: datetime | None
    max_devices: int = 1  # devices this credential may speak for (1: it is one device)

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A federated task: a name and its spec (model definition, hyper-parameters, round settings).

    ``pseudonym_salt`` is the task's secret key for client pseudonyms (HMAC of a caller's identity). It is
    kept apart from the spec (migration 0005 moved it out): the spec is a description people read, compare
    and print, the salt a secret that must never be shown or compared."""

    name: str
    spec: dict[str, Any]
    created_at: datetime
    pseudonym_salt: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """One global model version; ``parent`` is None only for version 0, ``round_id`` None unless a round
    produced it. The payloads are None when the caller did not ask for them (they can be megabytes)."""

    task: str
    version: int
    parent: int | None
    round_id: int | None
    created_at: datetime
    parameters: bytes | None = field(default=None, repr=False)
    optimizer_state: bytes | None = field(default=None, repr=False)

    def payload(self) -> tuple[bytes, bytes]:
        """(parameters, optimizer_state) of a record read with its payload; a record read without one is a
        programming error (``StoreFault``), not a value to pass on as None."""
        if self.parameters is None or self.optimizer_state is None:
            raise StoreFault(f"version {self.version} of task {self.task!r} was read without its payload")
        return self.parameters, self.optimizer_state


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """A round as stored: its settings, its state and, once closed, what came of it."""

    round_id: int
    task: str
    round_num: int
    state: RoundState
    base_version: int
    target: int
    min_reports: int
    opened_at: datetime
    deadline: datetime
    closed_at: datetime | None
    num_selected: int
    num_reported: int
    num_accepted: int
    num_refused: int
    total_weight: float
    new_version: int | None
    failure_reason: str | None
    metrics: dict[str, Any]
    stages: tuple[str, ...] | None = None  # the aggregation stages that ran, once closed


@dataclass(frozen=True, slots=True)
class Participation:
    """One client's part in a round. ``client_key`` is a pseudonymous hash (at most 64 characters), never a
    raw client id: the store must not be able to link rounds to people."""

    client_key: str
    outcome: Outcome
    weight: float
    metrics: dict[str, float]
    reason: str = ""
    # SHA-256 (hex) of an accepted update (its weight and tensors), so that a client retrying a report the
    # coordinator committed but never answered (it died in between) is told its update is in the model.
    digest: str | None = None


@dataclass(frozen=True, slots=True)
class RoundSummary:
    """The counts and aggregated metrics of a closed round, as computed by the coordinator."""

    num_selected: int
    num_reported: int
    num_accepted: int
    num_refused: int
    total_weight: float
    metrics: dict[str, float]
    stages: tuple[str, ...] = ()  # the aggregation stages that ran, in order (the round records them)


@dataclass(frozen=True, slots=True)
class EvaluationSummary:
    """Evaluation of one model version summed over clients, so that metrics are example-weighted: a client
    with 1000 ratings counts 100 times as much as one with 10, as if the data were pooled.

    The counts are floats because the wire carries them as doubles (and so do the columns since migration
    0005); the coordinator only accepts whole numbers for them."""

    version: int
    num_clients: int
    squared_error: float
    num_correct: float
    num_examples: float

    def metrics(self) -> dict[str, float]:
        """mse, rmse and accuracy over all examples; NaN where a value is not meaningful: no examples, or
        sums that overflowed (rows stored before the counts were bounded may sum past the float range).
        Never raises, whatever is stored."""
        n, se, correct = self.num_examples, self.squared_error, self.num_correct
        if not (math.isfinite(n) and n > 0):
            return {"mse": math.nan, "rmse": math.nan, "accuracy": math.nan}
        mse = se / n if math.isfinite(se) and se >= 0 else math.nan
        accuracy = correct / n if math.isfinite(correct) and 0 <= correct <= n else math.nan
        return {"mse": mse, "rmse": math.sqrt(mse) if math.isfinite(mse) else math.nan, "accuracy": accuracy}


class StoreError(Exception):
    """Base of every error the store raises on purpose; also wraps constraint violations.

    Three kinds matter to a caller (the servicer maps them to gRPC statuses):

    * `StoreUnavailable`: an outage. Retrying later may succeed: answer UNAVAILABLE with a retry hint, keep
      a due commit waiting.
    * `StoreFault` (and `StoreVanished`): the store or its schema is broken (a missing table, bad SQL, a
      value the code should have refused, a database file deleted under a running coordinator). Retrying
      cannot help: log it and answer INTERNAL; never retry it forever.
    * every other `StoreError` (`UnknownTask`, `StaleRound`, a constraint refusal, ...): a refusal of this
      particular request, which the caller turns into a domain answer.

    Arguments that could never be valid (a value outside its column's range, a label too long) raise
    `ValueError` before the database sees them: a bad value, INVALID_ARGUMENT when it came from a client.
    """


class StoreUnavailable(StoreError):
    """The database could not be reached or did not answer in time (locked, restarting, network, a
    serialization conflict). Nothing was written; the same call may succeed later: answer UNAVAILABLE."""


class StoreFault(StoreError):
    """The store cannot work as it is: a programming or schema error (a missing table or column, bad SQL,
    a corrupt file, a value the store should have refused before sending it). Nothing was written, and
    the same call will fail again until someone fixes the deployment or the code: log it, answer INTERNAL,
    do not retry."""


class StoreVanished(StoreFault):
    """The SQLite file the store opened was deleted or replaced while the coordinator was running. Writing
    on would go into an unlinked file (lost at exit) or into someone else's database, so every write is
    refused until the coordinator is restarted on the right file."""


class StoreUnopenable(StoreError):
    """The store URL names nothing that can be opened as a store, and retrying will not change that: a URL
    that does not parse, a driver that is not installed, a SQLite path in a missing or unwritable folder
    or naming a folder, a file that is not SQLite, a login the database server refuses. The operator must
    fix the URL or the system (``fedrecon`` exits 2)."""


class StoreNotFound(StoreUnopenable):
    """The URL is well formed and its server answers, but no store is there: a SQLite file that does not
    exist, a PostgreSQL database that does not exist, or a database without the store's tables, opened by a
    command that must not create one (``status``, ``export``, ``token list``)."""


class SchemaPolicy(StrEnum):
    """What opening a store (`open_store`) may do to its schema.

    * ``MIGRATE``: bring it to this release's newest revision (what ``serve`` does by default, and every
      command of a deployment that migrates on start).
    * ``REQUIRE_HEAD``: change nothing, and refuse unless it is at this release's newest revision
      (``serve --no-migrate``, for deployments that migrate as a step of their own: ``fedrecon db upgrade``).
    * ``AS_FOUND``: change nothing and accept any revision, none included (``fedrecon db current``, and
      ``db upgrade`` before it migrates).
    """

    MIGRATE = "migrate"
    REQUIRE_HEAD = "require_head"
    AS_FOUND = "as_found"


class SchemaOutOfDate(StoreUnopenable):
    """The store's schema is not the revision this release works with, and the command must not change it:
    behind (``serve --no-migrate`` before ``fedrecon db upgrade`` ran), or ahead (a newer release migrated
    it; this one cannot use it, nor take it back). The message says which and what to run."""

    def __init__(self, message: str, *, revision: str, head: str) -> None:
        super().__init__(message)
        self.revision = revision
        self.head = head


class UnknownCredential(StoreError):
    def __init__(self, credential_id: int) -> None:
        super().__init__(f"no credential {credential_id}")
        self.credential_id = credential_id


class UnknownTask(StoreError):
    def __init__(self, task: str) -> None:
        super().__init__(f"unknown task {task!r}")
        self.task = task


class UnknownVersion(StoreError):
    def __init__(self, task: str, version: int) -> None:
        super().__init__(f"task {task!r} has no model version {version}")
        self.task = task
        self.version = version


class UnknownRound(StoreError):
    def __init__(self, round_id: int) -> None:
        super().__init__(f"unknown round id {round_id}")
        self.round_id = round_id


class DuplicateTask(StoreError):
    def __init__(self, task: str) -> None:
        super().__init__(f"task {task!r} already exists")
        self.task = task


class InvalidTransition(StoreError):
    """The round is not in a state that allows the operation (e.g. committing a failed round)."""

    def __init__(
        self, round_id: int, task: str, state: RoundState, operation: str, allowed: Iterable[RoundState]
    ) -> None:
        when = " or ".join(s.value for s in RoundState if s in set(allowed))
        super().__init__(
            f"cannot {operation} round {round_id} of task {task!r}: it is {state} (allowed only when {when})"
        )
        self.round_id = round_id
        self.task = task
        self.state = state


DEFAULT_LEASE_TTL_S = 15.0  # a standby coordinator takes over within this long of its leader's last renewal


@dataclass(frozen=True, slots=True)
class Lease:
    """A coordinator's lead of a task: ``epoch`` is the fencing token its round writes carry."""

    task: str
    holder: str
    epoch: int
    expires_at: datetime


class LeaseHeld(StoreError):
    """Another coordinator leads the task and its lease has not expired."""

    def __init__(self, task: str, holder: str, expires_at: datetime) -> None:
        super().__init__(f"task {task!r} is led by {holder!r} until {expires_at:%H:%M:%S} UTC")
        self.task = task
        self.holder = holder
        self.expires_at = expires_at


class LeaseLost(StoreError):
    """The writer's lease epoch is no longer the task's: another coordinator took the lead meanwhile, so
    nothing was written (fencing)."""

    def __init__(self, task: str, epoch: int, current: int | None, holder: str | None) -> None:
        now = f"epoch {current} held by {holder!r}" if current is not None else "no lease"
        super().__init__(f"this coordinator's lead of task {task!r} (epoch {epoch}) is lost ({now}); "
                         "nothing was written")
        self.task = task
        self.epoch = epoch
        self.current = current


class StaleRound(StoreError):
    """The round was opened on a version that is no longer the task's latest: its update is outdated."""

    def __init__(self, round_id: int, task: str, base_version: int, latest_version: int) -> None:
        super().__init__(
            f"round {round_id} of task {task!r} was opened on version {base_version} but the latest version "
            f"is {latest_version}; its update is stale and was not committed"
        )
        self.round_id = round_id
        self.task = task
        self.base_version = base_version
        self.latest_version = latest_version
