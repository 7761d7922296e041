"""What a running coordinator looks like from outside: one frozen snapshot, and the events of its rounds.

Why a module of its own: metrics, logs, ``fedrecon status`` and the web dashboard all show the same live
figures, and each of them reading the coordinator's internals would make as many sources of truth. They
read `LiveView` instead, which ``Coordinator.view()`` takes under the coordinator's lock in one go (a
consistent picture, cheap: counts only, no store read), and they hear of rounds opening, committing or
failing through `RoundEvent`, delivered to the listeners given to ``Coordinator.add_round_listener``
outside that lock. Plain values only: importable without gRPC, SQLAlchemy or TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from fedrecon.server.store.records import Outcome, Participation, RoundSummary


class RoundPhase(StrEnum):
    """Where the live round is (after Bonawitz et al.): taking check-ins, waiting for reports, or closed
    and being written as the next version."""

    SELECTING = "selecting"
    REPORTING = "reporting"
    COMMITTING = "committing"


@dataclass(frozen=True)
class LiveRound:
    """The round in flight, as the coordinator holds it in memory (nothing of it is in the store yet but
    its counts, written every second or so)."""

    round_id: int
    round_num: int
    base_version: int
    phase: RoundPhase
    selected: int  # clients assigned so far
    reporting: int  # of them, those that reported (accepted + refused)
    accepted: int
    refused: int
    goal: int  # accepted reports at which the round commits (clients_per_round)
    selection_goal: int  # assignments at which selection stops (the over-selected goal)
    min_reports: int  # fewest accepted reports that still commit at the deadline
    total_weight: float
    opened_at: float  # Unix time
    selection_ends_at: float
    deadline_at: float
    seconds_left: float  # to the reporting deadline (0 once past)


@dataclass(frozen=True)
class PrivacySpent:
    """A DP task's guarantee so far: ε at δ after the committed rounds, against the budget (if any)."""

    epsilon: float
    delta: float
    rounds: int
    budget: float | None


@dataclass(frozen=True)
class LiveView:
    """One coordinator's task at one instant (``Coordinator.view()``)."""

    task: str
    replica_id: str
    model_version: int
    leading: bool
    standby_reason: str  # empty while leading
    live_round: LiveRound | None
    refusals: Mapping[str, int]  # every refusal (and notable event) since start, by reason; read-only
    reports_accepted: int  # accepted reports since this process started
    rounds_committed: int  # the task's committed rounds (the store's, when the view was taken)
    privacy: PrivacySpent | None
    taken_at: float  # Unix time

    def __post_init__(self) -> None:
        object.__setattr__(self, "refusals", MappingProxyType(dict(self.refusals)))


class RoundEventKind(StrEnum):
    OPENED = "round_opened"
    COMMITTED = "round_committed"
    FAILED = "round_failed"


@dataclass(frozen=True)
class RoundEvent:
    """A round opened, committed or failed. For a closed round ``summary`` holds its figures and
    ``participations`` every assigned client's outcome under its pseudonymous key (never a raw id)."""

    kind: RoundEventKind
    task: str
    round_id: int
    round_num: int
    base_version: int
    at: float  # Unix time of the event
    new_version: int | None = None  # a committed round's version
    why: str | None = None  # why it closed: "goal", "all answered", "deadline", "shutdown"
    reason: str | None = None  # why a round failed
    summary: RoundSummary | None = None
    participations: tuple[Participation, ...] = field(default=())
    duration_s: float | None = None  # opened to closed
    commit_s: float | None = None  # the server step and the store write of a commit
    # An opened round's plan (the figures its log line gives):
    selection_goal: int | None = None
    goal: int | None = None
    min_reports: int | None = None
    selection_timeout_s: float | None = None
    deadline_at: float | None = None

    def figures(self) -> dict[str, object]:
        """The event's figures as JSON-ready values (what a structured log line carries): counts, versions,
        durations and metrics; never a client key, a token or a raw client id."""
        out: dict[str, object] = {"task": self.task, "round_id": self.round_id, "round_num": self.round_num,
                                  "base_version": self.base_version}
        optional = {"new_version": self.new_version, "why": self.why, "reason": self.reason,
                    "duration_s": self.duration_s, "commit_s": self.commit_s,
                    "selection_goal": self.selection_goal, "goal": self.goal, "min_reports": self.min_reports,
                    "selection_timeout_s": self.selection_timeout_s, "deadline_at": self.deadline_at}
        out.update({k: v for k, v in optional.items() if v is not None})
        if self.summary is not None:
            s = self.summary
            out.update(selected=s.num_selected, reported=s.num_reported, accepted=s.num_accepted,
                       refused=s.num_refused, total_weight=s.total_weight, metrics=dict(s.metrics))
        if self.participations:
            refused: dict[str, int] = {}
            for p in self.participations:
                if p.outcome == Outcome.REFUSED:
                    refused[p.reason or "unknown"] = refused.get(p.reason or "unknown", 0) + 1
            out["dropped"] = sum(1 for p in self.participations if p.outcome == Outcome.DROPPED)
            if refused:
                out["refused_by_reason"] = refused
        return out

    def log_extra(self) -> dict[str, object]:
        """``extra=`` for the log call that tells this event: the JSON log format (``event_log``) writes
        the event's name and figures; the text format ignores them (its message says it all)."""
        return {"event": self.kind.value, "figures": self.figures()}


RoundListener = Callable[[RoundEvent], None]
"""Called outside the coordinator's lock, on the thread that performed the round's store write; it must be
quick (a counter, a log line) and must not call back into the round's RPCs. An exception it raises is
logged and otherwise ignored: observing never breaks a round."""
