"""The coordinator of one task: the driver of its round state machine, and everything around the rounds.

The round rules live in `server.round_machine` (pure: events in, decisions and effects out). This module is
the driver that makes them run against the world:

1. Every RPC calls the machine under one lock, with the time, and gets a decision (an assignment, a retry
   window, a refusal, a report's outcome).
2. What the machine emits (open a round, commit one, record a failure) is performed *outside* that lock:
   the store writes and the server step (``FedRecon.server_update``, the simulator's own) never stall a
   check-in, a download or another client's report. Results go back to the machine under the lock.
3. A report's tensors are validated before the lock is taken and folded under it (the running aggregate is
   one model's memory whatever the number of clients).
4. Around the rounds: pseudonymous client keys, check-in rate limits, downloads of committed versions,
   evaluation reports, the live round's progress for ``fedrecon status``, and a graceful shutdown.

In-flight round state lives in memory only: a coordinator that dies mid-round loses at most that round,
which the next start marks failed, and no partial aggregate is ever written. Clients are known to the store
only by a keyed hash of their id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NoReturn

import numpy as np

from fedrecon.core.algorithm import FedRecon, NonFiniteUpdate, ServerState
from fedrecon.core.compression import RowSparse, UpdateTensor
from fedrecon.core.model_spec import model_from_config
from fedrecon.core.privacy import PrivacyLedger
from fedrecon.protocol import (
    CREDENTIAL_SHARE_HINT,
    PROTOCOL_VERSION,
    Assignment,
    ReportOutcome,
    RetryLater,
    RoundOutcome,
)
from fedrecon.protocol import RoundState as RoundView
from fedrecon.secagg_wire import ClientMessage, Instruction, SecurePhase
from fedrecon.server.checkpoints import (
    clip_bound_from_bytes,
    globals_from_bytes,
    globals_to_bytes,
    optimizer_state_from_bytes,
    optimizer_state_to_bytes,
)
from fedrecon.server.evaluations import MAX_EVALUATIONS_PER_MINUTE, EvaluationLimits
from fedrecon.server.identity import Caller
from fedrecon.server.live_view import (
    LiveRound,
    LiveView,
    PrivacySpent,
    RoundEvent,
    RoundEventKind,
    RoundListener,
    RoundPhase,
)
from fedrecon.server.refusals import Refusal, Status
from fedrecon.server.round_machine import (
    AskStore,
    Assigned,
    Busy,
    ClosedRound,
    CommitRound,
    Effect,
    FailRound,
    Fold,
    OpenRound,
    OpenRoundState,
    RoundMachine,
)
from fedrecon.server.secure_round import SecureRoundFactory
from fedrecon.server.store import (
    DEFAULT_LEASE_TTL_S,
    Lease,
    LeaseHeld,
    LeaseLost,
    Outcome,
    RoundState,
    RoundSummary,
    SqlStore,
    StoreError,
    StoreUnavailable,
    UnknownRound,
    UnknownTask,
    UnknownVersion,
)
from fedrecon.server.task import TaskSpec
from fedrecon.server.update_checks import all_finite, update_digest
from fedrecon.tensors import TensorLayout

log = logging.getLogger(__name__)

MAX_WEIGHT = 1e9  # a client weight above this is absurd (examples on one device)
MAX_METRICS = 64  # entries in a report's metric map (a device sends a handful: loss, examples, ...)
MAX_METRIC_KEY_CHARS = 64
MAX_ECHO_CHARS = 64  # a client's string quoted back in an error message is cut to this (see ``shown``)
# How long a check-in waits for a round being opened or committed (a store write) before it is given a
# retry window instead: long enough for a healthy store, short enough to free the gRPC worker.
BUSY_WAIT_S = 10.0
FINISHED_ROUNDS_CACHED = 4096  # GetRound answers of finished rounds kept (a few hundred bytes each)


@dataclass
class PendingCheck:
    """What ``Coordinator.begin_check`` leaves for ``settle_check``."""

    key: str
    round_id: int
    effects: list[Effect]
    ask_store: bool
    error: Exception | None = None

    @property
    def needs_io(self) -> bool:
        """Whether ``settle_check`` may call the store (else it takes the lock briefly at most)."""
        return bool(self.effects) or self.ask_store


@dataclass
class PendingCheckIn:
    """What ``Coordinator.begin_check_in`` leaves for ``settle_check_in``."""

    caller: Caller
    key: str
    decision: Assigned | RetryLater | Busy
    effects: list[Effect]
    started: float  # time.monotonic() at the check-in: the bound on waiting for a busy round starts here

    @property
    def needs_io(self) -> bool:
        """Whether ``settle_check_in`` may call the store or wait (else it only builds the answer)."""
        return bool(self.effects) or isinstance(self.decision, Busy)


@dataclass
class PendingReport:
    """What ``Coordinator.fold_report`` leaves for ``settle_report``."""

    key: str
    round_id: int
    digest: str
    effects: list[Effect]
    outcome: ReportOutcome | None = None
    round: OpenRoundState | None = None
    answered: bool = False  # ``outcome`` is the machine's whole answer (a retry, say)
    error: Exception | None = None

    @property
    def needs_io(self) -> bool:
        """Whether ``settle_report`` may call the store (a commit, a round to look up); else it takes the
        lock briefly at most."""
        return bool(self.effects) or (not self.answered and (self.outcome is None or self.round is None))


class Coordinator:
    """Runs the rounds of one task against a store. Thread-safe: gRPC workers call it concurrently."""

    def __init__(self, store: SqlStore, task: TaskSpec, *, clock: Callable[[], float] = time.time,
                 initial_globals: Sequence[np.ndarray] | None = None, replica_id: str | None = None,
                 lease_ttl_s: float = DEFAULT_LEASE_TTL_S) -> None:
        """``initial_globals`` (e.g. an exported or TFF-trained model) becomes version 0 when the task is
        created; for a task already in the store they are ignored (``created_task`` tells which happened).
        ``replica_id`` names this coordinator in the task's lease (default: host, process and a random
        part); ``lease_ttl_s``: how long a lead lasts without renewal, so how soon a standby takes over
        from a dead leader."""
        self.store = store
        self.task = task
        self._clock = clock
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # a version committed, a round opened or closed
        self.model = model_from_config(task.model)
        self.algorithm = FedRecon(self.model, task.training, aggregation=task.aggregation)
        self.algorithm.check_aggregation(max_clients=task.rounds.clients_per_round)
        self._secure_rounds = self._secure_round_factory()  # refuses unworkable settings before any write
        self._names = [v.name for v in self.model.global_variables]
        self._delta_layouts = [TensorLayout(self.model.global_variables[i].name, np.dtype(np.float32),
                                            tuple(self.model.global_variables[i].shape))
                               for i in self.model.global_trainable]
        self._model_spec_json = json.dumps(task.model, sort_keys=True)
        self._training_json = json.dumps(task.training.to_dict(), sort_keys=True)
        self.created_task = False
        self._salt = self._load_or_create_task(initial_globals)
        # Leadership: one coordinator leads a task's rounds at a time (a lease in the store); its round
        # writes carry the lease, so a leader that lost it (paused, cut off) can never write over its
        # successor. The others stand by, serve reads, and take over when the lease runs out.
        self.replica_id = replica_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.lease_ttl_s = lease_ttl_s
        self._lease: Lease | None = None
        self._lead_until = 0.0  # monotonic time the lease surely runs until (see _require_leader)
        self._standby_reason = ""
        self._next_lease_action = 0.0  # monotonic time of the next renewal or takeover attempt
        self.refusals: Counter[str] = Counter()  # refusals and notable events by reason (machine's and own)
        self._round_listeners: list[RoundListener] = []  # see add_round_listener
        self._budget_logged = False
        self.interrupted_rounds: list[int] = []
        if not self._lead_or_stand_by():  # a new leader loads the state as it takes the lead
            self._load_state()
        self._progress_written: tuple[int, int, int, int, int, float] | None = None  # see record_progress
        self._unrecorded_failures: list[FailRound] = []  # failures a store outage kept from the store
        self._check_ins = _TokenBuckets.per_minute(task.rounds.max_check_ins_per_minute)
        self._peer_check_ins = _TokenBuckets.per_minute(task.rounds.max_check_ins_per_minute_per_peer)
        self._evaluators: dict[tuple[int, str], set[str]] = {}  # (version, gateway) -> its evaluating ids
        # One device counts at most as much in a version's metrics as in its training (the weight cap).
        self.evaluation_limits = EvaluationLimits(
            counted_examples=task.aggregation.weight_cap(task.training, task.batch_size))
        self._evaluations = _TokenBuckets(MAX_EVALUATIONS_PER_MINUTE / 60.0,
                                          burst=MAX_EVALUATIONS_PER_MINUTE / 2.0)


    # ----- setup ---------------------------------------------------------------------------------------
    def _load_or_create_task(self, initial_globals: Sequence[np.ndarray] | None) -> bytes:
        """The task's pseudonym salt; the task (with version 0) is created when the store lacks it.

        A stored task must describe the same training as the one given, compared after *normalising*
        both through ``TaskSpec`` (``from_dict(...).to_dict()``): a spec stored by an older release lacks
        the optional fields added since (they take their defaults) and may spell settings the old way, and
        neither is a different task. The salt is not part of the spec (its own column since migration 0005).
        """
        spec = _normalised(self.task.to_dict())
        try:
            record = self.store.get_task(self.task.name)
        except UnknownTask:
            if initial_globals is not None:
                self.model.check_globals(initial_globals, f"task {self.task.name!r}")
            salt = secrets.token_hex(32)
            state = self.algorithm.initial_state(self.task.seed, initial_globals)
            self.created_task = True
            self.store.create_task(
                self.task.name, spec, pseudonym_salt=salt,
                initial_parameters=globals_to_bytes(self._names, state.globals),
                optimizer_state=optimizer_state_to_bytes(state.optimizer_state))
            log.warning("task %r was not in the store %s: created it at model version 0", self.task.name,
                        self.store.url)
            return bytes.fromhex(salt)
        try:
            stored = _normalised(TaskSpec.from_dict(record.spec).to_dict())
        except ValueError as err:
            raise ValueError(f"task {self.task.name!r} in the store has a description this release cannot "
                             f"read ({err}); was it written by a newer release?") from err
        if stored != spec:
            changed = sorted(_differences(stored, spec))
            raise ValueError(f"task {self.task.name!r} exists in the store with a different description "
                             f"({', '.join(changed[:8])} differ); use a new task name to change the model or "
                             "hyper-parameters")
        return bytes.fromhex(record.pseudonym_salt)

    def _load_state(self) -> None:
        """Read the latest version and the task's rounds from the store and build a fresh round machine on
        them (at start, and when a standby takes the lead: the state a dead leader left is the store's)."""
        latest = self.store.latest_version(self.task.name)
        parameters, optimizer_state = latest.payload()
        state = ServerState(globals_from_bytes(parameters, self._names),
                            optimizer_state_from_bytes(optimizer_state), latest.version,
                            clip_bound_from_bytes(optimizer_state))
        stored_rounds = self.store.list_rounds(self.task.name)
        committed = sum(1 for r in stored_rounds if r.state == "committed")
        ledger = self._privacy_ledger(committed)
        # DP noise from an unpredictable seed (OS entropy), drawn once per round when the commit is made.
        noise_rng = np.random.default_rng(secrets.randbits(128)) if ledger is not None else None
        rounds, batch_size = self.task.rounds, self.task.batch_size
        machine = RoundMachine(
            rounds, version=latest.version, committed_rounds=committed, counts=self.refusals,
            new_aggregate=lambda: self.algorithm.new_aggregate(
                max_clients=rounds.clients_per_round, batch_size=batch_size,
                expected_clients=rounds.clients_per_round if noise_rng is not None else None,
                noise_rng=noise_rng, state=self._state),
            may_open=self._privacy_refusal if ledger is not None else None,
            secure_round=self._secure_rounds)
        with self._lock:
            self._state = state
            self.ledger = ledger
            self.machine = machine
            # Round outcomes for GetRound: a finished round never changes, so each is read from the store
            # once; ids above the newest round this task opened are no round of it and cost no read at all.
            self._newest_round_id = max((r.round_id for r in stored_rounds), default=0)
            self._finished: OrderedDict[int, RoundOutcome | None] = OrderedDict()  # None: not this task's
            self._changed.notify_all()

    # ----- leadership ----------------------------------------------------------------------------------
    @property
    def leading(self) -> bool:
        """Whether this coordinator leads the task's rounds (else it stands by)."""
        return self._lease is not None

    @property
    def standby_reason(self) -> str:
        """Why this coordinator stands by (who leads, until when), for logs and refusals."""
        return self._standby_reason

    def _lead_or_stand_by(self) -> bool:
        """Take the task's lease if it is free (then fail the rounds a previous leader left unfinished and
        load the state it left, before any call is served as leader: a check-in let in earlier would open a
        round on a stale version); otherwise stand by. True if this coordinator now leads."""
        asked = time.monotonic()
        try:
            lease = self.store.acquire_lease(self.task.name, self.replica_id, self.lease_ttl_s)
        except LeaseHeld as held:
            self._standby_reason = (f"task {self.task.name!r} is led by another coordinator ({held.holder}) "
                                    f"until {held.expires_at:%H:%M:%S} UTC at least")
            # Try again a third of a lease later, or just after this lease runs out if that is sooner: a
            # dead leader's lease is taken over within a tick of its expiry, not up to a third later.
            left = (held.expires_at - datetime.now(UTC)).total_seconds()
            self._next_lease_action = time.monotonic() + min(self.lease_ttl_s / 3, max(left, 0.0) + 0.05)
            return False
        self.interrupted_rounds = [r.round_id for r in self.store.fail_unfinished_rounds(
            self.task.name, "coordinator restarted before the round committed")]
        self._load_state()
        with self._lock:
            self._lease = lease
            self._lead_until = asked + self.lease_ttl_s
        self._next_lease_action = time.monotonic() + self.lease_ttl_s / 3
        log.info("leading task %r as %s (lease epoch %d, %g s, renewed every %g s)", self.task.name,
                 self.replica_id, lease.epoch, self.lease_ttl_s, self.lease_ttl_s / 3)
        return True

    def maintain_lease(self) -> None:
        """Renew the lead, or try to take it while standing by; every third of the lease's time to live
        (called by ``tick``; store I/O outside the lock). A renewal the store refuses (another coordinator
        took the task) makes this one stand down at once; one the store cannot answer is retried, and the
        store's fencing keeps a leader cut off from it from writing over a successor anyway."""
        if time.monotonic() < self._next_lease_action:
            return
        lease = self._lease
        if lease is None:
            try:
                took = self._lead_or_stand_by()
                if took:
                    log.warning("took the lead of task %r (lease epoch %d): %d unfinished round(s) of the "
                                "previous leader marked failed", self.task.name,
                                self._lease.epoch if self._lease else 0, len(self.interrupted_rounds))
                else:
                    self._follow_store()
            except StoreError as err:
                log.warning("standing by for task %r: the store did not answer (%s); retrying",
                            self.task.name, err)
                self._next_lease_action = time.monotonic() + 1.0
            return
        asked = time.monotonic()
        try:
            renewed = self.store.renew_lease(lease, self.lease_ttl_s)
        except LeaseLost as err:
            self._stand_down(str(err))
            return
        except StoreError as err:
            log.warning("lease of task %r not renewed (%s); retrying", self.task.name, err)
            self._next_lease_action = time.monotonic() + 1.0
            return
        with self._lock:
            if self._lease is lease:
                self._lease = renewed
                self._lead_until = asked + self.lease_ttl_s
        self._next_lease_action = time.monotonic() + self.lease_ttl_s / 3

    def _follow_store(self) -> None:
        """A standby's reads (downloads, the latest version) follow the store: the state is rebuilt only
        when the leader committed a new version (one small read, without the model, each time)."""
        latest = self.store.latest_version(self.task.name, with_payload=False)
        if latest.version != self.version:
            self._load_state()

    def _stand_down(self, why: str) -> None:
        """Stop leading: the open round is dropped (its accepted updates are in no version; the new
        leader marks it failed) and every round call is refused until this coordinator leads again."""
        with self._lock:
            if self._lease is None:
                return
            self._lease = None
            self._standby_reason = why
            dropped = self.machine.round
            self.machine.round = None
            self._changed.notify_all()
            event = None
            if dropped is not None:  # the round ends here for this process (the new leader records it)
                now = self._clock()
                summary, participations = self.machine.summary(dropped, now)
                event = RoundEvent(RoundEventKind.FAILED, self.task.name, dropped.round_id,
                                   dropped.round_num, dropped.base_version, now,
                                   reason=f"stood down: {why}", summary=summary,
                                   participations=participations, duration_s=now - dropped.opened)
        self._next_lease_action = time.monotonic() + self.lease_ttl_s / 3
        log.error("stood down from task %r: %s%s", self.task.name, why,
                  f"; round {dropped.round_num} dropped with {len(dropped.accepted)} accepted update(s)"
                  if dropped is not None else "", extra=event.log_extra() if event is not None else None)
        if event is not None:
            self._announce(event)

    def _require_leader(self) -> Lease:
        """The lease, to lead a round call; UNAVAILABLE ``not_leader`` while standing by, and also once the
        lease may have run out unrenewed (the store unreachable, or this process paused): another
        coordinator may lead by then, and a client kept here would only lose its work to fencing."""
        lease = self._lease
        if lease is None:
            self.refusals["not_leader"] += 1
            raise Refusal(Status.UNAVAILABLE, "not_leader",
                          f"this coordinator is standing by: {self._standby_reason}; retry, or use another "
                          "coordinator address")
        if time.monotonic() >= self._lead_until:
            self.refusals["not_leader"] += 1
            raise Refusal(Status.UNAVAILABLE, "not_leader",
                          "this coordinator could not renew its lead in time (its store does not answer); "
                          "retry, or use another coordinator address")
        return lease

    def _privacy_ledger(self, committed_rounds: int) -> PrivacyLedger | None:
        """ε spent by the task's committed rounds (each released one noisy sum), or None without noise."""
        z, privacy = self.task.aggregation.noise_multiplier, self.task.privacy
        if z is None or privacy is None:
            return None
        parameters = privacy.parameters(z, self.task.rounds.clients_per_round)
        ledger = PrivacyLedger(parameters, epsilon_budget=privacy.epsilon_budget, rounds=committed_rounds,
                               epsilon=parameters.epsilon_after(committed_rounds))
        log.log(logging.INFO if self._lease is not None else logging.DEBUG,
                "task %r: user-level DP with noise multiplier %g, clip %g, delta %g, %s; epsilon %.4g after "
                "%d committed rounds%s", self.task.name, z, self.task.aggregation.max_update_norm,
                parameters.delta, _sampling_text(parameters.population, parameters.clients_per_round),
                ledger.epsilon, committed_rounds,
                f", budget {privacy.epsilon_budget:g}" if privacy.epsilon_budget is not None else "")
        return ledger

    def _secure_round_factory(self) -> SecureRoundFactory | None:
        """What builds a round's secure-aggregation stages (``server.secure_round``), for a task that asks."""
        a = self.task.aggregation
        if not a.secure_aggregation:
            return None
        factory = SecureRoundFactory(self.task.name, a, tuple(self.algorithm.delta_shapes),
                                     a.weight_cap(self.task.training, self.task.batch_size),
                                     self.task.rounds.minimum)
        factory.check(self.task.rounds.selection_goal)  # settings no full round could run with: at start
        return factory

    def _privacy_refusal(self) -> str | None:
        """Why no further round may open (the next would take ε past the budget), or None. Called by the
        round machine under the lock; the accountant's answer for the next round is cached."""
        ledger = self.ledger
        if ledger is None or ledger.next_round_fits():
            return None
        message = (f"the privacy budget is spent: epsilon {ledger.epsilon:.4g} after {ledger.rounds} rounds, "
                   f"and one more round would reach {ledger.epsilon_if_another_round():.4g} > budget "
                   f"{ledger.epsilon_budget:g} (delta {ledger.parameters.delta:g}); no further round")
        if not self._budget_logged:
            log.warning("task %r: %s", self.task.name, message)
            self._budget_logged = True
        return message

    def count_refusal(self, reason: str) -> None:
        """Count a refusal decided outside the coordinator (the servicer's stream decoding)."""
        self._count(reason)

    def _count(self, reason: str) -> None:
        with self._lock:
            self.refusals[reason] += 1

    # ----- identity ------------------------------------------------------------------------------------
    def client_key(self, client: str | Caller) -> str:
        """A pseudonym: HMAC-SHA256 of the caller's identity under the task's secret salt (raw ids and
        credential ids are never kept). A plain string is a client id in the trusted-network mode (refused
        INVALID_ARGUMENT unless 1 to 256 characters; ``Identifier`` checks the ids it is given the same way).
        """
        return pseudonym(self._salt, client if isinstance(client, Caller) else Caller.trusted(client))

    def check_task(self, task_name: str) -> None:
        """Refuse (NOT_FOUND) a task this coordinator does not serve; the name is echoed cut short."""
        if task_name != self.task.name:
            raise Refusal(Status.NOT_FOUND, "unknown_task",
                          f"unknown task {shown(task_name)}; this coordinator serves {self.task.name!r}")

    _check_task = check_task  # the name the round code calls it by

    # ----- views ---------------------------------------------------------------------------------------
    def view(self) -> LiveView:
        """The task as this coordinator holds it now (see ``live_view``), taken under the lock in one go and
        from memory only (no store read): metrics scrapes, logs and dashboards may call it as often as
        they like."""
        s = self.task.rounds
        with self._lock:
            now = self._clock()
            m, r, ledger = self.machine, self.machine.round, self.ledger
            live = None
            if r is not None:
                phase = (RoundPhase.COMMITTING if r.commit_due or r.committing or r.aggregating else
                         RoundPhase.SELECTING if r.selecting else RoundPhase.REPORTING)
                report = r.aggregate.report
                live = LiveRound(r.round_id, r.round_num, r.base_version, phase, len(r.assigned),
                                 r.answered(), len(r.accepted), len(r.refused), s.clients_per_round,
                                 s.selection_goal, s.minimum, float(r.aggregate.total_weight), r.opened,
                                 r.selection_ends, r.deadline, max(0.0, r.deadline - now),
                                 tuple(report.stages), report.updates_clipped, report.weights_capped)
            privacy = None if ledger is None else PrivacySpent(ledger.epsilon, ledger.parameters.delta,
                                                                ledger.rounds, ledger.epsilon_budget)
            return LiveView(self.task.name, self.replica_id, m.version, self._lease is not None,
                            "" if self._lease is not None else self._standby_reason, live, self.refusals,
                            m.reports_accepted, m.committed_rounds, privacy, now)

    def add_round_listener(self, listener: RoundListener) -> None:
        """Call ``listener`` with every round this coordinator opens, commits or fails from now on (see
        ``live_view.RoundListener``): how metrics and structured logs hear of rounds."""
        with self._lock:
            self._round_listeners.append(listener)

    def _announce(self, event: RoundEvent) -> None:
        """Tell the listeners (outside the lock); a listener's failure is logged, never the round's."""
        with self._lock:
            listeners = list(self._round_listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:
                log.exception("a round listener failed on %s of round %d", event.kind.value, event.round_num)

    @property
    def version(self) -> int:
        with self._lock:
            return self.machine.version

    @property
    def reports_accepted(self) -> int:
        with self._lock:
            return self.machine.reports_accepted

    @property
    def _round(self) -> OpenRoundState | None:
        """The round in flight (tests look inside it)."""
        return self.machine.round

    @property
    def delta_layouts(self) -> list[TensorLayout]:
        """What a report must carry: the global trainable variables, float32, in model order."""
        return list(self._delta_layouts)

    @property
    def model_spec_json(self) -> str:
        return self._model_spec_json

    @property
    def training_config_json(self) -> str:
        return self._training_json

    def wait_for_version(self, version: int, timeout: float) -> bool:
        """Block until the model reaches ``version`` (or ``timeout`` seconds pass); True if it did."""
        with self._changed:
            return self._changed.wait_for(lambda: self.machine.version >= version, timeout)

    def model_arrays(self, task_name: str, version: int) -> tuple[list[str], list[np.ndarray]]:
        """The global variables of a committed version (names, arrays)."""
        self._check_task(task_name)
        with self._lock:
            if version == self.machine.version:
                return list(self._names), list(self._state.globals)
            # Never asks the store about a value it cannot hold; a standby may lag its leader by a version.
            if version < 0 or (version > self.machine.version and self._lease is not None):
                raise Refusal(Status.NOT_FOUND, "unknown_version",
                              f"task {task_name!r} has no model version {version}")
        try:
            record = self.store.get_version(self.task.name, version)
        except UnknownVersion:
            raise Refusal(Status.NOT_FOUND, "unknown_version",
                          f"task {task_name!r} has no model version {version}") from None
        except StoreUnavailable as err:
            raise _store_unavailable(err) from err
        return list(self._names), globals_from_bytes(record.payload()[0], self._names)

    # ----- selection -----------------------------------------------------------------------------------

    def check_in(self, task_name: str, client: str | Caller, protocol_version: int,
                 capabilities: Mapping[str, str] | None = None) -> Assignment | RetryLater:
        """An assignment to the open round (a round opens on the first check-in), or a retry window.

        While a round is being opened or committed (a store write, outside the lock) the check-in waits for
        it, up to `BUSY_WAIT_S`, instead of being sent away for a whole retry window."""
        return self.settle_check_in(self.begin_check_in(task_name, client, protocol_version))

    def begin_check_in(self, task_name: str, client: str | Caller, protocol_version: int) -> PendingCheckIn:
        """``check_in`` up to its first I/O or wait: the refusals, the caller's check-in budget and the
        machine's decision, under the lock; no store call. A check-in into an open round (every check-in
        of a round but the one that opens it) needs nothing more, so the servicer answers it on its event
        loop; ``needs_io`` says whether ``settle_check_in`` may block (a round to open in the store, or
        someone else's store write to wait for) and so belongs on a thread."""
        if protocol_version != PROTOCOL_VERSION:
            self._count("protocol_version")
            raise Refusal(Status.FAILED_PRECONDITION, "protocol_version",
                          f"protocol version {protocol_version} is not supported; this coordinator speaks "
                          f"{PROTOCOL_VERSION}")
        self._check_task(task_name)
        self._require_leader()
        caller = client if isinstance(client, Caller) else Caller.trusted(client)
        key = self.client_key(caller)
        started = time.monotonic()
        with self._lock:
            now = self._clock()
            self._admit_check_in(caller, key, now)  # spent once, however long the check-in then waits
            decision = self.machine.check_in(key, caller, now)
            effects = self.machine.take_effects()
        return PendingCheckIn(caller, key, decision, effects, started)

    def settle_check_in(self, pending: PendingCheckIn) -> Assignment | RetryLater:
        """The rest of ``check_in`` (see ``begin_check_in``): perform the effects outside the lock (opening
        the round), wait for another caller's store write (``Busy``) and ask the machine again."""
        decision, effects = pending.decision, pending.effects
        give_up = pending.started + BUSY_WAIT_S
        while True:
            self._perform(effects)
            if isinstance(decision, Assigned):
                return self._assignment(decision.round, decision.token)
            if isinstance(decision, RetryLater):
                return decision
            with self._lock:
                if not effects:  # Busy: someone else's write is out: wait for it
                    remaining = give_up - time.monotonic()
                    if remaining <= 0:
                        return RetryLater(*self.task.rounds.retry_delay_s, reason=decision.why)
                    self._changed.wait(min(remaining, 1.0))
                decision = self.machine.check_in(pending.key, pending.caller, self._clock())
                effects = self.machine.take_effects()

    def _admit_check_in(self, caller: Caller, key: str, now: float) -> None:
        """Refuse (RESOURCE_EXHAUSTED) a check-in over its budget. With authentication the budget is the
        credential's, ``max_check_ins_per_minute`` per device it was issued for, so check-ins under someone
        else's id spend the sender's budget and inventing ids adds none. In the trusted-network mode each
        asserted id has that budget and its network address ``max_check_ins_per_minute_per_peer``; a
        check-in refused by its id's budget costs its address nothing, so one flooding id cannot lock out
        the honest clients behind the same address."""
        rounds = self.task.rounds
        per_device = rounds.max_check_ins_per_minute
        if caller.authenticated:
            share = caller.max_assignments
            if not self._check_ins.allow(caller.group, now, share=share):
                self._refuse_check_in("check_in_rate", per_device * share,
                                      f"this credential ({CREDENTIAL_SHARE_HINT})")
        elif not self._check_ins.allow(key, now):
            self._refuse_check_in("check_in_rate", per_device, "this client")
        elif not self._peer_check_ins.allow(caller.group, now):
            self._refuse_check_in("peer_check_in_rate", rounds.max_check_ins_per_minute_per_peer,
                                  "this network address (no authentication: limits are per address)")

    def _refuse_check_in(self, reason: str, per_minute: float, who: str) -> NoReturn:
        self._count(reason)
        raise Refusal(Status.RESOURCE_EXHAUSTED, reason,
                      f"more than {per_minute:g} check-ins per minute from {who}; wait for the retry window")

    def _assignment(self, r: OpenRoundState, token: str) -> Assignment:
        return Assignment(self.task.name, r.round_id, r.round_num, r.base_version, token,
                          datetime.fromtimestamp(r.deadline, UTC), self._model_spec_json, self._training_json,
                          self.task.batch_size, upload_codec=self.task.aggregation.upload_codec.value,
                          secure_aggregation=self.task.aggregation.secure_aggregation)

    # ----- reporting -----------------------------------------------------------------------------------
    def check_report(self, task_name: str, client: str | Caller, round_id: int, token: str) -> str:
        """Refuse early (before any tensor bytes are read) a report that cannot be accepted; the client key.
        """
        return self.settle_check(self.begin_check(task_name, client, round_id, token))

    def begin_check(self, task_name: str, client: str | Caller, round_id: int, token: str) -> PendingCheck:
        """``check_report`` up to its first I/O: the machine's answer under the lock; no store call. Raises
        ``Refusal`` only when nothing is left for ``settle_check`` to perform. What remains (effects the
        admission emitted, a round to look up in the store) is in the result: ``needs_io`` says whether
        ``settle_check`` may block on the store, so an event loop can run this part itself and hand only
        the rest to a thread."""
        self._check_task(task_name)
        self._require_leader()
        key = self.client_key(client)
        effects: list[Effect] = []
        try:
            with self._lock:
                try:
                    admission = self.machine.admit(key, round_id, token, None, self._clock())
                finally:
                    effects = self.machine.take_effects()
        except Exception as err:
            if not effects:
                raise
            return PendingCheck(key, round_id, effects, ask_store=False, error=err)
        return PendingCheck(key, round_id, effects, ask_store=isinstance(admission, AskStore))

    def settle_check(self, pending: PendingCheck) -> str:
        """The rest of ``check_report`` (see ``begin_check``): perform the effects, ask the store if the
        round is not remembered; the client key."""
        self._perform(pending.effects)
        if pending.error is not None:
            raise pending.error
        if pending.ask_store:  # a round this process does not remember: ask the store
            stored = self._stored_round(pending.round_id, pending.key)  # outside the lock: a read
            with self._lock:  # refuses unless a retry
                self.machine.answer_closed(pending.round_id, pending.key, None, stored)
        return pending.key

    def report(self, task_name: str, client: str | Caller, round_id: int, token: str, weight: float,
               metrics: Mapping[str, float], delta: Sequence[UpdateTensor]) -> ReportOutcome:
        """Validate one client's update and fold it in; raises ``Refusal`` and changes nothing otherwise.
        ``delta`` as decoded: dense arrays, or ``RowSparse`` tensors that are folded row by row.

        Every check of ``check_report`` is made again here, under the lock, since the round may have moved
        on while the tensor bytes were read. The report that completes a round waits for its commit (outside
        the lock) and is told if the commit failed."""
        pending = self.fold_report(task_name, client, round_id, token, weight, metrics, delta)
        return self.settle_report(pending)

    def fold_report(self, task_name: str, client: str | Caller, round_id: int, token: str, weight: float,
                    metrics: Mapping[str, float], delta: Sequence[UpdateTensor]) -> PendingReport:
        """``report`` up to its first I/O: the update checked and folded under the lock, no store call.
        Raises ``Refusal`` only when nothing is left for ``settle_report`` to perform; otherwise the
        effects the fold emitted (the commit of the round it completed), or the round to look up in the
        store, are left for ``settle_report`` (``needs_io`` says whether it may block on the store)."""
        self._check_task(task_name)
        self._require_leader()
        key = self.client_key(client)
        digest = update_digest(weight, delta)
        problem = _invalid_update(weight, metrics, delta, self._delta_layouts)
        outcome: ReportOutcome | None = None
        answered: ReportOutcome | None = None
        r: OpenRoundState | None = None
        effects: list[Effect] = []
        try:
            with self._lock:
                try:
                    admission = self.machine.admit(key, round_id, token, digest, self._clock())
                    if isinstance(admission, ReportOutcome):
                        answered = admission
                    elif isinstance(admission, Fold):
                        r = admission.round
                        if problem is not None:
                            self.machine.refuse_report(r, key, Status.INVALID_ARGUMENT, *problem)
                        outcome = self.machine.fold(r, key, digest, weight, metrics, delta, self._clock())
                finally:  # in the same hold: a refusal may have closed the round, and this thread commits it
                    effects = self.machine.take_effects()
        except Exception as err:
            if not effects:
                raise
            return PendingReport(key, round_id, digest, effects, error=err)
        if answered is not None:
            return PendingReport(key, round_id, digest, effects, outcome=answered, answered=True)
        return PendingReport(key, round_id, digest, effects, outcome=outcome, round=r)

    def settle_report(self, pending: PendingReport) -> ReportOutcome:
        """The rest of ``report`` (see ``fold_report``): perform the effects outside the lock (a round's
        commit), ask the store about a round not remembered; the report's outcome."""
        self._perform(pending.effects)
        if pending.error is not None:
            raise pending.error
        if pending.answered and pending.outcome is not None:
            return pending.outcome
        r, outcome = pending.round, pending.outcome
        if outcome is None or r is None:  # AskStore: a round this process does not remember
            stored = self._stored_round(pending.round_id, pending.key)
            with self._lock:
                return self.machine.answer_closed(pending.round_id, pending.key, pending.digest, stored)
        with self._lock:
            closed = self.machine.closed.get(r.round_id)
            if closed is not None and closed.state == "failed":
                self.machine.counts["commit_failed"] += 1
                raise Refusal(Status.ABORTED, "commit_failed",
                              f"round {r.round_num} failed when it closed ({closed.why}); "
                              "this update is not in the model")
            if self.machine.round is r and r.commit_due:
                return ReportOutcome(True, f"accepted in round {r.round_num}; the commit waits for the store")
        return outcome

    def secure_step(self, task_name: str, client: str | Caller, round_id: int, token: str,
                    message: ClientMessage | None, digest: str) -> tuple[SecurePhase, Instruction]:
        """One ``SecureAggregation`` call (``server.secure_round``): the machine takes the message (None: a
        poll) under the lock and says what the client must do next; a stage that closes may end the round,
        whose commit or failure is performed here, outside the lock."""
        self._check_task(task_name)
        self._require_leader()
        key = self.client_key(client)
        effects: list[Effect] = []
        try:
            with self._lock:
                try:
                    return self.machine.secure_step(key, round_id, token, message, digest, self._clock())
                finally:
                    effects = self.machine.take_effects()
        finally:
            self._perform(effects)

    def _stored_round(self, round_id: int, key: str) -> ClosedRound | None:
        """A finished round of this task as the store has it, with ``key``'s accepted update digest (if
        any) as its only accepted entry; None for a round the task does not have or that is not finished.
        Raises UNAVAILABLE while the store is down (the client retries)."""
        try:
            record, participation = self.store.participation_in(self.task.name, round_id, key)
        except UnknownRound:
            return None
        except StoreUnavailable as err:
            raise _store_unavailable(err) from err
        if not record.state.is_finished:
            return None
        accepted = {}
        if participation is not None and participation.outcome == Outcome.ACCEPTED and participation.digest:
            accepted[key] = participation.digest
        if record.state == RoundState.COMMITTED:
            return ClosedRound("committed", "committed", accepted, record.new_version, record.round_num)
        return ClosedRound("failed", record.failure_reason or "failed", accepted, round_num=record.round_num)

    # ----- round outcomes ------------------------------------------------------------------------------
    def round_outcome(self, task_name: str, round_id: int) -> RoundOutcome:
        """Where round ``round_id`` of the task is: open (still taking reports, or its commit waits for the
        store), committed into a version, or failed. Lets a client tell whether the updates it had accepted
        went into a model version. NOT_FOUND for a round the task does not have."""
        self._check_task(task_name)
        unknown = Refusal(Status.NOT_FOUND, "unknown_round", f"task {task_name!r} has no round id {round_id}")
        with self._lock:
            open_round = self.machine.outcome(round_id)
            if open_round is not None:
                return open_round
            # Not opened by this task (yet): no store read. A standby does not see the leader's new rounds.
            if round_id < 1 or (round_id > self._newest_round_id and self._lease is not None):
                raise unknown
            if round_id in self._finished:
                cached = self._finished[round_id]
                if cached is None:
                    raise unknown
                return cached
        try:
            record = self.store.get_round(round_id)
        except UnknownRound:
            record = None
        except StoreUnavailable as err:
            raise _store_unavailable(err) from err
        if record is None or record.task != self.task.name:
            if record is not None or round_id <= self._newest_round_id:  # else it may be opened later
                self._remember_finished(round_id, None)
            raise unknown
        outcome = None
        if record.state == RoundState.COMMITTED:
            outcome = RoundOutcome(round_id, record.round_num, RoundView.COMMITTED, record.new_version,
                                   record.num_accepted)
        elif record.state == RoundState.FAILED:
            outcome = RoundOutcome(round_id, record.round_num, RoundView.FAILED, None, record.num_accepted,
                                   record.failure_reason or "failed")
        if outcome is not None:
            self._remember_finished(round_id, outcome)
            return outcome
        # Unfinished in the store but not the open round here: it is closing (its commit or failure is
        # being written), so it is not cached.
        return RoundOutcome(round_id, record.round_num, RoundView.OPEN, num_accepted=record.num_accepted)

    def _remember_finished(self, round_id: int, outcome: RoundOutcome | None) -> None:
        with self._lock:
            self._finished[round_id] = outcome
            while len(self._finished) > FINISHED_ROUNDS_CACHED:
                self._finished.popitem(last=False)


    # ----- evaluation ----------------------------------------------------------------------------------
    def report_evaluation(self, task_name: str, client: str | Caller, version: int, squared_error: float,
                          num_correct: float, num_examples: float) -> None:
        """Record one caller's reconstruct-then-evaluate sums for a committed version.

        Bounded so that one caller moves a version's pooled metrics only so far (``evaluations``): the sums
        must be a possible report under ``evaluation_limits`` (INVALID_ARGUMENT), a caller group sends at
        most `MAX_EVALUATIONS_PER_MINUTE` a minute per device it speaks for (RESOURCE_EXHAUSTED), and a
        caller's second evaluation of a version replaces its first (one per caller per version)."""
        self._check_task(task_name)
        caller = client if isinstance(client, Caller) else Caller.trusted(client)
        # One evaluation per device per version: a one-device credential is one evaluator whatever ids it
        # claims (keyed by the credential, so the store's uniqueness holds across restarts); a gateway's D
        # devices are D evaluators, at most D distinct ids per version (counted in memory).
        key = self.client_key(Caller(caller.group, caller.group, 1, True) if caller.authenticated
                              and caller.max_assignments == 1 else caller)
        try:
            self.evaluation_limits.check(squared_error, num_correct, num_examples)
        except Refusal:
            self._count("bad_evaluation")
            raise
        if not 0 <= version <= self.version:
            raise Refusal(Status.NOT_FOUND, "unknown_version", f"no model version {shown(version)}")
        with self._lock:
            # A group speaking for D devices (a gateway credential) gets D times a device's budget; each
            # report costs 1/D of the group's bucket.
            allowed = self._evaluations.allow(caller.group, self._clock(), share=caller.max_assignments)
            if allowed and caller.authenticated and caller.max_assignments > 1:
                seen = self._evaluators.setdefault((version, caller.group), set())
                if key not in seen and len(seen) >= caller.max_assignments:
                    self._count("evaluation_devices")
                    raise Refusal(Status.RESOURCE_EXHAUSTED, "evaluation_devices",
                                  f"this credential speaks for {caller.max_assignments} devices and "
                                  f"{len(seen)} of them evaluated version {version} already")
                seen.add(key)
                while len(self._evaluators) > 10_000:  # oldest first: versions only grow
                    del self._evaluators[next(iter(self._evaluators))]
        if not allowed:
            self._count("evaluation_rate")
            raise Refusal(Status.RESOURCE_EXHAUSTED, "evaluation_rate",
                          f"more than {MAX_EVALUATIONS_PER_MINUTE:g} evaluations per minute per device from "
                          "this caller; retry later")
        counted = self.evaluation_limits.counted(squared_error, num_correct, num_examples)
        if counted[2] < num_examples:
            self._count("evaluation_capped")
        squared_error, num_correct, num_examples = counted
        try:
            self.store.record_evaluation(self.task.name, version, key, squared_error=squared_error,
                                         num_correct=num_correct, num_examples=num_examples)
        except StoreUnavailable as err:
            raise _store_unavailable(err) from err
        except UnknownVersion as err:
            raise Refusal(Status.NOT_FOUND, "unknown_version", str(err)) from err

    # ----- time ----------------------------------------------------------------------------------------

    # ----- time ----------------------------------------------------------------------------------------
    def tick(self) -> None:
        """Apply timeouts (and retry what a store outage held back); called periodically by the server so a
        silent round still ends on time."""
        self.maintain_lease()
        self._advance_clock()

    def _advance_clock(self) -> None:
        """The round's timeouts at the current time, and what they emit performed."""
        with self._lock:
            self.machine.advance(self._clock())
            effects = self.machine.take_effects()
        self._perform(effects)
        self._record_failures()

    # ----- effects (outside the lock) ------------------------------------------------------------------
    def _perform(self, effects: list[Effect]) -> None:
        """Perform the machine's effects in order, outside the lock, feeding each result back (which may
        emit more). The first refusal for the caller (the store could not open a round) is raised last."""
        refusal: Refusal | None = None
        pending = list(effects)
        while pending:
            effect = pending.pop(0)
            if isinstance(effect, OpenRound):
                refusal = self._open(effect) or refusal
            elif isinstance(effect, CommitRound):
                pending.extend(self._commit(effect))
            else:
                self._record_failure(effect)
        if effects:
            with self._lock:
                self._changed.notify_all()
        if refusal is not None:
            raise refusal

    def _open(self, effect: OpenRound) -> Refusal | None:
        try:
            record = self.store.open_round(self.task.name, base_version=effect.base_version,
                                           target=effect.target, min_reports=effect.min_reports,
                                           deadline=datetime.fromtimestamp(effect.deadline, UTC),
                                           fencing=self._lease)
        except StoreUnavailable as err:
            with self._lock:
                self.machine.open_failed()
            return _store_unavailable(err)
        except BaseException:  # a store fault: the next check-in asks again rather than wait for ever
            with self._lock:
                self.machine.open_failed()
            raise
        s = self.task.rounds
        event = RoundEvent(RoundEventKind.OPENED, self.task.name, record.round_id, record.round_num,
                           effect.base_version, effect.opened, selection_goal=s.selection_goal,
                           goal=s.clients_per_round, min_reports=s.minimum,
                           selection_timeout_s=s.selection_timeout_s, deadline_at=effect.deadline)
        with self._lock:  # logged before any assignment to the round can be
            self.machine.round_opened(effect, record.round_id, record.round_num)
            self._newest_round_id = max(self._newest_round_id, record.round_id)
            log.info("round %d opened on model version %d: selecting up to %d clients for %g s; commits at "
                     "%d reports, or at least %d by the deadline %s", record.round_num, effect.base_version,
                     s.selection_goal, s.selection_timeout_s, s.clients_per_round, s.minimum,
                     datetime.fromtimestamp(effect.deadline, UTC).strftime("%H:%M:%S UTC"),
                     extra=event.log_extra())
        self._announce(event)
        return None

    def _commit(self, effect: CommitRound) -> list[Effect]:
        """Make the next version from the round's aggregate and write it with the round's outcome in one
        transaction. A store outage leaves the commit due (the machine emits it again at a later event), so
        accepted updates are not thrown away over a database hiccup; a non-finite model or a refused
        transition fails the round and the model stays."""
        state = self._state  # only a commit changes it, and one commit is in flight at a time
        epsilon = None
        if self.ledger is not None:  # the round's ε: this release composed with all committed before it
            epsilon = self.ledger.parameters.epsilon_after(self.ledger.rounds + 1)
            effect = dataclasses.replace(effect, summary=dataclasses.replace(
                effect.summary, metrics={**effect.summary.metrics, "epsilon": epsilon}))
        started = time.monotonic()
        try:
            if effect.first_attempt:
                self.store.mark_aggregating(effect.round_id, fencing=self._lease)
            new_state = self.algorithm.server_update(state, effect.aggregate)
            self.store.commit_round(effect.round_id,
                                    parameters=globals_to_bytes(self._names, new_state.globals),
                                    optimizer_state=optimizer_state_to_bytes(new_state.optimizer_state,
                                                                             clip_bound=new_state.clip_bound),
                                    summary=effect.summary, participations=effect.participations,
                                    fencing=self._lease)
        except LeaseLost as err:  # another coordinator leads now: nothing was written, and this one stops
            with self._lock:
                self.machine.commit_refused(effect.round_id, f"commit refused: {err}", self._clock())
                effects = self.machine.take_effects()
            self._stand_down(str(err))
            return [e for e in effects if not isinstance(e, FailRound)]  # the new leader closes the round
        except StoreUnavailable:
            with self._lock:
                self.machine.commit_unavailable(effect.round_id)
                return self.machine.take_effects()
        except StoreError as err:  # another writer moved the task on (StaleRound), or the round was closed
            with self._lock:
                self.machine.commit_refused(effect.round_id, f"commit failed: {err}", self._clock())
                return self.machine.take_effects()
        except NonFiniteUpdate as err:  # a committed Inf or NaN would stay for good: the model stays
            with self._lock:
                self.machine.counts["non_finite_round"] += 1
                self.machine.commit_refused(
                    effect.round_id, f"non_finite: {err}; the model stays at version {effect.base_version}",
                    self._clock())
                return self.machine.take_effects()
        except BaseException:  # a fault (a bug, a broken store): the commit stays due, never stuck in flight
            with self._lock:
                self.machine.commit_unavailable(effect.round_id)
            raise
        with self._lock:
            self._state = new_state
            if self.ledger is not None:
                self.ledger.record_round(epsilon)
            closed = self.machine.commit_done(effect.round_id, effect.base_version + 1)
            effects = self.machine.take_effects()
        event = RoundEvent(RoundEventKind.COMMITTED, self.task.name, effect.round_id, effect.round_num,
                           effect.base_version, self._clock(), new_version=closed.new_version, why=effect.why,
                           summary=effect.summary, participations=effect.participations,
                           duration_s=effect.summary.metrics.get("seconds"),
                           commit_s=time.monotonic() - started)
        log.info("round %d committed version %d (%s): %s", effect.round_num, closed.new_version, effect.why,
                 _figures(effect.summary), extra=event.log_extra())
        self._announce(event)
        return effects

    def _record_failure(self, effect: FailRound) -> None:
        event = RoundEvent(RoundEventKind.FAILED, self.task.name, effect.round_id, effect.round_num,
                           effect.base_version if effect.base_version is not None else self.version,
                           self._clock(), reason=effect.reason, summary=effect.summary,
                           participations=effect.participations,
                           duration_s=effect.summary.metrics.get("seconds"))
        log.warning("round %d failed: %s; %s", effect.round_num, effect.reason, _figures(effect.summary),
                    extra=event.log_extra())
        self._announce(event)
        with self._lock:
            self._unrecorded_failures.append(effect)
        self._record_failures()

    def _record_failures(self) -> None:
        """Write the failed rounds a store outage held back (the round is abandoned either way; if the
        process dies first, the next start marks it failed)."""
        while True:
            with self._lock:
                if not self._unrecorded_failures:
                    return
                effect = self._unrecorded_failures[0]
            try:
                self.store.fail_round(effect.round_id, effect.reason, summary=effect.summary,
                                      participations=effect.participations, fencing=self._lease)
            except StoreUnavailable:
                return
            except StoreError:
                pass  # already closed by someone else (a restart): nothing left to record
            with self._lock:
                if self._unrecorded_failures and self._unrecorded_failures[0] is effect:
                    self._unrecorded_failures.pop(0)

    def record_progress(self) -> bool:
        """Write the open round's counts to the store if they changed since last written, so that
        ``fedrecon status`` shows a live round. The server calls this every second or so (never once per
        report); the write happens outside the lock, and a store that refuses it now gets the counts on a
        later call. True if something was written."""
        with self._lock:
            progress = self.machine.progress()
            if progress is None or progress == self._progress_written:
                return False
        round_id, selected, reported, accepted, refused, weight = progress
        try:
            written = self.store.record_round_progress(
                round_id, selected=selected, reported=reported, accepted=accepted, refused=refused,
                total_weight=weight)
        except StoreError as err:  # an outage, or the round closed meanwhile: the next call tries again
            log.debug("round progress not recorded: %s", err)
            return False
        self._progress_written = progress
        return written

    # ----- shutdown ------------------------------------------------------------------------------------
    def drain(self, timeout_s: float, *, poll_s: float = 0.5) -> str:
        """Let the open round finish before a shutdown: no one is assigned any more (`RoundMachine.drain`),
        and this waits up to ``timeout_s`` seconds while the clients already selected report, until the
        round commits or fails by its own rules. Reports keep arriving meanwhile (the server is still
        serving; only its health says NOT_SERVING), so a rolling restart does not throw away the work of a
        round that was about to complete. What is still open after ``timeout_s`` is for `shut_down`.
        Returns a line saying how the drain ended, which the caller logs."""
        give_up = time.monotonic() + timeout_s
        with self._lock:
            r = self.machine.round
            waiting = self.machine.drain(self._clock())
            effects = self.machine.take_effects()
        self._perform(effects)
        self._record_failures()
        if r is None:
            return "no round was open"
        if waiting:
            log.info("draining: round %d has %d of %d selected clients' reports; waiting up to %g s for the "
                     "rest", r.round_num, len(r.accepted), len(r.assigned), timeout_s,
                     extra={"event": "draining", "figures": {
                         "round_num": r.round_num, "accepted": len(r.accepted), "selected": len(r.assigned),
                         "drain_s": timeout_s}})
        while True:
            with self._changed:
                if self.machine.round is not r or r.commit_due:
                    break
                remaining = give_up - time.monotonic()
                if remaining <= 0:
                    return (f"round {r.round_num} still open after the {timeout_s:g} s drain, with "
                            f"{len(r.accepted)} of {len(r.assigned)} reports")
                self._changed.wait(min(remaining, poll_s))
            self._advance_clock()  # the round's deadline applies while it drains (the lease is the ticker's)
        closed = self.machine.closed.get(r.round_id)
        if closed is not None:
            return f"round {r.round_num} {closed.state} while draining"
        return f"round {r.round_num} is committing"

    def shut_down(self, grace_s: float = 0.0, *, retry_every_s: float = 0.5) -> ShutdownOutcome:
        """Close the open round (see ``_close_for_shutdown``), then give up the lead at once, so a standby
        coordinator takes the task without waiting for the lease to run out."""
        outcome = self._close_for_shutdown(grace_s, retry_every_s=retry_every_s)
        lease = self._lease
        if lease is not None:
            try:
                self.store.release_lease(lease)
            except StoreError as err:
                log.warning("lease of task %r not released (%s): a standby takes over when it runs out",
                            self.task.name, err)
        return outcome

    def _close_for_shutdown(self, grace_s: float, *, retry_every_s: float) -> ShutdownOutcome:
        """Stop assigning, then close the open round: commit it if it has its minimum of reports, else fail
        it (the designed outcome of a short round).

        A commit that is due must not be dropped over a store outage: it is tried again every
        ``retry_every_s`` for ``grace_s`` seconds (wall time; one attempt can last as long as the store's own
        timeout). If the store never answers, the outcome is "lost" with the number of accepted updates
        that are in no model version, for the caller to report and to exit non-zero with."""
        give_up = time.monotonic() + grace_s
        with self._lock:
            r = self.machine.round
            what = self.machine.stop(self._clock())
            effects = self.machine.take_effects()
        self._perform(effects)
        self._record_failures()
        if r is None or what is None:
            return ShutdownOutcome("idle", "no round was open")
        if what == "failed":
            return ShutdownOutcome("failed", f"round {r.round_num} failed: it had {len(r.accepted)} of "
                                             f"the {self.task.rounds.minimum} reports it needs",
                                   round_num=r.round_num)
        attempts = 1
        while True:
            with self._lock:
                closed = self.machine.closed.get(r.round_id)
                in_flight = self.machine.round is r and r.committing
            if closed is not None:
                self._record_failures()
                if closed.state == "committed":
                    return ShutdownOutcome(
                        "committed", f"round {r.round_num} committed version {closed.new_version} with "
                                     f"{len(r.accepted)} updates", round_num=r.round_num)
                return ShutdownOutcome("failed", f"round {r.round_num} failed: {closed.why}",
                                       round_num=r.round_num)
            if time.monotonic() + retry_every_s > give_up:
                break
            if in_flight:  # another thread's commit attempt is out: wait for its answer
                with self._changed:
                    self._changed.wait(retry_every_s)
                continue
            time.sleep(retry_every_s)
            attempts += 1
            self.tick()  # the commit is due again: the machine emits it
        return ShutdownOutcome(
            "lost", f"LOST {len(r.accepted)} accepted update(s) of round {r.round_num} (round id "
                    f"{r.round_id}): its commit was due but the store stayed unavailable for the "
                    f"{grace_s:g} s shutdown grace ({attempts} attempts); they are in no model version",
            round_num=r.round_num, lost_updates=len(r.accepted))



@dataclass(frozen=True)
class ShutdownOutcome:
    """What ``Coordinator.shut_down`` did with the open round; ``lost_updates`` > 0 only when accepted
    updates are in no model version (the store never took the due commit)."""

    state: str  # "idle", "committed", "failed" or "lost"
    message: str
    round_num: int | None = None
    lost_updates: int = 0


class _TokenBuckets:
    """Token buckets per key (a client, a credential, a network address): ``rate`` tokens a second, at most
    ``burst`` saved up, both multiplied by the key's ``share`` (a credential issued for N devices has N
    devices' budget). Keys idle long enough to be full again are forgotten, so memory follows active keys
    only."""

    def __init__(self, rate: float, *, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, time)
        self._last_sweep = 0.0

    @classmethod
    def per_minute(cls, limit: float) -> _TokenBuckets:
        """``limit`` a minute, with ten seconds' worth (at least one) allowed at once."""
        return cls(limit / 60.0, burst=max(1.0, limit / 6.0))

    def allow(self, key: str, now: float, *, share: int = 1) -> bool:
        burst = self.burst * share
        tokens, then = self._buckets.get(key, (burst, now))
        tokens = min(burst, tokens + (now - then) * self.rate * share)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        if now - self._last_sweep > 60.0:
            # A bucket idle this long is full again at any share, so forgetting it changes nothing.
            full_after = self.burst / self.rate
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}
            self._last_sweep = now
        return allowed


def pseudonym(salt: bytes, caller: Caller) -> str:
    """The key a caller is known by in a task's store: HMAC-SHA256 of its identity under the task's salt
    (``TaskRecord.pseudonym_salt``); a tool auditing the store (the failover drill) computes the same."""
    return hmac.new(salt, caller.key.encode(), hashlib.sha256).hexdigest()[:40]


def _figures(summary: RoundSummary) -> str:
    """A closed round for the log: its reports, weight and duration, then its metrics (those that are not
    zero: counts of capped or clipped updates matter when they happen)."""
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in summary.metrics.items()
                        if k not in ("seconds", "train_examples") and (v or k == "train_loss"))
    return (f"{summary.num_reported} reports ({summary.num_accepted} accepted, {summary.num_refused} "
            f"refused) of {summary.num_selected} selected, weight {summary.total_weight:.6g}, "
            f"{summary.metrics.get('seconds', 0.0):.1f} s" + (f"; {metrics}" if metrics else ""))


def _sampling_text(population: int, clients_per_round: int) -> str:
    if population == clients_per_round:
        return "no amplification by sampling (every round counts for every user)"
    return f"{clients_per_round} of {population} users a round, assumed uniformly random"


def _store_unavailable(err: StoreError) -> Refusal:
    return Refusal(Status.UNAVAILABLE, "store_unavailable",
                   f"the coordinator's store is unavailable ({err}); retry later")


def _invalid_update(weight: float, metrics: Mapping[str, float], delta: Sequence[UpdateTensor],
                    layouts: Sequence[TensorLayout]) -> tuple[str, str] | None:
    """(reason, message) if the update must be refused; shapes were checked when its manifest arrived."""
    if not math.isfinite(weight) or weight < 0:
        return "bad_weight", f"weight must be finite and non-negative, got {weight}"
    if weight > MAX_WEIGHT:
        return "bad_weight", f"weight {weight:g} is above the limit {MAX_WEIGHT:g}"
    if len(delta) != len(layouts):
        return "bad_tensors", f"expected {len(layouts)} tensors, got {len(delta)}"
    for d, layout in zip(delta, layouts, strict=True):
        if tuple(d.shape) != layout.shape or d.dtype != layout.dtype:
            return "bad_tensors", f"tensor {layout.name!r} must be {layout.dtype} {list(layout.shape)}"
        if not all_finite(d.values if isinstance(d, RowSparse) else d):
            return "non_finite", f"tensor {layout.name!r} has NaN or infinite values"
    return _invalid_metrics(metrics)


def _invalid_metrics(metrics: Mapping[str, float]) -> tuple[str, str] | None:
    """A report's metric map is stored with its participation: bounded in entries and key length, so no
    client can make the store (and ``status``) carry megabytes, and finite (JSON has no NaN)."""
    if len(metrics) > MAX_METRICS:
        return "bad_metrics", f"at most {MAX_METRICS} metrics per report, got {len(metrics)}"
    long_keys = [k for k in metrics if not 1 <= len(k) <= MAX_METRIC_KEY_CHARS]
    if long_keys:
        return "bad_metrics", (f"metric names must be 1 to {MAX_METRIC_KEY_CHARS} characters, got "
                               f"{shown(long_keys[0])}")
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        return "bad_metrics", f"metrics {', '.join(shown(k) for k in bad[:4])} are not finite"
    return None


def shown(value: object) -> str:
    """``repr(value)`` cut to `MAX_ECHO_CHARS`: what may be quoted back to a client in an error message, so
    a client's megabyte-long name never reaches an error trailer (or a log line) whole."""
    if isinstance(value, str) and len(value) > MAX_ECHO_CHARS:  # never repr a megabyte only to cut it
        return f"{value[:MAX_ECHO_CHARS]!r}... ({len(value)} chars)"
    text = repr(value)
    return text if len(text) <= MAX_ECHO_CHARS else f"{text[:MAX_ECHO_CHARS]}..."


def _normalised(spec: Mapping[str, object]) -> dict[str, object]:
    """A task description as it compares once stored: JSON types (tuples become lists, ...)."""
    return json.loads(json.dumps(spec, sort_keys=True))


def _differences(a: object, b: object, path: str = "") -> list[str]:
    """Dotted paths where two JSON-like values differ (for the message refusing a changed task)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{path}{k}.")]
    return [] if a == b else [path.rstrip(".") or "(whole)"]
