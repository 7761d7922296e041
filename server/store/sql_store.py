"""`SqlStore`: the coordinator's whole state behind domain verbs, on any SQLAlchemy database.

Every public method is one short transaction on its own session, so the store can be shared by the
coordinator's gRPC worker threads. Methods that decide something from what they read (commit a round only if
its base is still the latest version, number a new round after the highest one) lock the rows they decide
on: ``SELECT ... FOR NO KEY UPDATE`` on PostgreSQL, and on SQLite (which ignores FOR UPDATE) a write
transaction started with ``BEGIN IMMEDIATE``, which takes the database's single write lock up front. Rows are
always locked task first, then round, so two transactions cannot deadlock on them.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, Numeric, cast, create_engine, distinct, event, func, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    IntegrityError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker, undefer
from sqlalchemy.pool import StaticPool

from fedrecon.server.migrations import upgrade_to_head

from .records import (
    UNFINISHED_STATES,
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
    StaleRound,
    StoreError,
    StoreFault,
    StoreUnavailable,
    StoreVanished,
    TaskRecord,
    UnknownCredential,
    UnknownRound,
    UnknownTask,
    UnknownVersion,
    VersionRecord,
)
from .schema import (
    CLIENT_KEY_LENGTH,
    HOLDER_LENGTH,
    INTEGER_RANGE,
    LABEL_LENGTH,
    Credential,
    Evaluation,
    ModelVersion,
    ParticipationRow,
    Round,
    Task,
    TaskLease,
    check_fits,
    check_values,
)

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_S = 30.0
"""How long a SQLite transaction waits for another's write lock before failing with "database is locked"."""

CONNECT_TIMEOUT_S = 10
"""How long a connection attempt to a database server (PostgreSQL) may take, unless the URL sets
``connect_timeout`` itself."""

IDLE_IN_TRANSACTION_TIMEOUT_MS = 5000
"""PostgreSQL ends a session of the store that stays idle inside a transaction this long (unless the URL
sets ``options``): the store's transactions send their statements back to back, so only a coordinator that
was paused (SIGSTOP), cut off from the server or starved mid-transaction idles there, and the row locks it
holds (the task's lease, a round) would otherwise keep a standby from taking over until it woke up. The
server arms this timeout only after a statement's Sync, so it does not cover a session cut off in the middle
of a pipeline (``executemany``): `SqlStore.acquire_lease` ends those."""

LEASE_LOCK_WAIT_S = 5.0
"""How long a coordinator taking over an *expired* lease waits for the lease row while another session
holds it locked (PostgreSQL ``lock_timeout``), before it ends that session's transaction (`acquire_lease`).
A healthy leader holds the row for milliseconds; one that holds it this long past its lease was cut off
mid-transaction, where ``IDLE_IN_TRANSACTION_TIMEOUT_MS`` may not apply (see `acquire_lease`)."""

APPLICATION_NAME = "fedrecon"
"""The ``application_name`` of the store's PostgreSQL sessions (unless the URL sets one): what tells an
operator's ``pg_stat_activity`` which sessions are coordinators', and the only sessions `acquire_lease`
ever ends."""

MIGRATION_LOCK_KEY = 0x66656472_65636F6E  # "fedrecon" in ASCII: a 64-bit advisory lock key of our own
"""The PostgreSQL advisory lock that serialises schema migrations (`SqlStore.migrate`)."""

_READ_ONLY = "fedrecon_read_only"  # execution option: this transaction only reads


def utc_now() -> datetime:
    return datetime.now(UTC)


class SqlStore:
    """The coordinator's state: tasks, model versions, rounds, participations and evaluations.

    Contracts every method keeps:

    * it runs in one transaction: it either does all it says or raises and changes nothing;
    * it returns plain records (`records`), never ORM objects, and datetimes are timezone-aware UTC;
    * it raises a `StoreError` subclass for every refusal (unknown names, illegal transitions, stale rounds,
      constraint violations), `StoreUnavailable` for an outage, `StoreFault` for a broken store (see
      `StoreError`), and `ValueError` for arguments that could never be valid, among them any value that
      does not fit its column (checked in Python before every flush: `schema.check_fits`);
    * on a SQLite file, a write first checks that the file is still the one opened (`StoreVanished`).
    """

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        """Connect to ``url`` (e.g. ``sqlite:///coordinator.db``, ``postgresql+psycopg://user@host/db``).

        With ``migrate`` the schema is brought to the newest Alembic revision first, so a fresh database is
        created and an older one upgraded; on an up-to-date database this changes nothing.
        """
        self._engine = _create_engine(url)
        # An in-memory SQLite database lives in one connection shared by every thread; its transactions
        # must not interleave, so they take turns.
        self._turns: AbstractContextManager[Any] = (
            threading.Lock() if _is_memory_sqlite(url) else nullcontext()
        )
        if migrate:
            self.migrate()
        self._file = _sqlite_file(url)
        self._file_identity = _file_identity(self._file) if self._file else None
        if self._file and self._file_identity is None:  # not created yet (migrate=False): create it now
            with _refusals_as_store_errors(), self._engine.connect():
                pass
            self._file_identity = _file_identity(self._file)
        self._writes = sessionmaker(self._engine, expire_on_commit=False)
        self._reads = sessionmaker(
            self._engine.execution_options(**{_READ_ONLY: True}), expire_on_commit=False
        )
        for sessions in (self._writes, self._reads):
            event.listen(sessions, "before_flush", _check_rows_fit)

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (creating it in an empty database), in one
        transaction; a no-op on an up-to-date database.

        On PostgreSQL the transaction first takes an advisory lock, so migrations started at once (replicas
        starting together, one ``fedrecon db upgrade`` init container per pod) run one after the other: the
        later ones find the schema at head and do nothing, instead of failing on tables the first created.
        SQLite needs no lock: its write transactions already exclude each other."""
        with _refusals_as_store_errors(), self._engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            upgrade_to_head(connection)

    def schema_revision(self) -> str | None:
        """The Alembic revision the database is at; None when it holds no store schema at all (an empty
        database, or someone else's): what tells a command that must not create a store that none is there.
        """
        with _refusals_as_store_errors(), self._engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def ping(self) -> None:
        """Return if the store can serve now, else raise its error: `StoreUnavailable` when the database
        does not answer, `StoreVanished` when the SQLite file was deleted or replaced. One tiny read (a
        row of the tasks table, so the schema is really there): what the gRPC health service probes."""
        self._require_same_file()
        with self._read() as session:
            session.execute(select(Task.id).limit(1)).all()

    @property
    def url(self) -> str:
        """The database URL with any password masked, safe to log."""
        return self._engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        """Close every pooled connection; the store must not be used afterwards."""
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SqlStore({self.url!r})"

    # -- tasks ------------------------------------------------------------------------------------------

    def create_task(
        self, name: str, spec: Mapping[str, Any], *, initial_parameters: bytes, optimizer_state: bytes,
        pseudonym_salt: str | None = None,
    ) -> TaskRecord:
        """Create task ``name`` together with its version 0 (parent None, no round), in one transaction, so
        that a task without a model can never be observed. Raises `DuplicateTask` if the name is taken.
        ``pseudonym_salt`` (hex) keys the task's client pseudonyms; a random one is made when not given."""
        if not name:
            raise ValueError("a task needs a non-empty name")
        salt = pseudonym_salt if pseudonym_salt is not None else secrets.token_hex(32)
        now = utc_now()
        with self._write() as s:
            if s.scalar(select(Task.id).where(Task.name == name)) is not None:
                raise DuplicateTask(name)
            task = Task(name=name, spec=dict(spec), created_at=now, pseudonym_salt=salt)
            s.add(task)
            try:
                s.flush()
            except IntegrityError as exc:  # another writer created it after our check (PostgreSQL)
                raise DuplicateTask(name) from exc
            s.add(ModelVersion(
                task_id=task.id, version=0, parent_version=None, round_id=None, created_at=now,
                parameters=bytes(initial_parameters), optimizer_state=bytes(optimizer_state),
            ))
            return _task_record(task)

    def get_task(self, name: str) -> TaskRecord:
        """Task ``name``; raises `UnknownTask`."""
        with self._read() as s:
            return _task_record(_task(s, name))

    def list_tasks(self) -> list[TaskRecord]:
        """Every task, by name."""
        with self._read() as s:
            return [_task_record(t) for t in s.scalars(select(Task).order_by(Task.name))]

    # -- credentials ------------------------------------------------------------------------------------

    def add_credential(self, label: str, *, salt: str, secret_hash: str, max_devices: int = 1
                       ) -> CredentialRecord:
        """Store a new client credential (its salted hash only); the caller generated the secret.
        ``max_devices`` > 1 lets one credential speak for that many devices (a gateway). The label must be
        1 to `LABEL_LENGTH` printable characters (`require_label`), else ``ValueError``."""
        require_label(label)
        if not 1 <= max_devices <= INTEGER_RANGE[1]:
            raise ValueError(f"max_devices must be between 1 and {INTEGER_RANGE[1]}, got {max_devices}")
        with self._write() as s:
            row = Credential(label=label, salt=salt, secret_hash=secret_hash, created_at=utc_now(),
                             revoked_at=None, max_devices=max_devices)
            s.add(row)
            s.flush()
            return _credential_record(row)

    def get_credential(self, credential_id: int) -> CredentialRecord:
        """Raises `UnknownCredential` (also for an id no row can have: outside the id column's range)."""
        if not 1 <= credential_id <= INTEGER_RANGE[1]:
            raise UnknownCredential(credential_id)
        with self._read() as s:
            row = s.get(Credential, credential_id)
            if row is None:
                raise UnknownCredential(credential_id)
            return _credential_record(row)

    def revoke_credential(self, credential_id: int) -> CredentialRecord:
        """Mark a credential revoked (idempotent: the first revocation time is kept)."""
        with self._write() as s:
            row = s.get(Credential, credential_id)
            if row is None:
                raise UnknownCredential(credential_id)
            if row.revoked_at is None:
                row.revoked_at = utc_now()
            return _credential_record(row)

    def list_credentials(self) -> list[CredentialRecord]:
        with self._read() as s:
            return [_credential_record(r) for r in s.scalars(select(Credential).order_by(Credential.id))]

    # -- model versions ---------------------------------------------------------------------------------

    def latest_version(self, task: str, *, with_payload: bool = True) -> VersionRecord:
        """The task's newest model version (every task has at least version 0); raises `UnknownTask`."""
        with self._read() as s:
            task_row = _task(s, task)
            stmt = (select(ModelVersion).where(ModelVersion.task_id == task_row.id)
                    .order_by(ModelVersion.version.desc()).limit(1))
            row = s.scalars(_with_payload(stmt, with_payload)).one_or_none()
            if row is None:
                raise StoreError(f"task {task!r} has no model version at all (the database was altered)")
            return _version_record(row, task, with_payload)

    def get_version(self, task: str, version: int, *, with_payload: bool = True) -> VersionRecord:
        """Version ``version`` of the task; raises `UnknownTask` or `UnknownVersion`."""
        with self._read() as s:
            task_row = _task(s, task)
            stmt = select(ModelVersion).where(ModelVersion.task_id == task_row.id,
                                              ModelVersion.version == version)
            row = s.scalars(_with_payload(stmt, with_payload)).one_or_none()
            if row is None:
                raise UnknownVersion(task, version)
            return _version_record(row, task, with_payload)

    def list_versions(self, task: str) -> list[VersionRecord]:
        """Every version of the task, oldest first, without payloads."""
        with self._read() as s:
            task_row = _task(s, task)
            rows = s.scalars(select(ModelVersion).where(ModelVersion.task_id == task_row.id)
                             .order_by(ModelVersion.version))
            return [_version_record(r, task, with_payload=False) for r in rows]

    # -- rounds -----------------------------------------------------------------------------------------

    def open_round(
        self, task: str, *, base_version: int, target: int, min_reports: int, deadline: datetime,
        fencing: Lease | None = None,
    ) -> RoundRecord:
        """Open a round training on ``base_version``, numbered one past the task's highest round (failed
        rounds count, so numbers are never reused). Raises `UnknownTask`, or `UnknownVersion` if the base
        does not exist; ``deadline`` must be timezone-aware and ``1 <= min_reports <= target``."""
        _require_aware(deadline, "deadline")
        if not 1 <= min_reports <= target:
            raise ValueError(
                f"need 1 <= min_reports <= target, got min_reports={min_reports}, target={target}"
            )
        with self._write() as s:
            task_row = _task(s, task, lock=True)  # serialises round numbering per task
            _check_fencing(s, task_row.id, task, fencing)
            if _version_id(s, task_row.id, base_version) is None:
                raise UnknownVersion(task, base_version)
            highest = s.scalar(select(func.max(Round.round_num)).where(Round.task_id == task_row.id))
            row = Round(
                task_id=task_row.id, round_num=(highest or 0) + 1, state=RoundState.OPEN,
                base_version=base_version, target=target, min_reports=min_reports, opened_at=utc_now(),
                deadline=deadline.astimezone(UTC), metrics={},
            )
            s.add(row)
            s.flush()
            return _round_record(row, task)

    def mark_aggregating(self, round_id: int, *, fencing: Lease | None = None) -> RoundRecord:
        """open -> aggregating (the round stops accepting work); raises `InvalidTransition` from any other
        state, `UnknownRound`, and `LeaseLost` when ``fencing`` is no longer the task's lease."""
        with self._write() as s:
            row, task = _round(s, round_id, lock=True)
            _check_fencing(s, row.task_id, task, fencing)
            _transition(row, task, RoundState.AGGREGATING, "start aggregating")
            return _round_record(row, task)

    def commit_round(
        self,
        round_id: int,
        *,
        parameters: bytes,
        optimizer_state: bytes,
        summary: RoundSummary,
        participations: Sequence[Participation],
        fencing: Lease | None = None,
    ) -> VersionRecord:
        """Commit the round's aggregate as version ``base_version + 1`` and close the round, atomically.

        In one transaction: the round must be open or aggregating (else `InvalidTransition`; an open round
        passes through aggregating here), its base version MUST still be the task's latest (else
        `StaleRound`), then the new version (parent = base, round_id = this round) is written, the round
        becomes committed with its counts, metrics, new version and closed_at, and the participations are
        recorded (a non-finite metric is stored as null: JSON has no NaN). If anything fails — a refusal
        above or a constraint violation such as a client key listed twice (`StoreError`) — nothing is
        written and the round keeps its state. The task row is locked, so of two coordinators committing
        rounds on the same base exactly one succeeds. With ``fencing`` (the writer's lease) the lease must
        still be the task's, else `LeaseLost` and nothing is written.
        """
        # Written by one executemany insert, not as ORM objects: a round of N clients commits N rows, and
        # the unit of work's bookkeeping per object cost more than the rest of the commit.
        rows = [_participation_values(round_id, p) for p in participations]
        with self._write() as s:
            task_id = s.scalar(select(Round.task_id).where(Round.id == round_id))
            if task_id is None:
                raise UnknownRound(round_id)
            s.scalars(select(Task).where(Task.id == task_id).with_for_update(key_share=True)).one()
            row, task = _round(s, round_id, lock=True)
            _check_fencing(s, task_id, task, fencing)
            if row.state is RoundState.OPEN:
                _transition(row, task, RoundState.AGGREGATING, "commit")
            _check_transition(row, task, RoundState.COMMITTED, "commit", allowed=UNFINISHED_STATES)
            latest = s.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.task_id == task_id))
            if latest != row.base_version:
                raise StaleRound(round_id, task, row.base_version, -1 if latest is None else latest)
            now = utc_now()
            version = ModelVersion(
                task_id=task_id, version=row.base_version + 1, parent_version=row.base_version,
                round_id=round_id, created_at=now,
                parameters=bytes(parameters), optimizer_state=bytes(optimizer_state),
            )
            s.add(version)
            row.state = RoundState.COMMITTED
            row.closed_at = now
            row.new_version = version.version
            _apply_summary(row, summary)
            s.flush()
            _insert_participations(s, rows)
            return _version_record(version, task, with_payload=True)

    def fail_round(
        self,
        round_id: int,
        reason: str,
        *,
        summary: RoundSummary | None = None,
        participations: Sequence[Participation] = (),
        fencing: Lease | None = None,
    ) -> RoundRecord:
        """open/aggregating -> failed with ``reason`` and closed_at; the counts, metrics and participations
        are recorded when given. No model version is written and nothing else changes. Raises
        `InvalidTransition` for a round already committed or failed, and `UnknownRound`."""
        rows = [_participation_values(round_id, p) for p in participations]
        with self._write() as s:
            row, task = _round(s, round_id, lock=True)
            _check_fencing(s, row.task_id, task, fencing)
            _transition(row, task, RoundState.FAILED, "fail")
            row.closed_at = utc_now()
            row.failure_reason = reason
            if summary is not None:
                _apply_summary(row, summary)
            s.flush()
            _insert_participations(s, rows)
            return _round_record(row, task)

    # -- leases -------------------------------------------------------------------------------------------

    def acquire_lease(self, task: str, holder: str, ttl_s: float) -> Lease:
        """Lead ``task`` for ``ttl_s`` seconds: granted when nobody holds the lease, when it expired, or
        when ``holder`` already holds it (then it is extended under the same epoch). A new holder gets the
        next epoch, which fences off every write of earlier holders. Raises `LeaseHeld` while another
        holder's lease runs, `UnknownTask`. Expiry is judged by this process's clock (UTC): replicas must
        keep their clocks in sync to well under ``ttl_s``.

        A lease another holder still holds is refused from a plain read, without waiting for any lock. An
        expired one is taken under its row lock; on PostgreSQL, if another transaction keeps that row
        locked for ``LEASE_LOCK_WAIT_S``, that transaction is a former leader's that was cut off from the
        database mid-transaction (every round write of a leader locks the lease row to check its epoch),
        and it is ended (``pg_terminate_backend``; the store's own sessions only, see `APPLICATION_NAME`)
        before one more try. Ending it is safe: nothing of it was committed, and its coordinator finds the
        lease taken when it reconnects. Waiting would not be: PostgreSQL arms
        ``idle_in_transaction_session_timeout`` only once a statement's Sync arrived, and psycopg's
        ``executemany`` (a round's participations, in `commit_round` and `fail_round`) pipelines its rows
        with one Sync at the end, so a leader cut off between them leaves its session "active" with the
        task's, the round's and the lease's rows locked until the network heals or TCP gives up, and a
        relay or proxy in between keeps TCP alive for ever (server-side TCP keepalives would not see a dead
        peer either). That is how the failover drill's store cut once committed nothing for the 90 s it
        waits, on a loaded machine: the standby waited on the row from the lease's expiry on, and took the
        lease only when the cut healed. Without the privilege to end another session (the same role, or
        ``pg_signal_backend``), this raises `StoreFault` and the coordinator keeps standing by."""
        _require_holder(holder, ttl_s)
        current = self.get_lease(task)
        if current is not None and current.holder != holder and current.expires_at > utc_now():
            raise LeaseHeld(task, current.holder, current.expires_at)
        if self._engine.dialect.name != "postgresql":
            return self._take_lease(task, holder, ttl_s)
        try:
            return self._take_lease(task, holder, ttl_s, lock_wait_s=LEASE_LOCK_WAIT_S)
        except _LockWaitTimedOut:
            self._end_stuck_transactions(task, LEASE_LOCK_WAIT_S)
        return self._take_lease(task, holder, ttl_s, lock_wait_s=LEASE_LOCK_WAIT_S)

    def _take_lease(self, task: str, holder: str, ttl_s: float, *, lock_wait_s: float | None = None
                    ) -> Lease:
        """`acquire_lease`'s transaction; with ``lock_wait_s`` (PostgreSQL) a row lock that long in coming
        raises `_LockWaitTimedOut`."""
        with self._write() as s:
            if lock_wait_s is not None:
                s.execute(select(func.set_config("lock_timeout", f"{round(lock_wait_s * 1000)}ms", True)))
            task_row = _task(s, task, lock=True)
            row = s.get(TaskLease, task_row.id, with_for_update=True)
            now = utc_now()
            if row is None:
                row = TaskLease(task_id=task_row.id, holder=holder, epoch=1, expires_at=now)
                s.add(row)
            elif row.holder != holder:
                if row.expires_at > now:
                    raise LeaseHeld(task, row.holder, row.expires_at)
                row.holder = holder
                row.epoch += 1
            row.expires_at = now + timedelta(seconds=ttl_s)
            s.flush()
            return Lease(task, row.holder, row.epoch, row.expires_at)

    def _end_stuck_transactions(self, task: str, held_s: float) -> None:
        """End the transaction that has held ``task``'s lease row locked (``xmax``, a live transaction in
        ``pg_locks``) for at least ``held_s`` seconds, if it is one of the store's sessions; see
        `acquire_lease`."""
        with self._write() as s:
            task_row = _task(s, task)
            ended = s.execute(text(
                "SELECT a.pid, clock_timestamp() - a.xact_start, pg_terminate_backend(a.pid) "
                "FROM task_leases AS lease "
                "JOIN pg_locks AS l ON l.locktype = 'transactionid' AND l.transactionid = lease.xmax "
                "AND l.mode = 'ExclusiveLock' AND l.granted "
                "JOIN pg_stat_activity AS a ON a.pid = l.pid "
                "WHERE lease.task_id = :task_id AND a.pid <> pg_backend_pid() "
                "AND a.datname = current_database() AND a.application_name = :application "
                "AND a.xact_start <= clock_timestamp() - make_interval(secs => :held_s)"),
                {"task_id": task_row.id, "application": APPLICATION_NAME, "held_s": held_s}).all()
        for pid, age, _ended in ended:
            log.warning("ended PostgreSQL session %d, %.0f s into a transaction that kept the expired lease "
                        "of task %r locked: its coordinator was cut off from the database mid-transaction",
                        pid, age.total_seconds(), task)

    def renew_lease(self, lease: Lease, ttl_s: float) -> Lease:
        """Extend ``lease`` by ``ttl_s`` from now; `LeaseLost` if another holder took the task meanwhile
        (an expired lease nobody took is extended: no one else wrote under another epoch)."""
        _require_holder(lease.holder, ttl_s)
        with self._write() as s:
            task_row = _task(s, lease.task, lock=True)
            row = _fenced(s, task_row.id, lease.task, lease)
            row.expires_at = utc_now() + timedelta(seconds=ttl_s)
            s.flush()
            return Lease(lease.task, row.holder, row.epoch, row.expires_at)

    def release_lease(self, lease: Lease) -> None:
        """End ``lease`` now (a graceful stop), so a standby can lead at once; a lost lease is left alone."""
        with self._write() as s:
            task_row = _task(s, lease.task, lock=True)
            row = s.get(TaskLease, task_row.id, with_for_update=True)
            if row is not None and row.epoch == lease.epoch and row.holder == lease.holder:
                row.expires_at = utc_now()

    def get_lease(self, task: str) -> Lease | None:
        """The task's lease as stored (possibly expired), or None if no coordinator ever led it."""
        with self._read() as s:
            task_row = _task(s, task)
            row = s.get(TaskLease, task_row.id)
            return None if row is None else Lease(task, row.holder, row.epoch, row.expires_at)

    def fail_unfinished_rounds(self, task: str, reason: str) -> list[RoundRecord]:
        """Fail every open or aggregating round of the task, for a coordinator that restarts and cannot
        resume them (their clients and in-memory aggregates are gone). Returns them by round number."""
        with self._write() as s:
            task_row = _task(s, task, lock=True)
            rows = s.scalars(
                select(Round).where(Round.task_id == task_row.id, Round.state.in_(UNFINISHED_STATES))
                .order_by(Round.round_num).with_for_update(key_share=True)
            ).all()
            now = utc_now()
            for row in rows:
                _transition(row, task, RoundState.FAILED, "fail")
                row.closed_at = now
                row.failure_reason = reason
            s.flush()
            return [_round_record(row, task) for row in rows]

    def record_round_progress(self, round_id: int, *, selected: int, reported: int, accepted: int,
                              refused: int, total_weight: float) -> bool:
        """Write an unfinished round's counts so far, for ``status`` to show a live round (the coordinator
        calls this now and then, never once per report). A round already committed or failed keeps the
        counts it closed with: nothing is written and the answer is False. Raises `UnknownRound`."""
        with self._write() as s:
            row, _task_name = _round(s, round_id, lock=True)
            if RoundState(row.state).is_finished:
                return False
            row.num_selected, row.num_reported = selected, reported
            row.num_accepted, row.num_refused = accepted, refused
            row.total_weight = float(total_weight)
            s.flush()
            return True

    def get_round(self, round_id: int) -> RoundRecord:
        """Round ``round_id``; raises `UnknownRound`."""
        with self._read() as s:
            row, task = _round(s, round_id)
            return _round_record(row, task)

    def list_rounds(self, task: str, *, limit: int | None = None) -> list[RoundRecord]:
        """The task's rounds by round number; with ``limit``, only the ``limit`` most recent ones (still
        oldest first)."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        with self._read() as s:
            task_row = _task(s, task)
            stmt = select(Round).where(Round.task_id == task_row.id).order_by(Round.round_num.desc())
            if limit is not None:
                stmt = stmt.limit(limit)
            return [_round_record(r, task) for r in reversed(s.scalars(stmt).all())]

    def participations(self, round_id: int) -> list[Participation]:
        """The participations recorded when the round closed, in the order given; raises `UnknownRound`."""
        with self._read() as s:
            _round(s, round_id)
            rows = s.scalars(select(ParticipationRow).where(ParticipationRow.round_id == round_id)
                             .order_by(ParticipationRow.id))
            return [_participation(r) for r in rows]

    def participation_in(self, task: str, round_id: int, client_key: str
                         ) -> tuple[RoundRecord, Participation | None]:
        """Round ``round_id`` of ``task`` and the client's participation in it (None if it has none, or the
        round is still open): what a coordinator that restarted needs to answer a retried report. Raises
        `UnknownRound` for a round that does not exist or belongs to another task."""
        _require_client_key(client_key)
        if not 1 <= round_id <= INTEGER_RANGE[1]:
            raise UnknownRound(round_id)
        with self._read() as s:
            row, name = _round(s, round_id)
            if name != task:
                raise UnknownRound(round_id)
            found = s.scalars(select(ParticipationRow).where(ParticipationRow.round_id == round_id,
                                                             ParticipationRow.client_key == client_key)
                              ).one_or_none()
            return _round_record(row, name), (_participation(found) if found is not None else None)

    # -- evaluation -------------------------------------------------------------------------------------

    def record_evaluation(
        self,
        task: str,
        version: int,
        client_key: str,
        *,
        squared_error: float,
        num_correct: float,
        num_examples: float,
    ) -> None:
        """Record one client's evaluation of a version: sums over its examples, so that summaries can be
        example-weighted. A client's second evaluation of the same version replaces its first, so a retried
        report is counted once. Raises `UnknownTask` or `UnknownVersion`; ``ValueError`` for sums that are
        not finite, negative, or with more correct predictions than examples (the coordinator bounds them
        further: see ``server/evaluations.py``)."""
        _require_client_key(client_key)
        squared_error, num_correct, num_examples = map(float, (squared_error, num_correct, num_examples))
        if not all(math.isfinite(v) for v in (squared_error, num_correct, num_examples)):
            raise ValueError("evaluation sums must be finite")
        if num_examples < 0 or not 0 <= num_correct <= num_examples:
            raise ValueError(f"need 0 <= num_correct <= num_examples, got {num_correct} and {num_examples}")
        if squared_error < 0:
            raise ValueError(f"squared_error must be >= 0, got {squared_error}")
        with self._write() as s:
            task_row = _task(s, task)
            if _version_id(s, task_row.id, version) is None:
                raise UnknownVersion(task, version)
            existing = s.scalars(select(Evaluation).where(
                Evaluation.task_id == task_row.id, Evaluation.version == version,
                Evaluation.client_key == client_key)).one_or_none()
            if existing is None:
                s.add(Evaluation(
                    task_id=task_row.id, version=version, client_key=client_key, squared_error=squared_error,
                    num_correct=num_correct, num_examples=num_examples, created_at=utc_now(),
                ))
            else:
                existing.squared_error = squared_error
                existing.num_correct = num_correct
                existing.num_examples = num_examples
                existing.created_at = utc_now()

    def evaluation_summaries(self, task: str) -> list[EvaluationSummary]:
        """Per evaluated version (oldest first): distinct clients and the sums of squared error, correct
        predictions and examples. Raises `UnknownTask`.

        The sums are taken as exact decimals (PostgreSQL's ``sum`` over doubles raises on overflow, which
        made ``status`` fail for good once two huge rows were stored) and become floats here: a sum past
        the float range is +inf, never an error (`EvaluationSummary.metrics` shows it as not meaningful)."""
        with self._read() as s:
            task_row = _task(s, task)
            stmt = (
                select(
                    Evaluation.version,
                    func.count(distinct(Evaluation.client_key)),
                    func.sum(cast(Evaluation.squared_error, Numeric)),
                    func.sum(cast(Evaluation.num_correct, Numeric)),
                    func.sum(cast(Evaluation.num_examples, Numeric)),
                )
                .where(Evaluation.task_id == task_row.id)
                .group_by(Evaluation.version)
                .order_by(Evaluation.version)
            )
            return [
                EvaluationSummary(int(v), int(clients), _to_float(se), _to_float(correct), _to_float(n))
                for v, clients, se, correct, n in s.execute(stmt)
            ]

    # -- transactions -----------------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """A transaction that may write; commits on success, rolls back on any exception."""
        self._require_same_file()
        with self._turns, _refusals_as_store_errors(), self._writes.begin() as session:
            yield session

    def _require_same_file(self) -> None:
        """Refuse to write when the SQLite file was deleted or replaced since it was opened: the pooled
        connections would write into the unlinked inode (gone at exit) while a restart would silently
        start a new, empty store. One ``stat`` per write transaction (microseconds)."""
        if self._file is None:
            return
        now = _file_identity(self._file)
        if now != self._file_identity:
            what = "deleted" if now is None else "replaced by another file"
            message = (f"the SQLite store {self._file} was {what} while the coordinator was using it; "
                       "refusing to write. Restore the file (or restart the coordinator on purpose on a new "
                       "store)")
            log.error(message)
            raise StoreVanished(message)

    @contextmanager
    def _read(self) -> Iterator[Session]:
        """A read-only transaction; on SQLite it does not take the write lock."""
        with self._turns, _refusals_as_store_errors(), self._reads.begin() as session:
            yield session


# -- engine ---------------------------------------------------------------------------------------------


def _sqlite_file(url: str) -> str | None:
    """The path of a SQLite file database, None for other backends and in-memory databases."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or _is_memory_sqlite(url):
        return None
    database = parsed.database or ""
    return None if database.startswith("file:") else os.path.abspath(database)


def _file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of ``path``, None if it does not exist: what tells "the same file" from a new one
    at the same path."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _is_memory_sqlite(url: str) -> bool:
    parsed = make_url(url)
    return parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")


def _create_engine(url: str) -> Engine:
    """An engine with the settings the store relies on; on SQLite: enforced foreign keys, WAL for file
    databases (readers do not block the writer), a busy timeout, and BEGIN issued by SQLAlchemy so that
    transactions (and DDL) are real transactions."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # A server that drops packets would otherwise hold every connection attempt for minutes.
        libpq = parsed.get_driver_name() in ("psycopg", "psycopg2")  # drivers taking libpq's parameters
        connect_args: dict[str, Any] = {}
        if libpq and "connect_timeout" not in parsed.query:
            connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
        if libpq and parsed.get_backend_name() == "postgresql" and "options" not in parsed.query:
            connect_args["options"] = (
                f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT_MS}")
        if libpq and parsed.get_backend_name() == "postgresql" and "application_name" not in parsed.query:
            connect_args["application_name"] = APPLICATION_NAME
        return create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
    memory = _is_memory_sqlite(url)
    extra: dict[str, Any] = {"poolclass": StaticPool} if memory else {}
    engine = create_engine(
        parsed, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S}, **extra
    )

    @event.listens_for(engine, "connect")
    def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver must not BEGIN on its own: see _begin below
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys = ON")
            if not memory:
                cursor.execute("PRAGMA journal_mode = WAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        # IMMEDIATE takes the write lock now: a read-check-write transaction cannot be overtaken between
        # its check and its write (SQLite's stand-in for SELECT ... FOR UPDATE). Reads need no lock.
        read_only = connection.get_execution_options().get(_READ_ONLY, False)
        connection.exec_driver_sql("BEGIN DEFERRED" if read_only else "BEGIN IMMEDIATE")

    return engine


# SQLite result codes (the low byte of ``sqlite3.Error.sqlite_errorcode``) that mean "not now" rather than
# "never": another writer holds the lock, the disk or the file system failed, memory ran out.
_SQLITE_TRANSIENT = frozenset({
    sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_NOMEM, sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PROTOCOL,
})


def is_outage(exc: SQLAlchemyError) -> bool:
    """Whether a database error is an outage (retrying later may succeed) rather than a fault.

    Outages: a connection the driver declared lost, the pool timing out, and ``OperationalError`` — except
    SQLite's, which also covers "no such table" and syntax errors: there only the busy/locked/I/O/full/
    cannot-open result codes count. PostgreSQL reports schema and SQL errors as ``ProgrammingError``,
    out-of-range values as ``DataError``; neither is ever an outage.
    """
    if isinstance(exc, DisconnectionError | PoolTimeout):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, OperationalError):
        return False
    code = getattr(exc.orig, "sqlite_errorcode", None)
    if isinstance(exc.orig, sqlite3.Error):
        return code is not None and code & 0xFF in _SQLITE_TRANSIENT
    return True


LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's SQLSTATE for a lock_timeout that ran out


class _LockWaitTimedOut(StoreUnavailable):
    """A row lock did not come within the transaction's ``lock_timeout`` (only `acquire_lease` sets one)."""


@contextmanager
def _refusals_as_store_errors() -> Iterator[None]:
    """Database errors become the store's own, so that callers handle one family of errors and never
    import SQLAlchemy: a constraint the database enforced is a refusal (`StoreError`), an outage
    `StoreUnavailable` (see `is_outage`), anything else — bad SQL, a missing table, a value that should
    have been refused before it was sent — a `StoreFault`."""
    try:
        yield
    except IntegrityError as exc:
        raise StoreError(f"the database refused the change: {exc.orig}") from exc
    except SQLAlchemyError as exc:
        if getattr(exc.orig if isinstance(exc, DBAPIError) else None, "sqlstate", None) == LOCK_NOT_AVAILABLE:
            raise _LockWaitTimedOut(f"the database is unavailable: {_first_line(exc)}") from exc
        if is_outage(exc):
            raise StoreUnavailable(f"the database is unavailable: {type(exc).__name__}") from exc
        log.error("store fault (not an outage; retrying will not help)", exc_info=exc)
        raise StoreFault(f"the store failed ({type(exc).__name__}): {_first_line(exc)}") from exc


def _first_line(exc: SQLAlchemyError) -> str:
    """The driver's message without SQLAlchemy's statement and parameters (they may hold client data)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _check_rows_fit(session: Session, _context: Any, _instances: Any) -> None:
    """before_flush: every new or changed row must fit its columns (`schema.check_fits`)."""
    for row in (*session.new, *session.dirty):
        check_fits(row)


# -- row access -----------------------------------------------------------------------------------------


def _require_holder(holder: str, ttl_s: float) -> None:
    if not 1 <= len(holder) <= HOLDER_LENGTH:
        raise ValueError(f"a lease holder id must be 1 to {HOLDER_LENGTH} characters")
    if not (math.isfinite(ttl_s) and ttl_s > 0):
        raise ValueError("a lease's time to live must be positive")


def _fenced(s: Session, task_id: int, task: str, lease: Lease) -> TaskLease:
    """The task's lease row, locked, if ``lease`` is still it; else `LeaseLost`."""
    row = s.get(TaskLease, task_id, with_for_update=True)
    if row is None or row.epoch != lease.epoch or row.holder != lease.holder:
        raise LeaseLost(task, lease.epoch, row.epoch if row else None, row.holder if row else None)
    return row


def _check_fencing(s: Session, task_id: int, task: str, fencing: Lease | None) -> None:
    """A leader's round write must carry the task's current lease (checked in the write's transaction)."""
    if fencing is not None:
        _fenced(s, task_id, task, fencing)


def _task(s: Session, name: str, *, lock: bool = False) -> Task:
    stmt = select(Task).where(Task.name == name)
    if lock:
        stmt = stmt.with_for_update(key_share=True)
    row = s.scalars(stmt).one_or_none()
    if row is None:
        raise UnknownTask(name)
    return row


def _round(s: Session, round_id: int, *, lock: bool = False) -> tuple[Round, str]:
    stmt = select(Round, Task.name).join(Task, Round.task_id == Task.id).where(Round.id == round_id)
    if lock:
        stmt = stmt.with_for_update(of=Round, key_share=True)
    found = s.execute(stmt).one_or_none()
    if found is None:
        raise UnknownRound(round_id)
    return found[0], found[1]


def _version_id(s: Session, task_id: int, version: int) -> int | None:
    return s.scalar(select(ModelVersion.id).where(ModelVersion.task_id == task_id,
                                                  ModelVersion.version == version))


def _with_payload(stmt: Any, with_payload: bool) -> Any:
    return stmt.options(undefer(ModelVersion.parameters), undefer(ModelVersion.optimizer_state)) \
        if with_payload else stmt


def _check_transition(
    row: Round, task: str, target: RoundState, operation: str, *, allowed: Iterable[RoundState]
) -> None:
    if not row.state.can_become(target):
        raise InvalidTransition(row.id, task, row.state, operation, allowed)


def _transition(row: Round, task: str, target: RoundState, operation: str) -> None:
    _check_transition(row, task, target, operation, allowed=(s for s in RoundState if s.can_become(target)))
    row.state = target


def _apply_summary(row: Round, summary: RoundSummary) -> None:
    row.num_selected = summary.num_selected
    row.num_reported = summary.num_reported
    row.num_accepted = summary.num_accepted
    row.num_refused = summary.num_refused
    row.total_weight = float(summary.total_weight)
    row.metrics = _json_metrics(summary.metrics)
    if summary.stages:
        row.stages = [str(stage) for stage in summary.stages]


def _participation_values(round_id: int, p: Participation) -> dict[str, Any]:
    """A participation as the column values of its row, checked as a flush checks a row (`check_fits`)."""
    _require_client_key(p.client_key)
    values = {"round_id": round_id, "client_key": p.client_key, "outcome": Outcome(p.outcome),
              "weight": float(p.weight), "metrics": _json_metrics(p.metrics), "reason": p.reason,
              "update_digest": p.digest}
    check_values(ParticipationRow, values)
    return values


def _insert_participations(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """A round's participations in one executemany insert, not as ORM objects: a round of N clients writes N
    rows, and the unit of work's bookkeeping per object cost more than the rest of the commit (its
    before_flush check is done on the values instead: `_participation_values`)."""
    if rows:
        session.execute(insert(ParticipationRow), rows)


def _participation(row: ParticipationRow) -> Participation:
    return Participation(row.client_key, Outcome(row.outcome), row.weight, dict(row.metrics), row.reason,
                         row.update_digest)


def _to_float(value: Any) -> float:
    """A SQL sum as a float: +inf past the float range (Python's float() of a huge Decimal does not
    raise), 0.0 for an empty sum."""
    return 0.0 if value is None else float(value)


def require_label(label: str) -> None:
    """A credential label is shown to operators (``token list``): 1 to `LABEL_LENGTH` printable characters,
    so it fits its column on every backend and cannot carry control characters into a terminal."""
    if not 1 <= len(label) <= LABEL_LENGTH:
        raise ValueError(f"a label must be 1 to {LABEL_LENGTH} characters, got {len(label)}")
    if not label.isprintable():
        raise ValueError("a label must be printable characters only (no control characters or newlines)")


def _json_metrics(metrics: Mapping[str, float]) -> dict[str, float | None]:
    """JSON has no NaN or infinity (PostgreSQL rejects them): a non-finite metric is stored as null."""
    return {str(k): (float(v) if math.isfinite(v) else None) for k, v in metrics.items()}


def _require_client_key(client_key: str) -> None:
    if not client_key or len(client_key) > CLIENT_KEY_LENGTH:
        raise ValueError(
            f"client_key must be a pseudonymous key of 1..{CLIENT_KEY_LENGTH} characters, "
            f"got {len(client_key)} characters"
        )


def _require_aware(value: datetime, name: str) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got naive {value!r}")


# -- records --------------------------------------------------------------------------------------------


def _task_record(row: Task) -> TaskRecord:
    if not row.pseudonym_salt:
        raise StoreFault(f"task {row.name!r} has no pseudonym salt (the database was altered)")
    return TaskRecord(name=row.name, spec=dict(row.spec), created_at=row.created_at,
                      pseudonym_salt=row.pseudonym_salt)


def _version_record(row: ModelVersion, task: str, with_payload: bool) -> VersionRecord:
    return VersionRecord(
        task=task, version=row.version, parent=row.parent_version, round_id=row.round_id,
        created_at=row.created_at,
        parameters=row.parameters if with_payload else None,
        optimizer_state=row.optimizer_state if with_payload else None,
    )


def _round_record(row: Round, task: str) -> RoundRecord:
    return RoundRecord(
        round_id=row.id, task=task, round_num=row.round_num, state=RoundState(row.state),
        base_version=row.base_version, target=row.target, min_reports=row.min_reports,
        opened_at=row.opened_at, deadline=row.deadline, closed_at=row.closed_at,
        num_selected=row.num_selected, num_reported=row.num_reported, num_accepted=row.num_accepted,
        num_refused=row.num_refused, total_weight=row.total_weight, new_version=row.new_version,
        failure_reason=row.failure_reason, metrics=dict(row.metrics),
        stages=tuple(row.stages) if row.stages is not None else None,
    )


def _credential_record(row: Credential) -> CredentialRecord:
    return CredentialRecord(credential_id=row.id, label=row.label, salt=row.salt, secret_hash=row.secret_hash,
                            created_at=row.created_at, revoked_at=row.revoked_at,
                            max_devices=row.max_devices)
