"""The round coordinator of one task: selection, configuration, reporting, commit (no transport here).

A round (after Bonawitz et al., MLSys 2019), with ``RoundSettings`` giving the numbers:

1. Selection. The first check-in opens a round on the latest model version (persisted as ``open``). The
   coordinator assigns clients first come, first served, up to the over-selected goal, while the selection
   window lasts; anyone else gets a retry window. Too few assignments when the window closes fail the
   round.
2. Configuration. An assigned client downloads the round's global variables (never local ones: the
   model's local variables do not exist on the server).
3. Reporting. Each accepted report is validated and folded at once through the task's aggregation stages
   (``core.aggregation``, shared with the simulator: weight cap, norm clip, then a streaming weighted mean
   whose memory is one model whatever the number of clients, or a buffering trimmed mean / median). The
   round commits as soon as ``clients_per_round`` reports are in (later reporters are told ABORTED), or
   when every assigned client has answered, or at the deadline with at least ``min_reports``; otherwise it
   fails and the model is unchanged.
4. Commit. ``FedRecon.server_update`` (the simulator's own server step) makes the next model version, and
   the store writes it with the round's outcome and participations in one transaction. A round whose new
   model would hold a NaN or infinite value fails ("non_finite") and the model stays.

In-flight round state lives in memory only: a coordinator that dies mid-round loses at most that round,
which the next start marks failed, and no partial aggregate is ever written. Clients are known to the store
only by a keyed hash of their id.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NoReturn

import numpy as np

from fedrecon.core.aggregation import Aggregator
from fedrecon.core.algorithm import FedRecon, NonFiniteUpdate, ServerState
from fedrecon.core.compression import RowSparse, UpdateTensor
from fedrecon.core.model_spec import model_from_config
from fedrecon.protocol import (
    CREDENTIAL_SHARE_HINT,
    PROTOCOL_VERSION,
    Assignment,
    ReportOutcome,
    RetryLater,
    RoundOutcome,
)
from fedrecon.protocol import RoundState as RoundView
from fedrecon.server.checkpoints import (
    globals_from_bytes,
    globals_to_bytes,
    optimizer_state_from_bytes,
    optimizer_state_to_bytes,
)
from fedrecon.server.evaluations import MAX_EVALUATIONS_PER_MINUTE, EvaluationLimits
from fedrecon.server.identity import Caller
from fedrecon.server.refusals import Refusal, Status
from fedrecon.server.store import (
    Outcome,
    Participation,
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
from fedrecon.tensors import TensorLayout

log = logging.getLogger(__name__)

MAX_WEIGHT = 1e9  # a client weight above this is absurd (examples on one device)
MAX_METRICS = 64  # entries in a report's metric map (a device sends a handful: loss, examples, ...)
MAX_METRIC_KEY_CHARS = 64
MAX_ECHO_CHARS = 64  # a client's string quoted back in an error message is cut to this (see ``shown``)


@dataclass
class _Round:
    """A round in flight (memory only)."""

    round_id: int
    round_num: int
    base_version: int
    opened: float
    selection_ends: float
    deadline: float
    aggregate: Aggregator
    selecting: bool = True
    assigned: dict[str, str] = field(default_factory=dict)  # client key -> assignment token
    accepted: dict[str, str] = field(default_factory=dict)  # client key -> digest of the accepted update
    weights: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # client key -> reason
    group_assignments: Counter[str] = field(default_factory=Counter)  # caller group -> assignments taken
    loss_sum: float = 0.0
    examples: float = 0.0
    aggregating: bool = False  # the store has the round as "aggregating"
    commit_due: str | None = None  # why the round must commit; set while the store is unavailable

    def answered(self) -> int:
        return len(self.accepted) + len(self.refused)


@dataclass(frozen=True)
class _ClosedRound:
    state: str  # "committed" or "failed"
    why: str  # "goal", "all answered", "deadline" or a failure reason
    accepted: dict[str, str]
    new_version: int | None = None  # the version a committed round wrote


class Coordinator:
    """Runs the rounds of one task against a store. Thread-safe: gRPC workers call it concurrently."""

    def __init__(self, store: SqlStore, task: TaskSpec, *, clock: Callable[[], float] = time.time,
                 initial_globals: Sequence[np.ndarray] | None = None) -> None:
        """``initial_globals`` (e.g. an exported or TFF-trained model) becomes version 0 when the task is
        created; for a task already in the store they are ignored (``created_task`` tells which happened)."""
        self.store = store
        self.task = task
        self._clock = clock
        self._lock = threading.RLock()
        self._version_changed = threading.Condition(self._lock)
        self.model = model_from_config(task.model)
        self.algorithm = FedRecon(self.model, task.training, aggregation=task.aggregation)
        self.algorithm.check_aggregation(max_clients=task.rounds.clients_per_round)
        self._names = [v.name for v in self.model.global_variables]
        self._delta_layouts = [TensorLayout(self.model.global_variables[i].name, np.dtype(np.float32),
                                            tuple(self.model.global_variables[i].shape))
                               for i in self.model.global_trainable]
        self._model_spec_json = json.dumps(task.model, sort_keys=True)
        self._training_json = json.dumps(task.training.to_dict(), sort_keys=True)
        self.created_task = False
        self._salt = self._load_or_create_task(initial_globals)
        self.interrupted_rounds = [r.round_id for r in store.fail_unfinished_rounds(
            task.name, "coordinator restarted before the round committed")]
        latest = store.latest_version(task.name)
        self._version = latest.version
        parameters, optimizer_state = latest.payload()
        self._state = ServerState(globals_from_bytes(parameters, self._names),
                                  optimizer_state_from_bytes(optimizer_state), latest.version)
        self._round: _Round | None = None
        self._progress_written: tuple[int, int, int, int, int, float] | None = None  # see record_progress
        self._closed: OrderedDict[int, _ClosedRound] = OrderedDict()
        self._committed_rounds = sum(1 for r in store.list_rounds(task.name) if r.state == "committed")
        self.refusals: Counter[str] = Counter()
        self.reports_accepted = 0
        self._stopping = False
        self._unrecorded_failures: list[tuple[int, str, RoundSummary, list[Participation]]] = []
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
        caller = client if isinstance(client, Caller) else Caller.trusted(client)
        return hmac.new(self._salt, caller.key.encode(), hashlib.sha256).hexdigest()[:40]

    def check_task(self, task_name: str) -> None:
        """Refuse (NOT_FOUND) a task this coordinator does not serve; the name is echoed cut short."""
        if task_name != self.task.name:
            raise Refusal(Status.NOT_FOUND, "unknown_task",
                          f"unknown task {shown(task_name)}; this coordinator serves {self.task.name!r}")

    _check_task = check_task  # the name the round code calls it by

    # ----- views ---------------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        with self._lock:
            return self._version

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
        with self._version_changed:
            return self._version_changed.wait_for(lambda: self._version >= version, timeout)

    def model_arrays(self, task_name: str, version: int) -> tuple[list[str], list[np.ndarray]]:
        """The global variables of a committed version (names, arrays)."""
        self._check_task(task_name)
        with self._lock:
            if version == self._version:
                return list(self._names), list(self._state.globals)
            if not 0 <= version < self._version:  # never asks the store about a value it cannot hold
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
        if protocol_version != PROTOCOL_VERSION:
            self._count("protocol_version")
            raise Refusal(Status.FAILED_PRECONDITION, "protocol_version",
                          f"protocol version {protocol_version} is not supported; this coordinator speaks "
                          f"{PROTOCOL_VERSION}")
        self._check_task(task_name)
        caller = client if isinstance(client, Caller) else Caller.trusted(client)
        key = self.client_key(caller)
        rounds = self.task.rounds
        with self._lock:
            now = self._clock()
            self._admit_check_in(caller, key, now)
            self._advance(now)
            if self._stopping:
                return RetryLater(*rounds.retry_delay_s, reason="the coordinator is shutting down")
            if rounds.max_rounds is not None and self._committed_rounds >= rounds.max_rounds:
                return RetryLater(*rounds.retry_delay_s,
                                  reason=f"training finished after {self._committed_rounds} rounds")
            r = self._round or self._open_round(now)
            if key in r.assigned:
                if key in r.accepted or key in r.refused:
                    return RetryLater(*rounds.retry_delay_s,
                                      reason=f"already reported in round {r.round_num}")
                return self._assignment(r, key)  # a retried check-in gets the same assignment
            if not r.selecting:
                return RetryLater(*rounds.retry_delay_s,
                                  reason=f"round {r.round_num} has selected its clients")
            capped = self._assignment_cap_reached(r, caller)
            if capped is not None:
                self._count("assignments_capped")
                return RetryLater(*rounds.retry_delay_s, reason=capped)
            r.assigned[key] = secrets.token_urlsafe(18)
            r.group_assignments[caller.group] += 1
            if len(r.assigned) >= rounds.selection_goal:
                r.selecting = False
                log.info("round %d: %d clients selected (the goal)", r.round_num, len(r.assigned))
            return self._assignment(r, key)

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

    def _assignment_cap_reached(self, r: _Round, caller: Caller) -> str | None:
        """Why ``caller`` may take no further assignment in ``r`` (its group holds all it may), or None. With
        authentication a credential holds at most one assignment per device it was issued for, however many
        client ids it asserts; in the trusted-network mode the task may cap assignments per address."""
        cap: int | None
        if caller.authenticated:
            cap, who, how = caller.max_assignments, "this credential", CREDENTIAL_SHARE_HINT
        else:
            cap, who = self.task.rounds.max_assignments_per_peer, "this network address"
            how = "the task caps assignments per address (max_assignments_per_peer)"
        if cap is None or r.group_assignments[caller.group] < cap:
            return None
        return f"{who} already holds {cap} assignment{'s' if cap != 1 else ''} in round {r.round_num} ({how})"

    def _assignment(self, r: _Round, key: str) -> Assignment:
        return Assignment(self.task.name, r.round_id, r.round_num, r.base_version, r.assigned[key],
                          datetime.fromtimestamp(r.deadline, UTC), self._model_spec_json, self._training_json,
                          self.task.batch_size, upload_codec=self.task.aggregation.upload_codec.value)

    def _open_round(self, now: float) -> _Round:
        s = self.task.rounds
        deadline = now + s.selection_timeout_s + s.reporting_timeout_s
        try:
            record = self.store.open_round(self.task.name, base_version=self._version,
                                           target=s.clients_per_round, min_reports=s.minimum,
                                           deadline=datetime.fromtimestamp(deadline, UTC))
        except StoreUnavailable as err:
            raise _store_unavailable(err) from err
        self._round = _Round(record.round_id, record.round_num, self._version, now,
                             now + s.selection_timeout_s, deadline,
                             self.algorithm.new_aggregate(max_clients=s.clients_per_round,
                                                          batch_size=self.task.batch_size))
        log.info("round %d opened on model version %d: selecting up to %d clients for %g s; commits at %d "
                 "reports, or at least %d by the deadline %s", record.round_num, self._version,
                 s.selection_goal, s.selection_timeout_s, s.clients_per_round, s.minimum,
                 datetime.fromtimestamp(deadline, UTC).strftime("%H:%M:%S UTC"))
        return self._round

    # ----- reporting -----------------------------------------------------------------------------------
    def check_report(self, task_name: str, client: str | Caller, round_id: int, token: str) -> str:
        """Refuse early (before any tensor bytes are read) a report that cannot be accepted; the client key.
        """
        self._check_task(task_name)
        key = self.client_key(client)
        with self._lock:
            self._advance(self._clock())
            r = self._round
            closed_round = r is None or r.round_id != round_id or r.commit_due is not None
            closed = self._closed.get(round_id)
            forgotten = closed_round and closed is None and self._forgotten(round_id)
            if closed_round:
                if not forgotten and (closed is None or key not in closed.accepted):
                    self._report_to_closed_round(round_id, key, None)  # refuses: it cannot be a retry
            elif r is not None and r.assigned.get(key) != token:  # (not closed_round: r is the open round)
                self._refuse(r, key, Status.PERMISSION_DENIED, "not_assigned",
                             f"this client holds no assignment to round {r.round_num}", record=False)
            elif r is not None and key in r.refused:
                self._refuse_refused(r, key)
        if forgotten:  # a round this process does not remember (it closed before a restart): ask the store
            stored = self._stored_round(round_id, key)  # outside the lock: a read
            if stored is None or stored.state != "committed" or key not in stored.accepted:
                with self._lock:
                    self._report_to_closed_round(round_id, key, None, stored, asked=True)  # refuses
        return key

    def _forgotten(self, round_id: int) -> bool:
        """Whether ``round_id`` may be a round of this task that closed before the rounds held in memory (an
        earlier process's, or one pushed out of the memory of recent rounds): older than all of them.
        Round ids only grow, so a newer id that is not in memory is no round of this task's past."""
        known = [*self._closed, *([self._round.round_id] if self._round is not None else [])]
        return round_id >= 1 and (not known or round_id < min(known))

    def _refuse_refused(self, r: _Round, key: str) -> None:
        self._refuse(r, key, Status.FAILED_PRECONDITION, "already_refused",
                     f"this client's report in round {r.round_num} was refused ({r.refused[key]}); "
                     "a refused report is its answer for the round", record=False)

    def report(self, task_name: str, client: str | Caller, round_id: int, token: str, weight: float,
               metrics: Mapping[str, float], delta: Sequence[UpdateTensor]) -> ReportOutcome:
        """Validate one client's update and fold it in; raises ``Refusal`` and changes nothing otherwise.
        ``delta`` as decoded: dense arrays, or ``RowSparse`` tensors that are folded row by row.

        Every check of ``check_report`` is made again here, under the lock, since the round may have moved
        on while the tensor bytes were read."""
        self._check_task(task_name)
        key = self.client_key(client)
        digest = _digest(weight, delta)
        problem = _invalid_update(weight, metrics, delta, self._delta_layouts)
        with self._lock:
            self._advance(self._clock())
            r = self._round
            if r is None or r.round_id != round_id or r.commit_due is not None:
                return self._report_to_closed_round(round_id, key, digest)
            if r.assigned.get(key) != token:
                self._refuse(r, key, Status.PERMISSION_DENIED, "not_assigned",
                             f"this client holds no assignment to round {r.round_num}", record=False)
            if key in r.accepted:
                if r.accepted[key] == digest:
                    return ReportOutcome(False, f"this update was already accepted in round {r.round_num}")
                self._refuse(r, key, Status.ALREADY_EXISTS, "duplicate",
                             f"a different update from this client was already accepted in round "
                             f"{r.round_num}; one update per client per round", record=False)
            if key in r.refused:
                self._refuse_refused(r, key)
            if problem is not None:
                self._refuse(r, key, Status.INVALID_ARGUMENT, problem[0], problem[1], record=True)
            folded = r.aggregate.fold_one(delta, weight)  # weight cap, norm bound, reducer
            if folded.refused:
                self._refuse(r, key, Status.INVALID_ARGUMENT, *folded.refused[0], record=True)
            if folded.clipped:
                self._count("clipped")
            r.accepted[key] = digest
            r.weights[key] = float(weight)
            r.metrics[key] = {k: float(v) for k, v in metrics.items()}
            seen = float(metrics.get("post_recon_examples", 0.0))
            r.loss_sum += float(metrics.get("loss", 0.0)) * seen
            r.examples += seen
            self.reports_accepted += 1
            num = r.round_num
            if len(r.accepted) >= self.task.rounds.clients_per_round:
                self._commit(r, "goal")
            elif not r.selecting and r.answered() == len(r.assigned):
                self._close_when_all_answered(r)
            closed = self._closed.get(r.round_id)
            if closed is not None and closed.state == "failed":
                self._count("commit_failed")
                raise Refusal(Status.ABORTED, "commit_failed",
                              f"round {num} failed when it closed ({closed.why}); "
                              "this update is not in the model")
            if r.commit_due is not None:
                return ReportOutcome(True, f"accepted in round {num}; the commit waits for the store")
            return ReportOutcome(True, f"accepted in round {num}")

    def _report_to_closed_round(self, round_id: int, key: str, digest: str | None,
                                stored: _ClosedRound | None = None, *, asked: bool = False) -> ReportOutcome:
        """Answer a report for a round that is not taking reports: an idempotent retry, or a refusal.

        A retry of an update the round accepted is answered as such: ``accepted=False`` with "already in
        version N" once the round committed, ABORTED if it failed (the update is not in the model). The
        last few rounds are remembered in memory; older ones, and rounds of a coordinator that died after
        committing but before answering, are looked up in the store (the digest of every accepted update
        is stored with its participation; ``asked``: the caller already did, and found ``stored``). A late
        report is ABORTED rather than DEADLINE_EXCEEDED, so that no client confuses the answer with its own
        call timing out (which it may retry)."""
        closed = stored or self._closed.get(round_id)
        r = self._round
        if closed is None:
            if r is not None and r.round_id == round_id:  # goal reached, commit waiting for the store
                self._count("round_over")
                raise Refusal(Status.ABORTED, "round_over", f"round {r.round_num} has all its reports")
            if not asked and self._forgotten(round_id):
                closed = self._stored_round(round_id, key)
            if closed is None:
                current = f"round id {r.round_id} is open" if r else "no round is open"
                self._count("wrong_round")
                raise Refusal(Status.FAILED_PRECONDITION, "wrong_round",
                              f"round id {round_id} is not open ({current})")
        if digest is not None and closed.accepted.get(key) == digest:
            if closed.state == "committed":
                return ReportOutcome(False, f"this update was already accepted in round id {round_id}: it "
                                            f"is in version {closed.new_version}")
            self._count("round_failed")
            raise Refusal(Status.ABORTED, "round_failed",
                          f"round id {round_id} failed ({closed.why}); this update is not in the model")
        if closed.why == "deadline":
            self._count("late")
            raise Refusal(Status.ABORTED, "late",
                          f"round id {round_id} passed its reporting deadline ({closed.state})")
        self._count("round_over")
        raise Refusal(Status.ABORTED, "round_over",
                      f"round id {round_id} is over ({closed.state}: {closed.why})")

    def _stored_round(self, round_id: int, key: str) -> _ClosedRound | None:
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
            return _ClosedRound("committed", "committed", accepted, record.new_version)
        return _ClosedRound("failed", record.failure_reason or "failed", accepted)

    def _refuse(self, r: _Round, key: str, status: Status, reason: str, message: str, *,
                record: bool) -> None:
        self._count(reason)
        if record and key in r.assigned and key not in r.accepted:
            r.refused[key] = reason
            if not r.selecting and r.answered() == len(r.assigned):
                self._close_when_all_answered(r)
        raise Refusal(status, reason, message)

    # ----- round outcomes ------------------------------------------------------------------------------
    def round_outcome(self, task_name: str, round_id: int) -> RoundOutcome:
        """Where round ``round_id`` of the task is: open (still taking reports, or its commit waits for the
        store), committed into a version, or failed. Lets a client tell whether the updates it had accepted
        went into a model version. NOT_FOUND for a round the task does not have."""
        self._check_task(task_name)
        with self._lock:
            r = self._round
            if r is not None and r.round_id == round_id:
                return RoundOutcome(round_id, r.round_num, RoundView.OPEN, num_accepted=len(r.accepted))
        unknown = Refusal(Status.NOT_FOUND, "unknown_round", f"task {task_name!r} has no round id {round_id}")
        if not 1 <= round_id < 2**31:  # never asks the store about a value it cannot hold
            raise unknown
        try:
            record = self.store.get_round(round_id)
        except UnknownRound:
            raise unknown from None
        except StoreUnavailable as err:
            raise _store_unavailable(err) from err
        if record.task != self.task.name:
            raise unknown
        if record.state == RoundState.COMMITTED:
            return RoundOutcome(round_id, record.round_num, RoundView.COMMITTED, record.new_version,
                                record.num_accepted)
        if record.state == RoundState.FAILED:
            return RoundOutcome(round_id, record.round_num, RoundView.FAILED, None, record.num_accepted,
                                record.failure_reason or "failed")
        return RoundOutcome(round_id, record.round_num, RoundView.OPEN, num_accepted=record.num_accepted)

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
    def tick(self) -> None:
        """Apply timeouts; called periodically by the server so a silent round still ends on time."""
        with self._lock:
            self._advance(self._clock())

    def _advance(self, now: float) -> None:
        self._record_failures()
        r = self._round
        if r is None:
            return
        if r.commit_due is not None:  # the store was unavailable at commit time: try again
            self._commit(r, r.commit_due)
            return
        s = self.task.rounds
        if r.selecting and now >= r.selection_ends:
            r.selecting = False
            log.info("round %d: %d clients selected when the %g s selection window closed", r.round_num,
                     len(r.assigned), s.selection_timeout_s)
            if len(r.assigned) < s.minimum:
                self._fail(r, f"only {len(r.assigned)} clients checked in within "
                              f"{s.selection_timeout_s:g} s; the minimum is {s.minimum}")
                return
            if r.answered() == len(r.assigned):
                self._close_when_all_answered(r)
                return
        if now >= r.deadline:
            if len(r.accepted) >= s.minimum:
                self._commit(r, "deadline")
            else:
                self._fail(r, f"only {len(r.accepted)} reports by the deadline; the minimum is {s.minimum}",
                           why="deadline")

    def _close_when_all_answered(self, r: _Round) -> None:
        if len(r.accepted) >= self.task.rounds.minimum:
            self._commit(r, "all answered")
        else:
            self._fail(r, f"every assigned client answered but only {len(r.accepted)} reports were accepted; "
                          f"the minimum is {self.task.rounds.minimum}")

    # ----- commit --------------------------------------------------------------------------------------
    def _summary(self, r: _Round) -> tuple[RoundSummary, list[Participation]]:
        participations = []
        for key in r.assigned:
            if key in r.accepted:  # with its digest: a retry after a restart is recognised (see check_report)
                participations.append(Participation(key, Outcome.ACCEPTED, r.weights[key], r.metrics[key],
                                                    digest=r.accepted[key]))
            elif key in r.refused:
                participations.append(Participation(key, Outcome.REFUSED, 0.0, {}, r.refused[key]))
            else:
                participations.append(Participation(key, Outcome.DROPPED, 0.0, {}, "no report"))
        metrics = {"train_loss": r.loss_sum / r.examples if r.examples else float("nan"),
                   "train_examples": r.examples,
                   **r.aggregate.report.metrics(),
                   "seconds": self._clock() - r.opened}
        summary = RoundSummary(num_selected=len(r.assigned), num_reported=r.answered(),
                               num_accepted=len(r.accepted), num_refused=len(r.refused),
                               total_weight=r.aggregate.total_weight,  # as folded: capped (or 1 each)
                               metrics={k: v for k, v in metrics.items() if math.isfinite(v)})
        return summary, participations

    def _commit(self, r: _Round, why: str) -> None:
        """Commit ``r``; if the store is unavailable the round waits (``commit_due``) and every tick tries
        again until the store answers, so accepted updates are not thrown away over a database hiccup."""
        summary, participations = self._summary(r)
        try:
            if not r.aggregating:
                self.store.mark_aggregating(r.round_id)
                r.aggregating = True
            new_state = self.algorithm.server_update(self._state, r.aggregate)
            self.store.commit_round(r.round_id,
                                    parameters=globals_to_bytes(self._names, new_state.globals),
                                    optimizer_state=optimizer_state_to_bytes(new_state.optimizer_state),
                                    summary=summary, participations=participations)
        except StoreUnavailable:
            r.commit_due = why
            r.selecting = False
            return
        except StoreError as err:  # another writer moved the task on (StaleRound), or the round was closed
            self._fail(r, f"commit failed: {err}")
            return
        except NonFiniteUpdate as err:  # a committed Inf or NaN would stay for good: the model stays
            self._count("non_finite_round")
            self._fail(r, f"non_finite: {err}; the model stays at version {self._version}")
            return
        self._state = new_state
        self._version += 1
        self._committed_rounds += 1
        self._forget(r, _ClosedRound("committed", why, dict(r.accepted), self._version))
        log.info("round %d committed version %d (%s): %s", r.round_num, self._version, why, _figures(summary))
        self._version_changed.notify_all()

    def _fail(self, r: _Round, reason: str, *, why: str | None = None) -> None:
        summary, participations = self._summary(r)
        # The round is abandoned either way; a failure the store cannot record now is recorded by a later
        # tick (or, if the process dies first, by the next start).
        self._unrecorded_failures.append((r.round_id, reason, summary, participations))
        self._record_failures()
        self._forget(r, _ClosedRound("failed", why or reason, {}))
        log.warning("round %d failed: %s; %s", r.round_num, reason, _figures(summary))

    def _record_failures(self) -> None:
        while self._unrecorded_failures:
            round_id, reason, summary, participations = self._unrecorded_failures[0]
            try:
                self.store.fail_round(round_id, reason, summary=summary, participations=participations)
            except StoreUnavailable:
                return
            except StoreError:
                pass  # already closed by someone else (a restart): nothing left to record
            self._unrecorded_failures.pop(0)

    def _forget(self, r: _Round, closed: _ClosedRound) -> None:
        self._closed[r.round_id] = closed
        while len(self._closed) > 8:
            self._closed.popitem(last=False)
        self._round = None

    def record_progress(self) -> bool:
        """Write the open round's counts to the store if they changed since last written, so that
        ``fedrecon status`` shows a live round. The server calls this every second or so (never once per
        report); the write happens outside the lock, and a store that refuses it now gets the counts on a
        later call. True if something was written."""
        with self._lock:
            r = self._round
            if r is None or r.commit_due is not None:
                return False
            progress = (r.round_id, len(r.assigned), r.answered(), len(r.accepted), len(r.refused),
                        r.aggregate.total_weight)
            if progress == self._progress_written:
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
    def shut_down(self, grace_s: float = 0.0, *, retry_every_s: float = 0.5) -> ShutdownOutcome:
        """Stop assigning, then close the open round: commit it if it has its minimum of reports, else fail
        it (the designed outcome of a short round).

        A commit that is due must not be dropped over a store outage: it is tried again every
        ``retry_every_s`` for ``grace_s`` seconds (wall time; one attempt can last as long as the store's own
        timeout). If the store never answers, the outcome is "lost" with the number of accepted updates
        that are in no model version, for the caller to report and to exit non-zero with."""
        give_up = time.monotonic() + grace_s
        with self._lock:
            self._stopping = True
            r = self._round
            if r is None:
                self._record_failures()
                return ShutdownOutcome("idle", "no round was open")
            if r.commit_due is None and len(r.accepted) < self.task.rounds.minimum:
                self._fail(r, "the coordinator shut down before the round had enough reports")
                return ShutdownOutcome("failed", f"round {r.round_num} failed: it had {len(r.accepted)} of "
                                                 f"the {self.task.rounds.minimum} reports it needs",
                                       round_num=r.round_num)
        attempts = 0
        while True:
            with self._lock:
                attempts += 1
                self._commit(r, r.commit_due or "shutdown")
                closed = self._closed.get(r.round_id)
                if closed is not None:
                    self._record_failures()
                    if closed.state == "committed":
                        return ShutdownOutcome("committed", f"round {r.round_num} committed version "
                                                            f"{self._version} with {len(r.accepted)} updates",
                                               round_num=r.round_num)
                    return ShutdownOutcome("failed", f"round {r.round_num} failed: {closed.why}",
                                           round_num=r.round_num)
            if time.monotonic() + retry_every_s > give_up:
                break
            time.sleep(retry_every_s)
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


def _figures(summary: RoundSummary) -> str:
    """A closed round for the log: its reports, weight and duration, then its metrics (those that are not
    zero: counts of capped or clipped updates matter when they happen)."""
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in summary.metrics.items()
                        if k not in ("seconds", "train_examples") and (v or k == "train_loss"))
    return (f"{summary.num_reported} reports ({summary.num_accepted} accepted, {summary.num_refused} "
            f"refused) of {summary.num_selected} selected, weight {summary.total_weight:.6g}, "
            f"{summary.metrics.get('seconds', 0.0):.1f} s" + (f"; {metrics}" if metrics else ""))


def _store_unavailable(err: StoreError) -> Refusal:
    return Refusal(Status.UNAVAILABLE, "store_unavailable",
                   f"the coordinator's store is unavailable ({err}); retry later")


def _digest(weight: float, delta: Sequence[UpdateTensor]) -> str:
    """What identifies an update (an identical retry has the same digest); a row-sparse tensor by its rows
    and their values, so no dense copy is made for it."""
    h = hashlib.sha256(np.float64(weight).tobytes())
    for d in delta:
        if isinstance(d, RowSparse):
            h.update(b"rows:" + np.ascontiguousarray(d.indices, np.int64).tobytes())
            h.update(np.ascontiguousarray(d.values).tobytes())
        else:
            h.update(np.ascontiguousarray(d).tobytes())
    return h.hexdigest()


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
        if not np.isfinite(d.values if isinstance(d, RowSparse) else d).all():
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
