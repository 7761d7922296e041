"""The round state machine with a hand-driven clock: selection, commit, failure, refusals, restart.

No transport here (``test_grpc_end_to_end`` covers the wire); the store is a real SQLite file. The model is
a 6-item, 2-factor matrix factorization so every expected number can be checked by hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedrecon.core.aggregation import AggregationConfig
from fedrecon.core.config import FedReconConfig, OptimizerSpec
from fedrecon.protocol import Assignment, RetryLater
from fedrecon.server.checkpoints import globals_from_bytes
from fedrecon.server.clock import ManualClock
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.refusals import Refusal, Status
from fedrecon.server.store import Outcome, RoundState, SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec

MODEL = {"kind": "matrix_factorization", "num_items": 6, "num_factors": 2}


def _task(aggregation: AggregationConfig | None = None, **rounds: object) -> TaskSpec:
    settings = {"clients_per_round": 2, "over_selection": 1.5, "min_reports": 2, "selection_timeout_s": 10.0,
                "reporting_timeout_s": 20.0, "retry_delay_s": (1.0, 3.0), **rounds}
    return TaskSpec(name="movies", model=MODEL, rounds=RoundSettings(**settings),  # type: ignore[arg-type]
                    training=FedReconConfig(server_optimizer=OptimizerSpec("sgd", 1.0)),
                    aggregation=aggregation or AggregationConfig())


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    with SqlStore(f"sqlite:///{tmp_path / 'store.db'}") as s:
        yield s


def _assign(c: Coordinator, client: str) -> Assignment:
    result = c.check_in("movies", client, 1)
    assert isinstance(result, Assignment), result
    return result


def _delta(value: float) -> list[np.ndarray]:
    return [np.full((6, 2), value, np.float32)]


def _report(c: Coordinator, a: Assignment, client: str, value: float, weight: float):  # type: ignore[no-untyped-def]
    metrics = {"loss": 1.0, "post_recon_examples": weight}
    return c.report("movies", client, a.round_id, a.token, weight, metrics, _delta(value))


def _refused(fn, status: Status, reason: str) -> Refusal:  # type: ignore[no-untyped-def]
    with pytest.raises(Refusal) as caught:
        fn()
    assert (caught.value.status, caught.value.reason) == (status, reason), caught.value
    return caught.value


def _stored_globals(store: SqlStore, version: int) -> np.ndarray:
    return globals_from_bytes(store.get_version("movies", version).parameters, ["item_embedding"])[0]


def test_round_commits_at_goal_with_the_weighted_mean(store: SqlStore) -> None:
    clock = ManualClock()
    # No norm bound here: bob's delta (norm 5·√12) would be clipped by the default (test_aggregation.py).
    c = Coordinator(store, _task(AggregationConfig(norm_policy="none")), clock=clock)
    g0 = _stored_globals(store, 0)
    a, b, d = (_assign(c, n) for n in ("alice", "bob", "dora"))  # goal ceil(2 * 1.5) = 3
    assert a.round_id == b.round_id == d.round_id and a.model_version == 0
    full = c.check_in("movies", "erin", 1)
    assert isinstance(full, RetryLater) and (full.delay_min_s, full.delay_max_s) == (1.0, 3.0)

    assert _report(c, a, "alice", 1.0, 1.0).accepted
    assert c.version == 0  # one of two: not yet
    assert _report(c, b, "bob", 5.0, 3.0).accepted
    assert c.version == 1  # goal of two accepted reports reached: committed at once
    # server SGD with lr 1 adds the weighted mean delta: (1*1 + 3*5) / 4 = 4
    np.testing.assert_allclose(_stored_globals(store, 1), g0 + 4.0, rtol=1e-6)
    _refused(lambda: _report(c, d, "dora", 2.0, 1.0), Status.ABORTED, "round_over")
    # Refused from the header alone, before the servicer reads any tensor bytes:
    _refused(lambda: c.check_report("movies", "dora", d.round_id, d.token), Status.ABORTED, "round_over")

    (record,) = store.list_rounds("movies")
    assert (record.state, record.new_version, record.num_selected, record.num_accepted) == (
        RoundState.COMMITTED, 1, 3, 2)
    assert record.total_weight == 4.0
    outcomes = sorted(p.outcome for p in store.participations(record.round_id))
    assert outcomes == sorted([Outcome.ACCEPTED, Outcome.ACCEPTED, Outcome.DROPPED])
    assert [v.parent for v in store.list_versions("movies")] == [None, 0]


def test_round_below_minimum_fails_at_deadline_and_leaves_the_model(store: SqlStore) -> None:
    clock = ManualClock()
    c = Coordinator(store, _task(), clock=clock)
    a = _assign(c, "alice")
    _assign(c, "bob")
    assert _report(c, a, "alice", 1.0, 1.0).accepted
    clock.now += 31.0  # past selection (10 s) + reporting (20 s)
    c.tick()
    (failed,) = store.list_rounds("movies")
    assert failed.state == RoundState.FAILED and "only 1 reports by the deadline" in failed.failure_reason
    assert c.version == 0 and [v.version for v in store.list_versions("movies")] == [0]
    late = _refused(lambda: _report(c, a, "bob", 1.0, 1.0), Status.ABORTED, "late")
    assert "deadline" in late.message
    nxt = _assign(c, "carol")  # the next check-in opens a new round on the unchanged model
    assert (nxt.round_num, nxt.model_version) == (2, 0)


def test_too_few_check_ins_fail_the_round_when_selection_closes(store: SqlStore) -> None:
    clock = ManualClock()
    c = Coordinator(store, _task(), clock=clock)
    _assign(c, "alice")
    clock.now += 10.5
    c.tick()
    (failed,) = store.list_rounds("movies")
    assert failed.state == RoundState.FAILED
    assert failed.failure_reason == "only 1 clients checked in within 10 s; the minimum is 2"


def test_round_commits_once_every_assigned_client_answered(store: SqlStore) -> None:
    clock = ManualClock()
    c = Coordinator(store, _task(clients_per_round=3, min_reports=2, over_selection=1.0), clock=clock)
    a, b = _assign(c, "alice"), _assign(c, "bob")
    clock.now += 10.5  # selection closes with 2 of 3 assigned, enough for the minimum
    c.tick()
    assert _report(c, a, "alice", 1.0, 1.0).accepted
    assert c.version == 0
    assert _report(c, b, "bob", 3.0, 1.0).accepted
    assert c.version == 1  # nobody else can report: no reason to wait for the deadline


def test_duplicate_reports_count_once(store: SqlStore) -> None:
    c = Coordinator(store, _task(clients_per_round=3, min_reports=1), clock=ManualClock())
    a = _assign(c, "alice")
    assert _report(c, a, "alice", 1.0, 2.0).accepted
    again = _report(c, a, "alice", 1.0, 2.0)
    assert not again.accepted and "already accepted" in again.message
    _refused(lambda: _report(c, a, "alice", 9.0, 2.0), Status.ALREADY_EXISTS, "duplicate")
    assert c._round is not None and c._round.aggregate.num_updates == 1
    assert c._round.aggregate.total_weight == 2.0


def test_bad_reports_are_refused_and_change_nothing(store: SqlStore) -> None:
    c = Coordinator(store, _task(clients_per_round=6, min_reports=1, over_selection=1.0), clock=ManualClock())
    names = ("alice", "bob", "carol", "dan", "erin", "fay")
    a, b, ca, d, e, f = (_assign(c, n) for n in names)

    def send(who: str, x: Assignment, *, token: str | None = None, round_id: int | None = None,
             task: str = "movies", weight: float = 1.0, metrics: dict | None = None,
             delta: list[np.ndarray] | None = None) -> object:
        return c.report(task, who, x.round_id if round_id is None else round_id, token or x.token, weight,
                        metrics or {}, _delta(1.0) if delta is None else delta)

    nan = _delta(1.0)
    nan[0][2, 1] = np.nan
    # Refusals that do not use up alice's turn: they are not hers to make.
    _refused(lambda: send("alice", a, token="forged"), Status.PERMISSION_DENIED, "not_assigned")
    _refused(lambda: send("alice", a, round_id=a.round_id + 7), Status.FAILED_PRECONDITION, "wrong_round")
    _refused(lambda: send("alice", a, task="books"), Status.NOT_FOUND, "unknown_task")
    _refused(lambda: c.check_in("movies", "zed", 2), Status.FAILED_PRECONDITION, "protocol_version")
    # Invalid updates: refused, and each is that client's answer for the round.
    _refused(lambda: send("bob", b, delta=[np.zeros((5, 2), np.float32)]), Status.INVALID_ARGUMENT,
             "bad_tensors")
    _refused(lambda: send("carol", ca, weight=float("inf")), Status.INVALID_ARGUMENT, "bad_weight")
    _refused(lambda: send("dan", d, weight=1e12), Status.INVALID_ARGUMENT, "bad_weight")
    _refused(lambda: send("erin", e, metrics={"loss": float("nan")}), Status.INVALID_ARGUMENT, "bad_metrics")
    _refused(lambda: send("fay", f, delta=nan), Status.INVALID_ARGUMENT, "non_finite")
    _refused(lambda: send("fay", f), Status.FAILED_PRECONDITION, "already_refused")
    aggregate = c._round.aggregate  # type: ignore[union-attr]
    assert (aggregate.num_updates, aggregate.total_weight) == (0, 0.0)
    assert c.version == 0

    # alice's valid report is the last answer: the round commits with her update alone (minimum 1).
    g0 = _stored_globals(store, 0)
    assert _report(c, a, "alice", 0.5, 1.0).accepted
    assert c.version == 1
    np.testing.assert_allclose(_stored_globals(store, 1), g0 + 0.5, rtol=1e-6)
    (record,) = store.list_rounds("movies")
    assert (record.num_accepted, record.num_refused) == (1, 5)
    assert c.refusals["bad_weight"] == 2 and c.refusals["non_finite"] == 1


def test_restart_fails_the_interrupted_round_and_keeps_committed_versions(store: SqlStore, tmp_path: Path
                                                                          ) -> None:
    task = _task(clients_per_round=1, min_reports=1, over_selection=1.0)
    first = Coordinator(store, task, clock=ManualClock(), replica_id="node-1")
    a = _assign(first, "alice")
    assert _report(first, a, "alice", 1.0, 1.0).accepted
    v1 = store.get_version("movies", 1).parameters
    interrupted = _assign(first, "bob").round_id  # round 2 open, never finished: the process "dies"

    second = Coordinator(store, task, clock=ManualClock(), replica_id="node-1")  # restarted
    assert second.interrupted_rounds == [interrupted]
    assert store.get_round(interrupted).state == RoundState.FAILED
    assert second.version == 1 and store.get_version("movies", 1).parameters == v1
    assert _assign(second, "bob").round_num == 3
    with pytest.raises(ValueError, match="different description"):
        Coordinator(store, _task(clients_per_round=5), clock=ManualClock())


def test_the_store_never_holds_a_raw_client_id(tmp_path: Path) -> None:
    path = tmp_path / "pseudonyms.db"
    with SqlStore(f"sqlite:///{path}") as store:
        task = _task(clients_per_round=1, min_reports=1, over_selection=1.0)
        c = Coordinator(store, task, clock=ManualClock())
        a = _assign(c, "device-4f2a-serial-123456")
        assert _report(c, a, "device-4f2a-serial-123456", 1.0, 1.0).accepted
        (p,) = store.participations(store.list_rounds("movies")[0].round_id)
        assert p.client_key == c.client_key("device-4f2a-serial-123456")
        assert len(p.client_key) == 40 and "device" not in p.client_key
    assert b"device-4f2a-serial-123456" not in path.read_bytes()


def test_shutdown_commits_a_round_that_has_its_minimum(store: SqlStore) -> None:
    c = Coordinator(store, _task(clients_per_round=3, min_reports=1), clock=ManualClock())
    a = _assign(c, "alice")
    _assign(c, "bob")
    assert _report(c, a, "alice", 1.0, 1.0).accepted
    c.shut_down()
    assert c.version == 1 and store.list_rounds("movies")[0].state == RoundState.COMMITTED
    assert isinstance(c.check_in("movies", "carol", 1), RetryLater)


def test_update_norm_bound_rejects_or_clips(store: SqlStore, tmp_path: Path) -> None:
    # item_embedding is 6x2: a delta of all 1.0 has L2 norm sqrt(12) ≈ 3.46.
    rejecting = Coordinator(store, _task(AggregationConfig(max_update_norm=2.0, norm_policy="reject"),
                                         clients_per_round=1, min_reports=1, over_selection=1.0),
                            clock=ManualClock())
    a = _assign(rejecting, "alice")
    refusal = _refused(lambda: _report(rejecting, a, "alice", 1.0, 1.0), Status.INVALID_ARGUMENT,
                       "norm_too_large")
    assert "3.464" in refusal.message and rejecting.version == 0

    with SqlStore(f"sqlite:///{tmp_path / 'clip.db'}") as clip_store:
        clip_task = _task(AggregationConfig(max_update_norm=2.0), clients_per_round=1, min_reports=1,
                          over_selection=1.0)
        clipping = Coordinator(clip_store, clip_task, clock=ManualClock())
        g0 = _stored_globals(clip_store, 0)
        b = _assign(clipping, "bob")
        assert _report(clipping, b, "bob", 1.0, 1.0).accepted
        step = _stored_globals(clip_store, 1) - g0
        np.testing.assert_allclose(np.linalg.norm(step), 2.0, rtol=1e-5)  # scaled down to the bound
        np.testing.assert_allclose(step, 2.0 / np.sqrt(12.0), rtol=1e-5)
        assert clipping.refusals["clipped"] == 1


def test_a_given_model_becomes_version_zero_of_a_new_task_only(store: SqlStore) -> None:
    given = [np.arange(12, dtype=np.float32).reshape(6, 2)]
    c = Coordinator(store, _task(), initial_globals=given)
    assert c.created_task
    np.testing.assert_array_equal(_stored_globals(store, 0), given[0])
    c.shut_down()
    # A restart with another model leaves the existing task's versions alone.
    again = Coordinator(store, _task(), initial_globals=[np.zeros((6, 2), np.float32)])
    assert not again.created_task
    np.testing.assert_array_equal(_stored_globals(store, 0), given[0])
    again.shut_down()


def test_a_given_model_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    with SqlStore(f"sqlite:///{tmp_path / 'fresh.db'}") as store:
        with pytest.raises(ValueError, match="needs"):
            Coordinator(store, _task(), initial_globals=[np.zeros((6, 3), np.float32)])
        assert store.list_tasks() == []  # nothing was created


def test_a_report_is_folded_without_io_and_only_the_commit_is_left_to_settle(store: SqlStore) -> None:
    """The servicer folds on its event loop what needs no store, and sends to its thread pool only what
    does: here the second of two reports, whose fold completes the round and leaves its commit."""
    c = Coordinator(store, _task(AggregationConfig(norm_policy="none")), clock=ManualClock())
    a, b = _assign(c, "alice"), _assign(c, "bob")
    metrics = {"loss": 1.0, "post_recon_examples": 1.0}
    check = c.begin_check("movies", "alice", a.round_id, a.token)
    assert not check.needs_io and c.settle_check(check) == c.client_key("alice")
    first = c.fold_report("movies", "alice", a.round_id, a.token, 1.0, metrics, _delta(1.0))
    assert not first.needs_io and c.settle_report(first).accepted and c.version == 0
    second = c.fold_report("movies", "bob", b.round_id, b.token, 1.0, metrics, _delta(3.0))
    assert second.needs_io and c.version == 0  # folded; the commit waits for settle_report
    assert c.settle_report(second).accepted and c.version == 1
    # A retry of an accepted report is answered from memory (no I/O), as report() answers it.
    retry = c.fold_report("movies", "alice", a.round_id, a.token, 1.0, metrics, _delta(1.0))
    assert not retry.needs_io
    answer = c.report("movies", "alice", a.round_id, a.token, 1.0, metrics, _delta(1.0))
    assert c.settle_report(retry) == answer and "already accepted" in answer.message


class _NoStore:
    """A store that fails any use: what must not be touched while a check-in is decided on the loop."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the store was used ({name}) by a check-in that needs no I/O")


def test_check_ins_into_an_open_round_are_decided_without_io(store: SqlStore) -> None:
    """The servicer answers on its event loop the check-ins that need no store (all but the one that
    opens a round) and sends only the rest to its thread pool: ``needs_io`` must say which is which, and
    a check-in said to need none must not touch the store, whatever its answer."""
    c = Coordinator(store, _task(clients_per_round=2, over_selection=1.0), clock=ManualClock())
    opener = c.begin_check_in("movies", "alice", 1)
    assert opener.needs_io  # the round is opened in the store by settle_check_in
    first = c.settle_check_in(opener)
    assert isinstance(first, Assignment)
    real, c.store = c.store, _NoStore()  # type: ignore[assignment]
    try:
        second = c.begin_check_in("movies", "bob", 1)
        assert not second.needs_io
        assigned = c.settle_check_in(second)
        assert isinstance(assigned, Assignment) and assigned.round_id == first.round_id
        again = c.begin_check_in("movies", "alice", 1)  # a repeat: the same assignment, from memory
        assert not again.needs_io and c.settle_check_in(again) == first
        full = c.begin_check_in("movies", "carol", 1)  # the round is full: a retry window, from memory
        assert not full.needs_io
        refused = c.settle_check_in(full)
        assert isinstance(refused, RetryLater), refused
    finally:
        c.store = real  # type: ignore[assignment]
    assert c.check_in("movies", "bob", 1) == assigned  # the same answers as check_in gives
    c.shut_down()
