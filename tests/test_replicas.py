"""Several coordinators on one store: one leads a task (a lease), the others stand by and take over when it
runs out; a leader that lost its lease while paused can never commit over its successor (fencing).

Both coordinators live in this process and share a real store (SQLite file, and PostgreSQL); "paused" means
its ticks stop, as with SIGSTOP. Leases are short (5 s; a leader renews them just before it acts, since a
leader refuses rounds once its lease may have run out) and every wait is on a condition with a generous
bound.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedrecon.client import FederatedClient, RetryPolicy
from fedrecon.protocol import Assignment
from fedrecon.server.app import start_server
from fedrecon.server.clock import ManualClock
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.refusals import Refusal, Status
from fedrecon.server.store import Lease, RoundState, SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec
from fedrecon.simulations.ratings import load_dataset

TTL_S = 5.0
TASK = TaskSpec(name="shared", model={"kind": "matrix_factorization", "num_items": 6, "num_factors": 2},
                rounds=RoundSettings(clients_per_round=2, over_selection=1.0, min_reports=2))


def _until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    give_up = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < give_up, f"timed out waiting until {what}"
        time.sleep(0.05)


def _coordinator(store: SqlStore, name: str) -> Coordinator:
    return Coordinator(store, TASK, clock=ManualClock(), replica_id=name, lease_ttl_s=TTL_S)


def _renewed(c: Coordinator) -> Coordinator:
    """``c`` after its lease maintenance ran now (a leader renews, a standby tries to take the lead)."""
    c._next_lease_action = 0.0
    c.tick()
    return c


def _report(c: Coordinator, client: str, a: Assignment, value: float = 0.1) -> object:
    return c.report("shared", client, a.round_id, a.token, 1.0, {}, [np.full((6, 2), value, np.float32)])


def test_one_leads_the_other_stands_by_and_takes_over_from_a_paused_leader(db_url: str) -> None:
    with SqlStore(db_url) as store:
        a = _coordinator(store, "replica-a")
        b = _coordinator(store, "replica-b")
        assert a.leading and not b.leading
        with pytest.raises(Refusal) as refused:
            b.check_in("shared", "u1", 1)
        assert refused.value.status == Status.UNAVAILABLE and refused.value.reason == "not_leader"
        assert "replica-a" in refused.value.message
        assert b.model_arrays("shared", 0)[1][0].shape == (6, 2)  # a standby still serves reads

        # replica-a opens a round and accepts one of its two reports, then pauses (no more ticks).
        first = _renewed(a).check_in("shared", "u1", 1)
        second = _renewed(a).check_in("shared", "u2", 1)
        assert isinstance(first, Assignment) and isinstance(second, Assignment)
        assert _report(_renewed(a), "u1", first).accepted  # type: ignore[attr-defined]

        # Its lease runs out; replica-b takes the task and closes the round it left.
        _until(lambda: (b.tick(), b.leading)[1], "the standby leads")
        assert b.interrupted_rounds == [first.round_id]
        assert store.get_round(first.round_id).state == RoundState.FAILED

        # replica-a wakes: its lease ran out unrenewed, so it refuses the report itself (the client fails
        # over)...
        with pytest.raises(Refusal) as expired:
            _report(a, "u2", second)
        assert expired.value.reason == "not_leader"
        # ...and had the pause struck after that check, the store's fencing refuses the commit of the
        # report that completes the round, and replica-a stands down.
        a._lead_until = float("inf")
        with pytest.raises(Refusal) as fenced:
            _report(a, "u2", second)
        assert fenced.value.reason == "commit_failed" and "lost" in fenced.value.message
        assert not a.leading and a.version == 0
        with pytest.raises(Refusal) as standing:
            a.check_in("shared", "u3", 1)
        assert standing.value.reason == "not_leader"

        # replica-b runs the task; exactly one version was written, by it.
        for client in ("u3", "u4"):
            got = b.check_in("shared", client, 1)
            assert isinstance(got, Assignment)
            assert _report(b, client, got).accepted  # type: ignore[attr-defined]
        assert b.version == 1
        assert [(v.version, v.round_id) for v in store.list_versions("shared")][1:] == [
            (1, store.list_rounds("shared")[-1].round_id)]
        assert [r.state for r in store.list_rounds("shared")] == [RoundState.FAILED, RoundState.COMMITTED]


def test_a_leader_that_stops_hands_over_at_once(db_url: str) -> None:
    with SqlStore(db_url) as store:
        a = Coordinator(store, TASK, clock=ManualClock(), replica_id="replica-a", lease_ttl_s=600.0)
        b = Coordinator(store, TASK, clock=ManualClock(), replica_id="replica-b", lease_ttl_s=600.0)
        assert a.leading and not b.leading
        assert a.shut_down().state == "idle"  # releases the lease
        b._next_lease_action = 0.0  # its next tick tries at once (instead of a third of 600 s later)
        b.tick()
        assert b.leading
        lease = store.get_lease("shared")
        assert lease is not None and (lease.holder, lease.epoch) == ("replica-b", 2)


def test_a_client_given_both_addresses_follows_the_leader(tmp_path: Path) -> None:
    """Real gRPC: the client lists the standby first; its calls fail over to the leader, and after the
    leader stops (releasing its lease) to the standby that took over."""
    data = load_dataset("synthetic", seed=42)
    users = sorted(data.train)
    task = TaskSpec(name="shared", model={"kind": "matrix_factorization", "num_items": data.num_items,
                                          "num_factors": 4},
                    rounds=RoundSettings(clients_per_round=1, over_selection=1.0, min_reports=1,
                                         retry_delay_s=(0.05, 0.1)))
    retry = RetryPolicy(initial_s=0.05, max_s=0.5, give_up_after_s=120.0)
    with SqlStore(f"sqlite:///{tmp_path / 's.db'}") as store:
        # The client step runs in this process: TensorFlow is loaded first, since loading it holds the
        # interpreter long enough on a busy machine (minutes) for both coordinators' leases to run out
        # unrenewed (the lead then passes, as it should, and the first round fails). The hand-over tested
        # here is the release at stop, not an expiry: default leases (15 s).
        import fedrecon.core.client_work  # noqa: F401

        leader = start_server(Coordinator(store, task, replica_id="replica-a"), tick_s=0.05)
        standby = start_server(Coordinator(store, task, replica_id="replica-b"), tick_s=0.05)
        try:
            both = f"{standby.address},{leader.address}"
            first = FederatedClient(both, "shared", "u0", data.train[users[0]], retry=retry).participate(
                max_wait_s=60)
            assert first.accepted and leader.coordinator.version == 1
            leader.stop()  # SIGTERM's path: the round is closed and the lease released
            _until(lambda: standby.coordinator.leading, "the standby leads")
            second = FederatedClient(both, "shared", "u1", data.train[users[1]], retry=retry).participate(
                max_wait_s=60)
            assert second.accepted and standby.coordinator.version == 2
        finally:
            leader.stop()
            standby.stop()
        assert [v.version for v in store.list_versions("shared")] == [0, 1, 2]


def test_a_standby_reloads_only_when_the_leader_committed(db_url: str) -> None:
    """Standing by costs one small read per lease period: the model (a payload read) and the task's rounds
    are read again only when the leader committed a new version, then served at once."""
    with SqlStore(db_url) as store:
        a = _coordinator(store, "replica-a")
        b = _coordinator(store, "replica-b")
        assert a.leading and not b.leading
        reads: list[str] = []
        latest, rounds = store.latest_version, store.list_rounds

        def counted_latest(task: str, *, with_payload: bool = True) -> object:
            reads.append("payload" if with_payload else "version")
            return latest(task, with_payload=with_payload)

        def counted_rounds(task: str, **kwargs: object) -> object:
            reads.append("rounds")
            return rounds(task, **kwargs)  # type: ignore[arg-type]

        b.store = type("CountingStore", (), {})()  # only b's reads are counted: a keeps the real store
        for name in ("acquire_lease", "renew_lease", "get_version", "get_round", "fail_unfinished_rounds",
                     "participation_in", "get_task"):
            setattr(b.store, name, getattr(store, name))
        b.store.latest_version = counted_latest  # type: ignore[attr-defined]
        b.store.list_rounds = counted_rounds  # type: ignore[attr-defined]

        def standby_tick() -> None:
            _renewed(a)  # the leader keeps its lease
            _renewed(b)  # b's maintenance runs now, not a third of a lease later

        for _ in range(5):
            standby_tick()
        assert not b.leading and reads == ["version"] * 5

        # The leader opens a round: the standby still reads no model, yet answers for the new round.
        standby_tick()
        first = a.check_in("shared", "u1", 1)
        second = _renewed(a).check_in("shared", "u2", 1)
        assert isinstance(first, Assignment) and isinstance(second, Assignment)
        standby_tick()
        assert reads.count("payload") == 0 and b.round_outcome("shared", first.round_id).state.name == "OPEN"

        # The leader commits version 1: the standby reloads once, and serves it.
        for client, got in (("u1", first), ("u2", second)):
            assert _report(_renewed(a), client, got).accepted  # type: ignore[attr-defined]
        assert a.version == 1
        np.testing.assert_array_equal(b.model_arrays("shared", 1)[1][0], a.model_arrays("shared", 1)[1][0])
        reads.clear()
        standby_tick()
        standby_tick()
        assert reads == ["version", "payload", "rounds", "version"] and b.version == 1
        assert b.round_outcome("shared", first.round_id).state.name == "COMMITTED"


def test_a_leader_whose_lease_ran_out_unrenewed_refuses_rounds(db_url: str) -> None:
    """A leader that could not renew (paused, store unreachable) stops taking check-ins and reports once its
    lease may have run out, before any successor exists, and leads again when a renewal succeeds."""
    with SqlStore(db_url) as store:
        a = _coordinator(store, "replica-a")
        assert isinstance(_renewed(a).check_in("shared", "u1", 1), Assignment)
        lease = store.get_lease("shared")
        assert lease is not None
        _until(lambda: time.monotonic() >= a._lead_until, "the lease may have run out")  # no ticks
        with pytest.raises(Refusal) as refused:
            a.check_in("shared", "u2", 1)
        assert refused.value.status == Status.UNAVAILABLE and refused.value.reason == "not_leader"
        assert "renew" in refused.value.message
        # Nobody took the task: the renewal succeeds under the same epoch.
        assert isinstance(_renewed(a).check_in("shared", "u2", 1), Assignment)
        renewed = store.get_lease("shared")
        assert renewed is not None and renewed.epoch == lease.epoch


def test_a_client_leaves_a_coordinator_that_holds_its_calls(tmp_path: Path) -> None:
    """A paused coordinator (SIGSTOP, or stuck on its store) accepts connections but answers nothing: a
    call's deadline passes, and the retry goes to the next address instead of waiting on it again."""
    from fedrecon.client.transport import CoordinatorChannel

    released = threading.Event()
    with SqlStore(f"sqlite:///{tmp_path / 'stuck.db'}") as stuck_store, \
            SqlStore(f"sqlite:///{tmp_path / 'live.db'}") as live_store:
        stuck = start_server(_coordinator(stuck_store, "stuck"), tick_s=0.05)
        live = start_server(_coordinator(live_store, "live"), tick_s=0.05)
        # Stuck on its store: the check-in that opens a round waits on the store write, on the pool.
        stuck.coordinator.settle_check_in = lambda *a, **k: released.wait(60)  # type: ignore[method-assign]
        try:
            channel = CoordinatorChannel(f"{stuck.address},{live.address}", retry=RetryPolicy(
                initial_s=0.05, max_s=0.2, give_up_after_s=60.0, rpc_timeout_s=1.0))
            answer = channel.check_in("shared", "u1")
            assert isinstance(answer, Assignment) and channel.target == live.address
            channel.close()
        finally:
            released.set()
            stuck.stop()
            live.stop()


def test_a_standby_serves_no_round_before_it_loaded_what_the_leader_left(db_url: str) -> None:
    """Taking the lead is: lease, close the old leader's rounds, load its last version, then serve. A
    check-in arriving in the middle (another gRPC thread) is refused rather than given a round on the
    version the standby last saw (which could then never commit: StaleRound)."""
    with SqlStore(db_url) as store:
        a = Coordinator(store, TASK, clock=ManualClock(), replica_id="replica-a", lease_ttl_s=600.0)
        b = Coordinator(store, TASK, clock=ManualClock(), replica_id="replica-b", lease_ttl_s=600.0)
        for client in ("u1", "u2"):
            got = a.check_in("shared", client, 1)
            assert isinstance(got, Assignment)
            assert _report(a, client, got).accepted  # type: ignore[attr-defined]
        assert a.version == 1 and b.version == 0  # b has not followed the store since
        assert a.shut_down().state == "idle"
        answers: list[object] = []
        fail_unfinished = store.fail_unfinished_rounds

        def during_takeover(task: str, reason: str) -> object:
            try:
                answers.append(b.check_in("shared", "u3", 1))
            except Refusal as refused:
                answers.append(refused.reason)
            return fail_unfinished(task, reason)

        store.fail_unfinished_rounds = during_takeover  # type: ignore[method-assign]
        b._next_lease_action = 0.0
        b.tick()
        store.fail_unfinished_rounds = fail_unfinished  # type: ignore[method-assign]
        assert b.leading and answers == ["not_leader"] and b.version == 1
        for client in ("u3", "u4"):
            got = b.check_in("shared", client, 1)
            assert isinstance(got, Assignment) and got.model_version == 1
            assert _report(b, client, got).accepted  # type: ignore[attr-defined]
        assert b.version == 2


def test_a_leader_paused_inside_a_transaction_does_not_hold_its_successor_back(postgres_url: str) -> None:
    """A leader stopped (SIGSTOP) or cut off in the middle of a transaction keeps that transaction's row
    locks, here the lease row as in a renewal; PostgreSQL ends such an idle transaction after
    ``IDLE_IN_TRANSACTION_TIMEOUT_MS``, so a standby takes over instead of waiting for the leader to wake."""
    from sqlalchemy import text

    from fedrecon.server.store.sql_store import IDLE_IN_TRANSACTION_TIMEOUT_MS

    with SqlStore(postgres_url) as old, SqlStore(postgres_url) as new:
        a = Coordinator(old, TASK, clock=ManualClock(), replica_id="replica-a", lease_ttl_s=1.0)
        assert a.leading
        stuck = old._engine.connect()
        stuck.begin()
        stuck.execute(text("SELECT epoch FROM task_leases FOR UPDATE")).all()  # ...and the process stops
        started = time.monotonic()
        taken = _standby_takes_expired_lease(new, "shared")
        assert taken is not None, "the standby is still waiting for the stopped leader's transaction"
        assert taken.epoch == 2
        assert time.monotonic() - started >= IDLE_IN_TRANSACTION_TIMEOUT_MS / 1000 * 0.9
        stuck.invalidate()  # the server ended this session


def _standby_takes_expired_lease(store: SqlStore, task: str) -> Lease | None:
    """The lease ``replica-b`` takes through ``store`` once ``task``'s lease ran out, or None if taking it
    is still blocked after 120 s (on a thread, so a blocked take cannot hang the test)."""
    taken: list[Lease] = []

    def take_over() -> None:
        _until(lambda: (time.sleep(0.2), store_lease_expired(store, task))[1], "the lease runs out")
        taken.append(store.acquire_lease(task, "replica-b", 5.0))

    worker = threading.Thread(target=take_over, daemon=True)
    worker.start()
    worker.join(120)
    return taken[0] if taken else None


def store_lease_expired(store: SqlStore, task: str = "shared") -> bool:
    from datetime import UTC, datetime

    lease = store.get_lease(task)
    return lease is not None and lease.expires_at <= datetime.now(UTC)


def test_a_leader_cut_off_inside_a_pipeline_does_not_hold_its_successor_back(postgres_url: str) -> None:
    """A leader cut off from the database between the statements of a pipeline keeps that transaction's row
    locks with no timeout at all: psycopg's ``executemany`` (a round's participations, in ``commit_round``
    and ``fail_round``) sends each row's Execute as it goes and the Sync only at the end, and PostgreSQL arms
    ``idle_in_transaction_session_timeout`` only after a Sync, so the session waits "active" for the rest,
    holding the task, round and lease rows, until the network heals or TCP gives up (a relay or proxy in
    between keeps TCP alive for ever). The standby that finds the lease expired but its row still locked
    ends that transaction (`SqlStore.acquire_lease`) and takes over."""
    from dataclasses import replace

    from sqlalchemy import text

    task = replace(TASK, name="cut-off")  # the module's database holds the other tests' "shared" task
    with SqlStore(postgres_url) as old, SqlStore(postgres_url) as new:
        a = Coordinator(old, task, clock=ManualClock(), replica_id="replica-a", lease_ttl_s=1.0)
        assert a.leading
        stuck = old._engine.connect()
        stuck.begin()
        stuck.execute(text("SELECT id FROM tasks FOR NO KEY UPDATE")).all()  # as commit_round locks them
        stuck.execute(text("SELECT epoch FROM task_leases FOR UPDATE")).all()
        session = stuck.connection.driver_connection
        pid = session.info.backend_pid
        pipeline = session.pipeline()
        pipeline.__enter__()  # never left: the Sync that would end it is cut off (kept: a dropped one syncs)
        session.execute("SELECT 1 AS first_row_of_a_pipeline")
        # The server ran it and waits for the rest, outside any timeout.
        _until(lambda: _activity(new, pid) == ("active", "ClientRead", "SELECT 1 AS first_row_of_a_pipeline"),
               "the pipeline's first statement ran on the server")
        taken = _standby_takes_expired_lease(new, "cut-off")
        assert taken is not None, "the standby is still waiting for the cut-off leader's pipeline"
        assert taken.epoch == 2
        _until(lambda: _activity(new, pid) is None, "the cut-off session is gone")  # ended, not left behind
        stuck.invalidate()


def _activity(store: SqlStore, pid: int) -> tuple[str, str, str] | None:
    """(state, wait event, query) of a PostgreSQL session, None once it ended (read in a transaction of
    its own: pg_stat_activity is a snapshot per transaction)."""
    from sqlalchemy import text

    with store._engine.connect() as watch:
        row = watch.execute(text("SELECT state, wait_event, query FROM pg_stat_activity WHERE pid = :pid"),
                            {"pid": pid}).one_or_none()
    return None if row is None else (row[0], row[1], row[2])


def test_a_standby_commits_after_the_leader_is_cut_off_in_the_middle_of_a_commit(
        postgres_url: str, tmp_path: Path) -> None:
    """Real gRPC and PostgreSQL: the failover drill's store cut at its worst moment. The leader reaches the
    database through a relay that stops carrying bytes (held, as in a network partition) just after the
    first participation row of a commit reached the server, so its session holds the task, round and lease
    rows mid-pipeline with no server timeout armed. Clients given both addresses leave it; the standby
    takes the expired lease (ending that transaction) and commits, with each version committed once."""
    from sqlalchemy import event
    from sqlalchemy.engine import make_url

    from fedrecon.server.process import StoreRelay

    data = load_dataset("synthetic", seed=42)
    users = sorted(data.train)[:3]
    task = TaskSpec(name="mid-commit", model={"kind": "matrix_factorization", "num_items": data.num_items,
                                              "num_factors": 4},
                    rounds=RoundSettings(clients_per_round=2, over_selection=1.0, min_reports=2,
                                         retry_delay_s=(0.05, 0.2)))
    url = make_url(postgres_url)
    relay = StoreRelay((url.host or "127.0.0.1", url.port or 5432))
    cut_off: list[int] = []  # the leader's session, once cut off

    def cut_after_the_first_row(connection: Any, _cursor: Any, statement: str, parameters: Any,
                                _context: Any, executemany: bool) -> tuple[str, Any]:
        if not (executemany and statement.startswith("INSERT INTO participations") and not cut_off):
            return statement, parameters
        pid = connection.connection.driver_connection.info.backend_pid

        def rows() -> Iterator[Any]:
            yield parameters[0]
            _until(lambda: _activity(standby_store, pid) is not None and _activity(standby_store, pid)[:2]
                   == ("active", "ClientRead"), "the first row ran and the server waits for the next")
            relay.cut("partition")
            cut_off.append(pid)
            yield from parameters[1:]

        return statement, rows()

    # The client step runs in this process: TensorFlow is loaded before the leases start (see above).
    import fedrecon.core.client_work  # noqa: F401

    leader_store = SqlStore(url.set(host="127.0.0.1", port=relay.port).render_as_string(hide_password=False))
    standby_store = SqlStore(postgres_url)
    event.listen(leader_store._engine, "before_cursor_execute", cut_after_the_first_row, retval=True)
    leader = start_server(Coordinator(leader_store, task, replica_id="replica-a", lease_ttl_s=TTL_S),
                          tick_s=0.05)
    standby = start_server(Coordinator(standby_store, task, replica_id="replica-b", lease_ttl_s=TTL_S),
                           tick_s=0.05)
    stop = threading.Event()
    retry = RetryPolicy(initial_s=0.05, max_s=0.5, give_up_after_s=120.0, rpc_timeout_s=3.0)

    def device(user: int) -> None:
        client = FederatedClient(f"{leader.address},{standby.address}", "mid-commit", f"u{user}",
                                 data.train[user], retry=retry)
        while not stop.is_set():
            try:
                client.participate(max_wait_s=30)
            except Exception:  # a round lost to the cut, a refusal: the next one is what counts
                time.sleep(0.1)

    devices = [threading.Thread(target=device, args=(u,), daemon=True) for u in users]
    try:
        assert leader.coordinator.leading and not standby.coordinator.leading
        for d in devices:
            d.start()
        _until(lambda: bool(cut_off), "the leader is cut off in the middle of a commit", 300.0)
        base = leader.coordinator.version
        _until(lambda: standby.coordinator.leading and standby.coordinator.version > base,
               "the standby leads and commits", 180.0)
    finally:
        stop.set()
        relay.heal()
        for d in devices:
            d.join(120)
        standby.stop()
        leader.stop()
        relay.close()
        leader_store.close()
    versions = standby_store.list_versions("mid-commit")
    assert [v.version for v in versions] == list(range(len(versions)))  # each once, no gap
    rounds = {r.round_id: r for r in standby_store.list_rounds("mid-commit")}
    assert all(rounds[v.round_id].state == RoundState.COMMITTED for v in versions[1:] if v.round_id)
    standby_store.close()
