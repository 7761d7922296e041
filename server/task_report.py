"""A task's history as the store holds it, as plain JSON-ready values: what ``fedrecon status --json``
prints and what the dashboard's ``/api/state`` serves.

One implementation for both, so the command line and the web page can never disagree about what a round's
counts, a version's evaluation or the privacy spent are. Everything here comes from the store (what a
coordinator committed, and the open round's counts it records every second or so); the coordinator's
in-memory view of the live round is the dashboard's business (``dashboard``), not this module's.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from fedrecon.server.store import RoundRecord, SqlStore

ROUND_STATES = ("open", "aggregating", "committed", "failed")


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity: a value that is not meaningful is null."""
    return value if math.isfinite(value) else None


def open_round_report(r: RoundRecord, now: datetime) -> dict[str, Any]:
    """A round still in flight as the store has it: its counts as the coordinator last recorded them
    (every second or so while they change) and the time left to its deadline."""
    return {"round_num": r.round_num, "round_id": r.round_id, "state": str(r.state),
            "base_version": r.base_version, "target": r.target, "min_reports": r.min_reports,
            "selected": r.num_selected, "reported": r.num_reported, "accepted": r.num_accepted,
            "refused": r.num_refused, "total_weight": r.total_weight, "opened_at": r.opened_at.isoformat(),
            "deadline": r.deadline.isoformat(), "seconds_left": round((r.deadline - now).total_seconds(), 1)}


def round_report(r: RoundRecord) -> dict[str, Any]:
    """One round of the timeline: settings, counts, outcome, metrics and the aggregation stages that ran."""
    return {
        "round_num": r.round_num, "round_id": r.round_id, "state": str(r.state),
        "base_version": r.base_version, "new_version": r.new_version, "target": r.target,
        "min_reports": r.min_reports, "selected": r.num_selected, "reported": r.num_reported,
        "accepted": r.num_accepted, "refused": r.num_refused, "total_weight": r.total_weight,
        "opened_at": r.opened_at.isoformat(), "closed_at": r.closed_at.isoformat() if r.closed_at else None,
        "failure_reason": r.failure_reason, "metrics": r.metrics,
        "stages": list(r.stages) if r.stages is not None else None}


def privacy_report(spec: dict[str, Any], rounds: Sequence[RoundRecord]) -> dict[str, Any] | None:
    """A DP task's guarantee so far: ε at δ after its committed rounds, as the coordinator stored it with
    each round (no accountant runs here), and the budget; None for a task without noise."""
    privacy = spec.get("privacy")
    if privacy is None:
        return None
    committed = [r for r in rounds if str(r.state) == "committed"]
    spent = committed[-1].metrics.get("epsilon", 0.0) if committed else 0.0
    return {"noise_multiplier": (spec.get("aggregation") or {}).get("noise_multiplier"),
            "clip": (spec.get("aggregation") or {}).get("max_update_norm"), **privacy,
            "rounds_accounted": len(committed), "epsilon": spent}


def task_report(store: SqlStore, name: str, *, recent_rounds: int) -> dict[str, Any]:
    """Task ``name``: its spec, versions, round counts by state, the open round, privacy spent, the
    ``recent_rounds`` latest rounds (0: none) and the evaluation of each version. Raises ``UnknownTask``."""
    task = store.get_task(name)
    versions = store.list_versions(name)
    all_rounds = store.list_rounds(name)
    states = Counter(str(r.state) for r in all_rounds)
    unfinished = [r for r in all_rounds if not r.state.is_finished]
    recent = all_rounds[-recent_rounds:] if recent_rounds > 0 else []
    return {
        "name": task.name,
        "created_at": task.created_at.isoformat(),
        "spec": task.spec,
        "latest_version": versions[-1].version if versions else None,
        "versions": [{"version": v.version, "parent": v.parent, "round_id": v.round_id,
                      "created_at": v.created_at.isoformat()} for v in versions],
        "rounds": {s: states.get(s, 0) for s in ROUND_STATES},
        "open_round": open_round_report(unfinished[-1], datetime.now(UTC)) if unfinished else None,
        "privacy": privacy_report(task.spec, all_rounds),
        "recent_rounds": [round_report(r) for r in recent],
        # Pooled over the version's evaluations; null where not meaningful (no examples, or sums stored
        # before the counts were bounded that overflow the float range).
        "evaluations": [{"version": e.version, "clients": e.num_clients, "examples": finite_or_none(
            e.num_examples), **{k: finite_or_none(v) for k, v in e.metrics().items()}}
                        for e in store.evaluation_summaries(name)],
    }
