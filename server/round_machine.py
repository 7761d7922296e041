"""The rounds of one task as a state machine: events in, decisions and effects out, and no I/O.

Why a machine apart from the coordinator: a round's rules (who is selected, which report is accepted, when the
round commits or fails) are the delicate part of a coordinator, and they must not wait on a database. This
module holds them with no store, no network, no clock and no lock (its one side effect is log lines): every
event carries the time it happened (``now``), and anything that must touch the outside world is *emitted* as
an effect (`OpenRound`, `CommitRound`, `FailRound`) into an outbox instead of being done. The driver
(`server.coordinator`) calls the machine under its lock, takes the outbox, performs the effects *outside* the
lock, and feeds their results back (`round_opened`, `commit_done`, `commit_unavailable`, `commit_refused`), so
a slow store delays only the round it is writing, never a check-in or a download. The same seam is where the
privacy ledger refuses a round past its budget, and where a replica's lease will fence a commit.

A round, with ``RoundSettings`` giving the numbers (after Bonawitz et al., MLSys 2019):

1. Selection. A check-in with no round open asks the driver to open one (`OpenRound`); until the store
   answers, other check-ins are told to wait (`Busy`). The round assigns clients first come, first served,
   up to the over-selected goal while the selection window lasts; anyone else gets a retry window. Too few
   assignments when the window closes fail the round (`FailRound`).
2. Configuration. Assigned clients download the round's base version (the driver serves it).
3. Reporting. Each report is admitted (assignment token, one update per client, an idempotent retry
   recognised by its digest) and folded at once into the round's aggregate (the task's aggregation stages,
   shared with the simulator). The round closes as soon as ``clients_per_round`` reports are in, or when
   every assigned client has answered, or at the deadline with at least ``min_reports``; otherwise it fails.
4. Commit. Closing emits `CommitRound` with the frozen aggregate; from then on the round takes no report.
   The driver computes the server step and writes the version; if the store is unavailable the commit is
   due again at every later event (`advance`), so accepted updates survive a database hiccup.

Closed rounds are remembered (the last `REMEMBERED_ROUNDS`) so a retried report is answered as the round
ended; for older rounds the machine says `AskStore` and the driver looks the round up outside the lock.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from fedrecon.core.aggregation import Aggregator
from fedrecon.core.compression import UpdateTensor
from fedrecon.protocol import CREDENTIAL_SHARE_HINT, ReportOutcome, RetryLater, RoundOutcome
from fedrecon.protocol import RoundState as RoundView
from fedrecon.secagg_wire import ClientMessage, Instruction, SecureDone, SecurePhase, SecureWait
from fedrecon.server.identity import Caller
from fedrecon.server.refusals import Refusal, Status
from fedrecon.server.secure_round import SecureFailed, SecureRound, SecureRoundFactory, SumReady
from fedrecon.server.store.records import Outcome, Participation, RoundSummary
from fedrecon.server.task import RoundSettings

log = logging.getLogger("fedrecon.server.coordinator")  # the round's story, in the coordinator's log

REMEMBERED_ROUNDS = 8  # closed rounds answered from memory; older ones are looked up in the store


# ----- effects: what the driver must do outside the lock -------------------------------------------------
@dataclass(frozen=True)
class OpenRound:
    """Write a new open round on ``base_version``; answer with `RoundMachine.round_opened` or
    `RoundMachine.open_failed`."""

    base_version: int
    target: int
    min_reports: int
    opened: float
    selection_ends: float
    deadline: float


@dataclass(frozen=True)
class CommitRound:
    """Apply the server step to ``aggregate`` (frozen: the round takes no more reports) and write the next
    version with the round's outcome in one transaction; answer with `commit_done`, `commit_unavailable` or
    `commit_refused`. ``first_attempt`` is False when a store outage made the commit due again."""

    round_id: int
    round_num: int
    base_version: int
    why: str  # "goal", "all answered", "deadline", "shutdown"
    aggregate: Aggregator
    summary: RoundSummary
    participations: tuple[Participation, ...]
    first_attempt: bool = True


@dataclass(frozen=True)
class FailRound:
    """Record a failed round (the model stays); a store that cannot take it now gets it later."""

    round_id: int
    round_num: int
    reason: str
    summary: RoundSummary
    participations: tuple[Participation, ...]
    base_version: int | None = None  # the version the round trained (the model stays at it)


Effect = OpenRound | CommitRound | FailRound


# ----- decisions: what the caller is answered ------------------------------------------------------------
@dataclass(frozen=True)
class Assigned:
    """The caller holds ``token`` in the open round ``round``."""

    round: OpenRoundState
    token: str


@dataclass(frozen=True)
class Busy:
    """A round is being opened or committed right now (an effect is out): ask again when it is done."""

    why: str


@dataclass(frozen=True)
class AskStore:
    """The report is for a round older than those remembered: the driver looks it up in the store (outside
    the lock) and hands the answer to `RoundMachine.answer_closed`."""

    round_id: int


@dataclass(frozen=True)
class Fold:
    """The report is admitted to the open round: the driver validates its tensors and calls `fold`."""

    round: OpenRoundState


@dataclass(frozen=True)
class ClosedRound:
    """A round that ended, as remembered to answer retried reports."""

    state: str  # "committed" or "failed"
    why: str  # "goal", "all answered", "deadline" or a failure reason
    accepted: Mapping[str, str]  # client key -> digest of its accepted update
    new_version: int | None = None  # the version a committed round wrote
    round_num: int | None = None


@dataclass
class OpenRoundState:
    """The round in flight (memory only: nothing about it is persisted until it closes)."""

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
    closing: str | None = None  # why the round closes; set once a commit was emitted (no more reports)
    committing: bool = False  # a CommitRound effect is out right now
    aggregating: bool = False  # the store has the round as "aggregating" (set by the driver)
    secure: SecureRound | None = None  # a secure round's stages, once its roster is fixed

    def answered(self) -> int:
        return len(self.accepted) + len(self.refused)

    @property
    def commit_due(self) -> bool:
        """The round closed for a commit that the store has not taken yet (it takes no more reports)."""
        return self.closing is not None


class RoundMachine:
    """The round rules of one task. Not thread-safe by design: the driver serialises calls (its lock) and
    performs what `take_effects` returns outside that lock."""

    def __init__(self, settings: RoundSettings, *, version: int, committed_rounds: int,
                 new_aggregate: Callable[[], Aggregator], may_open: Callable[[], str | None] | None = None,
                 counts: Counter[str] | None = None, secure_round: SecureRoundFactory | None = None) -> None:
        """``new_aggregate`` makes an empty aggregate for a round; ``may_open`` says why no further round may
        open (a spent privacy budget), or None; ``secure_round`` (a secure-aggregation task) builds a
        round's secure stages when its selection closes (``server.secure_round``)."""
        self.settings = settings
        self.version = version
        self.committed_rounds = committed_rounds
        self.round: OpenRoundState | None = None
        self.closed: OrderedDict[int, ClosedRound] = OrderedDict()
        self.counts: Counter[str] = counts if counts is not None else Counter()  # refusals etc. by reason
        self.reports_accepted = 0
        self.stopping = False
        self._new_aggregate = new_aggregate
        self._may_open = may_open
        self._secure_round = secure_round
        self._opening = False
        self._outbox: list[Effect] = []
        self._now: float | None = None  # the time of the event being handled (each event sets it)

    # ----- the outbox --------------------------------------------------------------------------------
    def take_effects(self) -> list[Effect]:
        """The effects emitted since the last call, in order; the caller now owns performing them."""
        effects, self._outbox = self._outbox, []
        return effects

    @property
    def busy(self) -> bool:
        """An open or a commit effect is out: check-ins wait for it rather than get a retry window."""
        return self._opening or (self.round is not None and self.round.committing)

    # ----- selection ---------------------------------------------------------------------------------
    def check_in(self, key: str, caller: Caller, now: float) -> Assigned | RetryLater | Busy:
        """Assign ``key`` to the open round (opening one if none is), or say when to come back."""
        s = self.settings
        self.advance(now)
        r = self.round
        # Draining: no one new; a client already selected in the round still taking reports (retrying its
        # check-in) is answered below, as at any time.
        if self.stopping and (r is None or r.commit_due or key not in r.assigned):
            return RetryLater(*s.retry_delay_s, reason="the coordinator is shutting down")
        if s.max_rounds is not None and self.committed_rounds >= s.max_rounds:
            return RetryLater(*s.retry_delay_s,
                              reason=f"training finished after {self.committed_rounds} rounds")
        if r is None:
            if self._opening:
                return Busy("a round is being opened")
            refusal = self._may_open() if self._may_open is not None else None
            if refusal is not None:
                return RetryLater(*s.retry_delay_s, reason=refusal)
            self._opening = True
            self._outbox.append(OpenRound(self.version, s.clients_per_round, s.minimum, now,
                                          now + s.selection_timeout_s,
                                          now + s.selection_timeout_s + s.reporting_timeout_s))
            return Busy("a round is being opened")
        if key in r.assigned:
            if key in r.accepted or key in r.refused:
                return RetryLater(*s.retry_delay_s, reason=f"already reported in round {r.round_num}")
            return Assigned(r, r.assigned[key])  # a retried check-in gets the same assignment
        if r.committing:
            return Busy(f"round {r.round_num} is committing")
        if not r.selecting:
            return RetryLater(*s.retry_delay_s, reason=f"round {r.round_num} has selected its clients")
        capped = self._assignment_cap_reached(r, caller)
        if capped is not None:
            self.counts["assignments_capped"] += 1
            return RetryLater(*s.retry_delay_s, reason=capped)
        r.assigned[key] = secrets.token_urlsafe(18)
        r.group_assignments[caller.group] += 1
        if len(r.assigned) >= s.selection_goal:
            r.selecting = False
            log.info("round %d: %d clients selected (the goal)", r.round_num, len(r.assigned))
        return Assigned(r, r.assigned[key])

    def _assignment_cap_reached(self, r: OpenRoundState, caller: Caller) -> str | None:
        """Why ``caller`` may take no further assignment in ``r`` (its group holds all it may), or None. With
        authentication a credential holds at most one assignment per device it was issued for, however many
        client ids it asserts; in the trusted-network mode the task may cap assignments per address."""
        cap: int | None
        if caller.authenticated:
            cap, who, how = caller.max_assignments, "this credential", CREDENTIAL_SHARE_HINT
        else:
            cap, who = self.settings.max_assignments_per_peer, "this network address"
            how = "the task caps assignments per address (max_assignments_per_peer)"
        if cap is None or r.group_assignments[caller.group] < cap:
            return None
        return f"{who} already holds {cap} assignment{'s' if cap != 1 else ''} in round {r.round_num} ({how})"

    def round_opened(self, effect: OpenRound, round_id: int, round_num: int) -> OpenRoundState:
        """The store wrote the round ``effect`` asked for."""
        self._opening = False
        self.round = OpenRoundState(round_id, round_num, effect.base_version, effect.opened,
                                    effect.selection_ends, effect.deadline, self._new_aggregate())
        return self.round

    def open_failed(self) -> None:
        """The store could not open the round: the next check-in asks again."""
        self._opening = False

    # ----- reporting ---------------------------------------------------------------------------------
    def admit(self, key: str, round_id: int, token: str, digest: str | None, now: float
              ) -> Fold | ReportOutcome | AskStore:
        """Whether a report may be folded into the open round, or how it is answered; raises `Refusal`.

        ``digest`` None: the early check made before any tensor bytes are read (it can only refuse)."""
        self.advance(now)
        r = self.round
        if r is None or r.round_id != round_id or r.commit_due:
            return self._to_closed_round(round_id, key, digest)
        if r.assigned.get(key) != token:
            self._refuse(r, key, Status.PERMISSION_DENIED, "not_assigned",
                         f"this client holds no assignment to round {r.round_num}", record=False)
        if self._secure_round is not None:
            self._refuse(r, key, Status.FAILED_PRECONDITION, "secure_round",
                         f"round {r.round_num} uses secure aggregation: the update travels masked through "
                         "the SecureAggregation call, never as a plain report", record=False)
        if key in r.accepted and digest is not None:
            if r.accepted[key] == digest:
                return ReportOutcome(False, f"this update was already accepted in round {r.round_num}")
            self._refuse(r, key, Status.ALREADY_EXISTS, "duplicate",
                         f"a different update from this client was already accepted in round "
                         f"{r.round_num}; one update per client per round", record=False)
        if key in r.refused:
            self._refuse(r, key, Status.FAILED_PRECONDITION, "already_refused",
                         f"this client's report in round {r.round_num} was refused ({r.refused[key]}); "
                         "a refused report is its answer for the round", record=False)
        return Fold(r)

    def refuse_report(self, r: OpenRoundState, key: str, status: Status, reason: str,
                      message: str) -> NoReturn:
        """Refuse an admitted report whose content is invalid; it is the client's answer for the round."""
        self._refuse(r, key, status, reason, message, record=True)

    def fold(self, r: OpenRoundState, key: str, digest: str, weight: float, metrics: Mapping[str, float],
             delta: Sequence[UpdateTensor], now: float) -> ReportOutcome:
        """Fold an admitted, validated report into ``r`` (weight cap, norm bound, reducer); the round closes
        when this report completes it (the commit is then in the outbox). ``delta`` as decoded: dense, or
        row-sparse tensors whose rows are added into the running sum."""
        folded = r.aggregate.fold_one(delta, weight)
        if folded.refused:
            self._refuse(r, key, Status.INVALID_ARGUMENT, *folded.refused[0], record=True)
        if folded.clipped:
            self.counts["clipped"] += 1
        r.accepted[key] = digest
        r.weights[key] = float(weight)
        r.metrics[key] = {k: float(v) for k, v in metrics.items()}
        seen = float(metrics.get("post_recon_examples", 0.0))
        r.loss_sum += float(metrics.get("loss", 0.0)) * seen
        r.examples += seen
        self.reports_accepted += 1
        if len(r.accepted) >= self.settings.clients_per_round:
            self._close(r, "goal", now)
        elif not r.selecting and r.answered() == len(r.assigned):
            self._close_when_all_answered(r, now)
        return ReportOutcome(True, f"accepted in round {r.round_num}")

    def _to_closed_round(self, round_id: int, key: str, digest: str | None,
                         stored: ClosedRound | None = None, *,
                         asked: bool = False) -> ReportOutcome | AskStore:
        """Answer a report for a round that is not taking reports: an idempotent retry, or a refusal.

        A retry of an update the round accepted is answered as such: ``accepted=False`` with "already in
        version N" once the round committed, ABORTED if it failed (the update is not in the model). Rounds
        older than those remembered are looked up in the store (`AskStore`; the digest of every accepted
        update is stored with its participation). A late report is ABORTED rather than DEADLINE_EXCEEDED,
        so that no client confuses the answer with its own call timing out (which it may retry)."""
        closed = stored or self.closed.get(round_id)
        r = self.round
        if closed is None:
            if r is not None and r.round_id == round_id:  # closed for its commit, which is not written yet
                if key in r.accepted and digest in (None, r.accepted[key]):
                    return ReportOutcome(False, f"this update was already accepted in round {r.round_num}; "
                                                "the round is committing")
                self._count_raise(Status.ABORTED, "round_over", f"round {r.round_num} has all its reports")
            if not asked and self._forgotten(round_id):
                return AskStore(round_id)
            current = f"round id {r.round_id} is open" if r else "no round is open"
            self._count_raise(Status.FAILED_PRECONDITION, "wrong_round",
                              f"round id {round_id} is not open ({current})")
        if closed.accepted.get(key) is not None and (digest is None or closed.accepted[key] == digest):
            if digest is None:  # the early check: a retry of an accepted update is answered once it arrives
                return ReportOutcome(False, "")
            if closed.state == "committed":
                return ReportOutcome(False, f"this update was already accepted in round id {round_id}: it "
                                            f"is in version {closed.new_version}")
            self._count_raise(Status.ABORTED, "round_failed",
                              f"round id {round_id} failed ({closed.why}); this update is not in the model")
        if closed.why == "deadline":
            self._count_raise(Status.ABORTED, "late",
                              f"round id {round_id} passed its reporting deadline ({closed.state})")
        self._count_raise(Status.ABORTED, "round_over",
                          f"round id {round_id} is over ({closed.state}: {closed.why})")

    def answer_closed(self, round_id: int, key: str, digest: str | None, stored: ClosedRound | None
                      ) -> ReportOutcome:
        """Answer a report for a round the store was asked about (`AskStore`): ``stored`` is the finished
        round with ``key``'s accepted digest (if any), or None if the task has no such finished round."""
        answer = self._to_closed_round(round_id, key, digest, stored, asked=True)
        assert isinstance(answer, ReportOutcome)  # asked=True never asks again
        return answer

    def _forgotten(self, round_id: int) -> bool:
        """Whether ``round_id`` may be a round of this task that closed before the rounds held in memory (an
        earlier process's, or one pushed out of the memory of recent rounds): older than all of them.
        Round ids only grow, so a newer id that is not in memory is no round of this task's past."""
        known = [*self.closed, *([self.round.round_id] if self.round is not None else [])]
        return round_id >= 1 and (not known or round_id < min(known))

    def _refuse(self, r: OpenRoundState, key: str, status: Status, reason: str, message: str, *,
                record: bool) -> NoReturn:
        if record and key in r.assigned and key not in r.accepted:
            r.refused[key] = reason
            if not r.selecting and not r.commit_due and r.answered() == len(r.assigned):
                self._close_when_all_answered(r, self._now)
        self._count_raise(status, reason, message)

    def _count_raise(self, status: Status, reason: str, message: str) -> NoReturn:
        self.counts[reason] += 1
        raise Refusal(status, reason, message)

    # ----- time --------------------------------------------------------------------------------------
    def advance(self, now: float) -> None:
        """Apply the round's clock: close the selection window, commit or fail at the deadline, and make a
        commit that the store could not take due again."""
        self._now = now
        r = self.round
        if r is None:
            return
        if r.commit_due:
            if not r.committing:  # the store was unavailable at commit time: try again
                self._emit_commit(r, now, first_attempt=False)
            return
        s = self.settings
        if (r.selecting and now >= r.selection_ends
                and self._end_selection(r, now, f"the {s.selection_timeout_s:g} s selection window closed",
                                        f"within {s.selection_timeout_s:g} s")):
            return
        if self._secure_round is not None:
            self._advance_secure(r, now)
            return
        if now >= r.deadline:
            if len(r.accepted) >= s.minimum:
                self._close(r, "deadline", now)
            else:
                self._fail(r, f"only {len(r.accepted)} reports by the deadline; the minimum is {s.minimum}",
                           now, why="deadline")

    def _end_selection(self, r: OpenRoundState, now: float, when: str, within: str) -> bool:
        """Take no further clients into ``r``; True if that settled it (too few to reach the minimum: failed;
        every one of them already answered: closed)."""
        r.selecting = False
        log.info("round %d: %d clients selected when %s", r.round_num, len(r.assigned), when)
        if len(r.assigned) < self.settings.minimum:
            self._fail(r, f"only {len(r.assigned)} clients checked in {within}; the minimum is "
                          f"{self.settings.minimum}", now)
            return True
        if r.answered() == len(r.assigned):
            self._close_when_all_answered(r, now)
            return True
        return False

    def _close_when_all_answered(self, r: OpenRoundState, now: float | None) -> None:
        if len(r.accepted) >= self.settings.minimum:
            self._close(r, "all answered", now)
        else:
            self._fail(r, f"every assigned client answered but only {len(r.accepted)} reports were accepted; "
                          f"the minimum is {self.settings.minimum}", now)

    # ----- closing -----------------------------------------------------------------------------------
    def summary(self, r: OpenRoundState, now: float | None) -> tuple[RoundSummary, tuple[Participation, ...]]:
        """The round's figures and every assigned client's outcome, as the store records them."""
        participations = []
        for key in r.assigned:
            if key in r.accepted:  # with its digest: a retry after a restart is recognised
                participations.append(Participation(key, Outcome.ACCEPTED, r.weights[key], r.metrics[key],
                                                    digest=r.accepted[key]))
            elif key in r.refused:
                participations.append(Participation(key, Outcome.REFUSED, 0.0, {}, r.refused[key]))
            else:
                participations.append(Participation(key, Outcome.DROPPED, 0.0, {}, "no report"))
        metrics = {"train_loss": r.loss_sum / r.examples if r.examples else float("nan"),
                   "train_examples": r.examples,
                   **r.aggregate.report.metrics(),
                   **({"seconds": now - r.opened} if now is not None else {})}
        summary = RoundSummary(num_selected=len(r.assigned), num_reported=r.answered(),
                               num_accepted=len(r.accepted), num_refused=len(r.refused),
                               total_weight=r.aggregate.total_weight,  # as folded: capped (or 1 each)
                               metrics={k: v for k, v in metrics.items() if math.isfinite(v)},
                               stages=r.aggregate.report.stages)
        return summary, tuple(participations)

    def _close(self, r: OpenRoundState, why: str, now: float | None) -> None:
        r.closing = why
        r.selecting = False
        self._emit_commit(r, now, first_attempt=True)

    def _emit_commit(self, r: OpenRoundState, now: float | None, *, first_attempt: bool) -> None:
        assert r.closing is not None
        summary, participations = self.summary(r, now)
        r.committing = True
        self._outbox.append(CommitRound(r.round_id, r.round_num, r.base_version, r.closing, r.aggregate,
                                        summary, participations, first_attempt))

    def commit_done(self, round_id: int, new_version: int) -> ClosedRound:
        """The store wrote ``new_version`` from the round's aggregate."""
        r = self._closing(round_id)
        self.version = new_version
        self.committed_rounds += 1
        return self._forget(r, ClosedRound("committed", r.closing or "", dict(r.accepted), new_version,
                                           r.round_num))

    def commit_unavailable(self, round_id: int) -> None:
        """The store did not answer: the commit is due again at the next `advance`."""
        self._closing(round_id).committing = False

    def commit_refused(self, round_id: int, reason: str, now: float | None) -> None:
        """The commit cannot happen (the new model is not finite, or the store refused the transition):
        the round fails and the model stays."""
        r = self._closing(round_id)
        r.committing = False
        self._fail(r, reason, now)

    def _closing(self, round_id: int) -> OpenRoundState:
        r = self.round
        if r is None or r.round_id != round_id or not r.committing:
            raise RuntimeError(f"round id {round_id} has no commit in flight")
        return r

    def _fail(self, r: OpenRoundState, reason: str, now: float | None, *, why: str | None = None) -> None:
        summary, participations = self.summary(r, now)
        self._outbox.append(FailRound(r.round_id, r.round_num, reason, summary, participations,
                                      r.base_version))
        self._forget(r, ClosedRound("failed", why or reason, {}, round_num=r.round_num))

    def _forget(self, r: OpenRoundState, closed: ClosedRound) -> ClosedRound:
        self.closed[r.round_id] = closed
        while len(self.closed) > REMEMBERED_ROUNDS:
            self.closed.popitem(last=False)
        self.round = None
        return closed

    # ----- secure aggregation ------------------------------------------------------------------------
    def secure_step(self, key: str, round_id: int, token: str, message: ClientMessage | None, digest: str,
                    now: float) -> tuple[SecurePhase, Instruction]:
        """One ``SecureAggregation`` call: take ``key``'s message (None: a poll) for the round's current
        secure stage and say what the client must do next; raises ``Refusal`` (counted), changing nothing."""
        try:
            self.advance(now)
            r = self.round
            if r is None or r.round_id != round_id or r.commit_due:
                return SecurePhase.CLOSED, self._secure_after_close(r, key, round_id, message)
            if r.assigned.get(key) != token:
                raise Refusal(Status.PERMISSION_DENIED, "not_assigned",
                              f"this client holds no assignment to round {r.round_num}")
            if self._secure_round is None:
                raise Refusal(Status.FAILED_PRECONDITION, "not_secure",
                              f"round {r.round_num} does not use secure aggregation: report with "
                              "ReportUpdate")
            if r.secure is None:
                if message is not None:
                    raise Refusal(Status.FAILED_PRECONDITION, "secagg_wrong_stage",
                                  f"round {r.round_num} is still selecting its clients; no "
                                  "secure-aggregation message is taken before its roster is fixed")
                return SecurePhase.SELECTING, SecureWait(f"round {r.round_num} is selecting its clients")
            if message is not None and r.secure.receive(key, message, digest):
                self.advance(now)  # the message may complete its stage, or the whole round
                if self.round is not r or r.commit_due:
                    return SecurePhase.CLOSED, self._secure_after_close(self.round, key, round_id, None)
            return r.secure.phase, r.secure.instruction(key)
        except Refusal as refusal:
            self.counts[refusal.reason] += 1
            raise

    def _secure_after_close(self, r: OpenRoundState | None, key: str, round_id: int,
                            message: ClientMessage | None) -> Instruction:
        """The answer for a secure round that is committing or over."""
        if message is not None:
            raise Refusal(Status.ABORTED, "round_over", f"round id {round_id} has closed its secure stages")
        if r is not None and r.round_id == round_id:  # unmasked, its commit under way
            return SecureWait(f"round {r.round_num} is committing")
        closed = self.closed.get(round_id)
        if closed is None:
            raise Refusal(Status.FAILED_PRECONDITION, "wrong_round", f"round id {round_id} is not open, nor "
                                                                      "one of the rounds that closed last")
        state = RoundView.COMMITTED if closed.state == "committed" else RoundView.FAILED
        return SecureDone(key in closed.accepted, state, closed.new_version, closed.why)

    def _advance_secure(self, r: OpenRoundState, now: float) -> None:
        """A secure round's clock: once selection has closed, build its stages, close those that are
        complete or due, and commit the unmasked sum or fail the round."""
        assert self._secure_round is not None
        if r.selecting:
            return
        if r.secure is None:
            made = self._secure_round(r.round_id, tuple(r.assigned), now, r.deadline)
            if isinstance(made, str):
                self._fail(r, made, now)
                return
            r.secure = made
            log.info("round %d: secure aggregation over %d clients (%d neighbours each, threshold %d)",
                     r.round_num, len(r.assigned), made.parameters.parameters.degree,
                     made.parameters.parameters.threshold)
        outcome = r.secure.advance(now)
        if isinstance(outcome, SecureFailed):
            self._fail(r, outcome.reason, now)
        elif isinstance(outcome, SumReady):
            r.aggregate.fold_secure_sum(outcome.sums, outcome.total_weight, len(outcome.survivors))
            for key in outcome.survivors:  # individual weights and metrics are not known: only the sum is
                r.accepted[key] = "secure_sum"
                r.weights[key] = 0.0
                r.metrics[key] = {}
            self.reports_accepted += len(outcome.survivors)
            if len(r.accepted) >= self.settings.minimum:
                self._close(r, "unmasked", now)
            else:
                self._fail(r, f"only {len(r.accepted)} clients are in the secure sum; the minimum is "
                              f"{self.settings.minimum}", now)

    # ----- shutdown ----------------------------------------------------------------------------------
    def drain(self, now: float) -> bool:
        """The first step of a graceful shutdown: assign no one any more (no new client, no new round), but
        let the open round run by its own rules, so the clients already training for it can still report
        and it commits at its goal, when all have answered, or at its deadline. A round still selecting
        takes the clients it has: with fewer than its minimum it fails now, since none can join.

        True while the open round is still taking reports (the driver waits for it, up to its drain time,
        then calls `stop`); False when there is none to wait for."""
        self.stopping = True
        r = self.round
        if r is None or r.commit_due:
            return False
        if r.selecting and self._end_selection(r, now, "the coordinator began shutting down",
                                               "before the coordinator began shutting down"):
            return False
        self.advance(now)
        return self.round is r and not r.commit_due

    def stop(self, now: float) -> str | None:
        """Stop assigning and close the open round: commit it if it has its minimum of reports (or its
        commit was due), else fail it. Returns None when no round is open, else what happened (the commit,
        if any, is in the outbox or already in flight)."""
        self.stopping = True
        r = self.round
        if r is None:
            return None
        if r.commit_due:
            if not r.committing:
                self._emit_commit(r, now, first_attempt=False)
            return "commit"
        if len(r.accepted) < self.settings.minimum:
            self._fail(r, "the coordinator shut down before the round had enough reports", now)
            return "failed"
        self._close(r, "shutdown", now)
        return "commit"

    # ----- views -------------------------------------------------------------------------------------
    def outcome(self, round_id: int) -> RoundOutcome | None:
        """The open round's outcome so far (None if ``round_id`` is not the open round)."""
        r = self.round
        if r is None or r.round_id != round_id:
            return None
        return RoundOutcome(round_id, r.round_num, RoundView.OPEN, num_accepted=len(r.accepted))

    def progress(self) -> tuple[int, int, int, int, int, float] | None:
        """(round id, selected, answered, accepted, refused, total weight) of a round taking reports."""
        r = self.round
        if r is None or r.commit_due:
            return None
        return (r.round_id, len(r.assigned), r.answered(), len(r.accepted), len(r.refused),
                r.aggregate.total_weight)
