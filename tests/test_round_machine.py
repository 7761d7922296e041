"""The round state machine alone (no store, no lock, no clock), and the driver keeping store writes out of
its lock.

The machine's numbers are checked by hand: a 6x2 item table, two clients per round, deltas of constants.
The driver test blocks the store inside a commit and shows that downloads, round queries, late reports and
evaluations are answered meanwhile (before the state machine, one lock was held across the store write).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedrecon.core.aggregation import AggregationConfig, Aggregator
from fedrecon.core.algorithm import FedRecon
from fedrecon.core.config import FedReconConfig
from fedrecon.core.model_spec import model_from_config
from fedrecon.protocol import Assignment, ReportOutcome, RetryLater, RoundState
from fedrecon.server.clock import ManualClock
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.identity import Caller
from fedrecon.server.refusals import Refusal, Status
from fedrecon.server.round_machine import (
    AskStore,
    Assigned,
    Busy,
    CommitRound,
    FailRound,
    Fold,
    OpenRound,
    RoundMachine,
)
from fedrecon.server.store import Outcome, SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec

MODEL = {"kind": "matrix_factorization", "num_items": 6, "num_factors": 2}
SETTINGS = RoundSettings(clients_per_round=2, over_selection=1.5, min_reports=1, selection_timeout_s=10.0,
                         reporting_timeout_s=20.0, retry_delay_s=(1.0, 3.0))


def _aggregate() -> Aggregator:
    model = model_from_config(MODEL)
    algorithm = FedRecon(model, FedReconConfig(), aggregation=AggregationConfig())
    return algorithm.new_aggregate(max_clients=2, batch_size=5)


def _machine(settings: RoundSettings = SETTINGS, **kwargs: object) -> RoundMachine:
    return RoundMachine(settings, version=0, committed_rounds=0, new_aggregate=_aggregate,
                        **kwargs)  # type: ignore[arg-type]


def _open(m: RoundMachine, now: float = 0.0, round_id: int = 1) -> None:
    assert isinstance(m.check_in("first", Caller.trusted("first"), now), Busy)
    (effect,) = m.take_effects()
    assert isinstance(effect, OpenRound) and effect.base_version == m.version
    m.round_opened(effect, round_id, round_id)


def _assign(m: RoundMachine, key: str, now: float = 0.0) -> str:
    decision = m.check_in(key, Caller.trusted(key), now)
    assert isinstance(decision, Assigned), decision
    return decision.token


def _report(m: RoundMachine, key: str, token: str, value: float, now: float = 1.0) -> ReportOutcome:
    digest = f"{key}-{value}"
    admission = m.admit(key, 1, token, digest, now)
    assert isinstance(admission, Fold), admission
    return m.fold(admission.round, key, digest, 1.0, {"loss": 1.0, "post_recon_examples": 1.0},
                  [np.full((6, 2), value, np.float32)], now)


def _refused(fn, status: Status, reason: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(Refusal) as caught:
        fn()
    assert (caught.value.status, caught.value.reason) == (status, reason), caught.value


def test_the_first_check_in_asks_for_a_round_and_others_wait_for_it() -> None:
    m = _machine()
    assert isinstance(m.check_in("a", Caller.trusted("a"), 0.0), Busy)
    (effect,) = m.take_effects()
    assert isinstance(effect, OpenRound)
    assert (effect.target, effect.min_reports, effect.selection_ends, effect.deadline) == (2, 1, 10.0, 30.0)
    assert isinstance(m.check_in("b", Caller.trusted("b"), 0.5), Busy) and m.take_effects() == []  # one open
    m.round_opened(effect, round_id=7, round_num=3)
    token = _assign(m, "a", 1.0)
    assert _assign(m, "a", 1.5) == token  # a retried check-in gets the same assignment
    _assign(m, "b")
    _assign(m, "c")  # ceil(2 * 1.5) = 3 selected: the goal
    later = m.check_in("d", Caller.trusted("d"), 2.0)
    assert isinstance(later, RetryLater) and "has selected its clients" in later.reason


def test_the_store_failing_to_open_lets_the_next_check_in_ask_again() -> None:
    m = _machine()
    m.check_in("a", Caller.trusted("a"), 0.0)
    m.take_effects()
    m.open_failed()
    assert isinstance(m.check_in("a", Caller.trusted("a"), 1.0), Busy)
    assert [type(e) for e in m.take_effects()] == [OpenRound]


def test_goal_emits_one_commit_and_the_round_takes_no_more_reports_until_it_is_written() -> None:
    m = _machine()
    _open(m)
    tokens = {k: _assign(m, k) for k in ("a", "b", "c")}
    assert _report(m, "a", tokens["a"], 1.0).accepted
    assert m.take_effects() == []
    assert _report(m, "b", tokens["b"], 3.0).accepted  # the goal: 2 reports
    (commit,) = m.take_effects()
    assert isinstance(commit, CommitRound) and commit.why == "goal" and commit.first_attempt
    assert commit.summary.num_accepted == 2 and commit.summary.num_selected == 3
    assert sorted(p.outcome for p in commit.participations) == sorted(
        [Outcome.ACCEPTED, Outcome.ACCEPTED, Outcome.DROPPED])
    assert commit.aggregate.total_weight == 2.0
    np.testing.assert_allclose(commit.aggregate.mean()[0], np.full((6, 2), 2.0))  # (1 + 3) / 2
    # While the commit is out: a retry of an accepted update is recognised, anyone else is told it is over,
    # and a check-in waits rather than joining the closing round.
    retry = m.admit("a", 1, tokens["a"], "a-1.0", 2.0)
    assert isinstance(retry, ReportOutcome) and not retry.accepted and "committing" in retry.message
    _refused(lambda: m.admit("c", 1, tokens["c"], "c-5.0", 2.0), Status.ABORTED, "round_over")
    assert isinstance(m.check_in("z", Caller.trusted("z"), 2.0), Busy)
    assert m.take_effects() == []  # ... and nothing was emitted twice
    # The store is down: the commit is due again at the next event, marked as a repeat.
    m.commit_unavailable(1)
    m.advance(3.0)
    (again,) = m.take_effects()
    assert isinstance(again, CommitRound) and not again.first_attempt
    closed = m.commit_done(1, new_version=1)
    assert (closed.state, closed.new_version, m.version, m.round) == ("committed", 1, 1, None)
    answer = m.admit("a", 1, tokens["a"], "a-1.0", 4.0)
    assert isinstance(answer, ReportOutcome) and "in version 1" in answer.message
    _refused(lambda: m.admit("a", 1, tokens["a"], "a-other", 4.0), Status.ABORTED, "round_over")


def test_deadline_commits_with_the_minimum_and_fails_below_it() -> None:
    m = _machine(RoundSettings(clients_per_round=3, over_selection=1.0, min_reports=2,
                               selection_timeout_s=10.0, reporting_timeout_s=20.0))
    _open(m)
    tokens = {k: _assign(m, k) for k in ("a", "b", "c")}
    _report(m, "a", tokens["a"], 1.0)
    m.advance(29.9)
    assert m.take_effects() == []
    m.advance(30.0)  # the deadline with 1 < 2 reports
    (fail,) = m.take_effects()
    assert isinstance(fail, FailRound) and "only 1 reports by the deadline" in fail.reason
    _refused(lambda: m.admit("b", 1, tokens["b"], "b-1", 31.0), Status.ABORTED, "late")

    _open(m, now=40.0, round_id=2)
    tokens = {k: _assign(m, k, 40.0) for k in ("a", "b", "c")}
    digest = "a-2"
    admission = m.admit("a", 2, tokens["a"], digest, 41.0)
    assert isinstance(admission, Fold)
    m.fold(admission.round, "a", digest, 1.0, {}, [np.ones((6, 2), np.float32)], 41.0)
    admission = m.admit("b", 2, tokens["b"], "b-2", 42.0)
    assert isinstance(admission, Fold)
    m.fold(admission.round, "b", "b-2", 1.0, {}, [np.ones((6, 2), np.float32)], 42.0)
    m.advance(70.0)
    (commit,) = m.take_effects()
    assert isinstance(commit, CommitRound) and commit.why == "deadline" and commit.summary.num_accepted == 2


def test_too_few_check_ins_fail_when_the_selection_window_closes() -> None:
    m = _machine(RoundSettings(clients_per_round=3, over_selection=1.0, min_reports=2,
                               selection_timeout_s=10.0, reporting_timeout_s=20.0))
    _open(m)
    _assign(m, "a")
    m.advance(10.0)
    (fail,) = m.take_effects()
    assert isinstance(fail, FailRound) and "only 1 clients checked in within 10 s" in fail.reason


def test_an_invalid_report_is_the_clients_answer_and_may_close_the_round() -> None:
    m = _machine(RoundSettings(clients_per_round=2, over_selection=1.0, min_reports=1,
                               selection_timeout_s=10.0, reporting_timeout_s=20.0))
    _open(m)
    tokens = {k: _assign(m, k) for k in ("a", "b")}
    _report(m, "a", tokens["a"], 1.0)
    admission = m.admit("b", 1, tokens["b"], "b-bad", 1.0)
    assert isinstance(admission, Fold)
    _refused(lambda: m.refuse_report(admission.round, "b", Status.INVALID_ARGUMENT, "bad_weight", "no"),
             Status.INVALID_ARGUMENT, "bad_weight")
    (commit,) = m.take_effects()  # every assigned client answered, 1 >= min_reports
    assert isinstance(commit, CommitRound) and commit.why == "all answered"
    refused = [p for p in commit.participations if p.outcome == Outcome.REFUSED]
    assert [p.reason for p in refused] == ["bad_weight"]
    assert m.counts["bad_weight"] == 1


def test_a_round_older_than_those_remembered_is_asked_of_the_store() -> None:
    m = _machine()
    _open(m, round_id=50)
    assert m.admit("a", 12, "t", "d", 1.0) == AskStore(12)
    _refused(lambda: m.admit("a", 99, "t", "d", 1.0), Status.FAILED_PRECONDITION, "wrong_round")


def test_a_spent_budget_keeps_rounds_from_opening() -> None:
    m = _machine(may_open=lambda: "the privacy budget is spent")
    answer = m.check_in("a", Caller.trusted("a"), 0.0)
    assert isinstance(answer, RetryLater) and answer.reason == "the privacy budget is spent"
    assert m.take_effects() == []


def test_stop_commits_a_round_with_its_minimum_and_fails_one_without() -> None:
    m = _machine()
    _open(m)
    token = _assign(m, "a")
    assert m.stop(1.0) == "failed" and isinstance(m.take_effects()[0], FailRound)
    m = _machine()
    _open(m)
    _report(m, "a", _assign(m, "a"), 1.0)
    assert m.stop(2.0) == "commit"
    (commit,) = m.take_effects()
    assert isinstance(commit, CommitRound) and commit.why == "shutdown"
    stopped = m.check_in("b", Caller.trusted("b"), 3.0)
    assert isinstance(stopped, Busy | RetryLater)
    del token


def test_drain_assigns_no_one_but_lets_the_selected_clients_finish_the_round() -> None:
    """A graceful shutdown's first step: the round still selecting keeps the clients it has, and commits
    when they have all answered, by its own rules; nobody new is assigned and no round opens."""
    settings = RoundSettings(clients_per_round=4, over_selection=1.0, min_reports=2, selection_timeout_s=10.0,
                             reporting_timeout_s=20.0, retry_delay_s=(1.0, 3.0))
    m = _machine(settings)
    _open(m)
    tokens = {k: _assign(m, k) for k in ("a", "b", "c")}  # 3 of the 4 wanted: still selecting
    _report(m, "a", tokens["a"], 1.0)
    assert m.drain(2.0) is True and m.take_effects() == []  # b and c are still training
    late = m.check_in("d", Caller.trusted("d"), 2.5)
    assert isinstance(late, RetryLater) and "shutting down" in late.reason
    assert m.check_in("b", Caller.trusted("b"), 2.5) == Assigned(m.round, tokens["b"])  # a retry: same
    _report(m, "b", tokens["b"], 3.0, now=3.0)
    assert m.take_effects() == []  # c may still report: the goal (4) is out of reach, the minimum is met
    admission = m.admit("c", 1, tokens["c"], "c-bad", 4.0)
    assert isinstance(admission, Fold)
    _refused(lambda: m.refuse_report(admission.round, "c", Status.INVALID_ARGUMENT, "bad_weight", "no"),
             Status.INVALID_ARGUMENT, "bad_weight")
    (commit,) = m.take_effects()
    assert isinstance(commit, CommitRound) and commit.why == "all answered"
    assert commit.summary.num_accepted == 2 and commit.summary.num_selected == 3
    np.testing.assert_allclose(commit.aggregate.mean()[0], np.full((6, 2), 2.0))
    assert m.drain(5.0) is False  # the commit is out: nothing more to wait for


def test_drain_fails_a_round_that_cannot_reach_its_minimum_and_waits_for_none() -> None:
    settings = RoundSettings(clients_per_round=3, over_selection=1.0, min_reports=2, selection_timeout_s=10.0,
                             reporting_timeout_s=20.0)
    m = _machine(settings)
    _open(m)
    _assign(m, "a")
    assert m.drain(1.0) is False
    (fail,) = m.take_effects()
    assert isinstance(fail, FailRound)
    assert fail.reason == ("only 1 clients checked in before the coordinator began shutting down; "
                           "the minimum is 2")
    assert _machine().drain(0.0) is False  # no round open: nothing to wait for
    m = _machine(settings)
    _open(m)
    tokens = {k: _assign(m, k) for k in ("a", "b", "c")}  # selection over (the goal): the deadline applies
    _report(m, "a", tokens["a"], 1.0)
    assert m.drain(2.0) is True
    m.advance(30.0)  # the deadline passes during the drain with 1 < 2 reports: the round fails as usual
    (fail,) = m.take_effects()
    assert isinstance(fail, FailRound) and "only 1 reports by the deadline" in fail.reason


def test_the_machine_imports_no_store_driver_network_or_tensorflow() -> None:
    code = ("import sys; import fedrecon.server.round_machine; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('sqlalchemy', 'grpc', 'tensorflow', 'keras', 'psycopg')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class _SlowCommitStore(SqlStore):
    """A real SQLite store whose commits wait for the test to let them through."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.commit_entered = threading.Event()
        self.release = threading.Event()

    def commit_round(self, round_id: int, **kwargs):  # type: ignore[no-untyped-def, override]
        self.commit_entered.set()
        assert self.release.wait(120), "the test never released the commit"
        return super().commit_round(round_id, **kwargs)


def test_a_slow_commit_blocks_no_other_call(tmp_path: Path) -> None:
    task = TaskSpec(name="movies", model=MODEL, rounds=RoundSettings(
        clients_per_round=2, over_selection=1.5, min_reports=2, selection_timeout_s=100.0,
        reporting_timeout_s=100.0))
    clock = ManualClock()
    with _SlowCommitStore(f"sqlite:///{tmp_path / 's.db'}") as store:
        c = Coordinator(store, task, clock=clock)
        assigned = {k: c.check_in("movies", k, 1) for k in ("a", "b", "c")}
        assert all(isinstance(a, Assignment) for a in assigned.values())
        a, b = assigned["a"], assigned["b"]
        assert isinstance(a, Assignment) and isinstance(b, Assignment)
        delta = [np.full((6, 2), 0.5, np.float32)]
        metrics = {"post_recon_examples": 1.0}
        c.report("movies", "a", a.round_id, a.token, 1.0, metrics, delta)
        goal: list[ReportOutcome] = []
        committer = threading.Thread(target=lambda: goal.append(
            c.report("movies", "b", b.round_id, b.token, 1.0, metrics, delta)))
        committer.start()
        assert store.commit_entered.wait(60)
        started = time.monotonic()
        try:
            # All of these used to wait for the commit's lock; now they answer while it is in the store.
            names, arrays = c.model_arrays("movies", 0)
            assert names == ["item_embedding"] and arrays[0].shape == (6, 2)
            outcome = c.round_outcome("movies", a.round_id)
            assert outcome.state == RoundState.OPEN and outcome.num_accepted == 2
            late = assigned["c"]
            assert isinstance(late, Assignment)
            _refused(lambda: c.report("movies", "c", late.round_id, late.token, 1.0, metrics, delta),
                     Status.ABORTED, "round_over")
            c.report_evaluation("movies", "e", 0, squared_error=1.0, num_correct=1.0, num_examples=2.0)
            c.tick()
            assert c.record_progress() is False  # the closing round is no live round
            assert committer.is_alive() and c.version == 0
        finally:
            answered_in = time.monotonic() - started
            store.release.set()
        committer.join(60)
        assert not committer.is_alive() and goal and goal[0].accepted
        assert c.version == 1 and store.get_round(a.round_id).state == "committed"
        assert answered_in < 60  # they answered, and did not merely time out with the commit


class _CountingStore(SqlStore):
    """A real SQLite store that counts round lookups."""

    reads = 0

    def get_round(self, round_id: int):  # type: ignore[no-untyped-def, override]
        self.reads += 1
        return super().get_round(round_id)


def test_round_queries_read_a_finished_round_once_and_unknown_ids_never(tmp_path: Path) -> None:
    task = TaskSpec(name="movies", model=MODEL, rounds=RoundSettings(clients_per_round=1, over_selection=1.0,
                                                                     min_reports=1))
    with _CountingStore(f"sqlite:///{tmp_path / 's.db'}") as store:
        c = Coordinator(store, task, clock=ManualClock())
        a = c.check_in("movies", "a", 1)
        assert isinstance(a, Assignment)
        c.report("movies", "a", a.round_id, a.token, 1.0, {}, [np.zeros((6, 2), np.float32)])
        for _ in range(50):  # a client polling, or a hostile one: the store is read once
            outcome = c.round_outcome("movies", a.round_id)
            assert outcome.state == RoundState.COMMITTED and outcome.new_version == 1
        assert store.reads == 1
        for guess in (a.round_id + 1, 10**6, 2**31 - 1, 0, -5):  # ids this task never opened
            _refused(lambda g=guess: c.round_outcome("movies", g), Status.NOT_FOUND, "unknown_round")
        assert store.reads == 1
    with _CountingStore(f"sqlite:///{tmp_path / 's.db'}") as store:  # a restart knows its past rounds
        again = Coordinator(store, task, clock=ManualClock())
        assert again.round_outcome("movies", a.round_id).new_version == 1 and store.reads == 1
