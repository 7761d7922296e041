"""A database that stops answering (locked, restarting) costs time, never accepted updates or the timer.

The outage is real: another connection holds SQLite's write lock; the store's busy timeout is shortened so
the test runs fast.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import fedrecon.server.store.sql_store as sql_store
from fedrecon.client import FederatedClient, RetryPolicy
from fedrecon.protocol import Assignment
from fedrecon.server.app import start_server
from fedrecon.server.checkpoints import globals_from_bytes
from fedrecon.server.clock import ManualClock
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.refusals import Refusal, Status
from fedrecon.server.store import RoundState, SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec
from fedrecon.simulations.ratings import load_dataset

MODEL = {"kind": "matrix_factorization", "num_items": 6, "num_factors": 2}


def _task(**rounds: object) -> TaskSpec:
    settings = {"clients_per_round": 2, "over_selection": 1.0, "min_reports": 2, "selection_timeout_s": 10.0,
                "reporting_timeout_s": 20.0, "retry_delay_s": (0.05, 0.1), **rounds}
    return TaskSpec(name="movies", model=MODEL, rounds=RoundSettings(**settings))  # type: ignore[arg-type]


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(sql_store, "SQLITE_BUSY_TIMEOUT_S", 0.2)
    return tmp_path / "store.db"


class Outage:
    """Holds the database's write lock until ``end()``: every write of the store times out meanwhile."""

    def __init__(self, path: Path) -> None:
        self._connection = sqlite3.connect(path, isolation_level=None, timeout=1.0,
                                           check_same_thread=False)
        self._connection.execute("BEGIN IMMEDIATE")

    def end(self) -> None:
        self._connection.rollback()
        self._connection.close()


def _report(c: Coordinator, a: Assignment, who: str, value: float):  # type: ignore[no-untyped-def]
    return c.report("movies", who, a.round_id, a.token, 1.0, {}, [np.full((6, 2), value, np.float32)])


def test_a_round_that_cannot_commit_waits_for_the_store(db: Path) -> None:
    clock = ManualClock()
    with SqlStore(f"sqlite:///{db}") as store:
        c = Coordinator(store, _task(clients_per_round=2, min_reports=1, over_selection=1.5), clock=clock)
        g0 = globals_from_bytes(store.get_version("movies", 0).parameters, ["item_embedding"])[0]
        a, b, late = (c.check_in("movies", n, 1) for n in ("alice", "bob", "carol"))
        assert _report(c, a, "alice", 1.0).accepted
        outage = Outage(db)
        outcome = _report(c, b, "bob", 3.0)  # the goal is reached while the store cannot write
        assert outcome.accepted and "waits for the store" in outcome.message
        assert c.version == 0
        with pytest.raises(Refusal) as refused:
            _report(c, late, "carol", 5.0)  # the round has its reports: no more folding
        assert refused.value.status == Status.ABORTED
        c.tick()  # still down: nothing lost, nothing written
        assert c.version == 0
        outage.end()
        c.tick()
        assert c.version == 1
        (record,) = store.list_rounds("movies")
        assert record.state == RoundState.COMMITTED and record.num_accepted == 2
        g1 = globals_from_bytes(store.get_version("movies", 1).parameters, ["item_embedding"])[0]
        np.testing.assert_allclose(g1, g0 + 2.0, rtol=1e-6)  # mean of alice's 1 and bob's 3


def test_check_in_during_an_outage_is_unavailable_and_the_client_retries(db: Path, ml_2998_dir: Path) -> None:
    data = load_dataset(str(ml_2998_dir), seed=42)
    task = TaskSpec(name="movies", model={"kind": "matrix_factorization", "num_items": data.num_items,
                                          "num_factors": 4},
                    rounds=RoundSettings(clients_per_round=1, min_reports=1, over_selection=1.0))
    with SqlStore(f"sqlite:///{db}") as store, start_server(Coordinator(store, task), tick_s=0.05) as server:
        with pytest.raises(Refusal) as refused:
            outage = Outage(db)
            try:
                server.coordinator.check_in("movies", "x", 1)  # opening a round needs the store
            finally:
                outage.end()
        assert refused.value.status == Status.UNAVAILABLE
        user = sorted(data.train)[0]
        client = FederatedClient(server.address, "movies", "patient", data.train[user],
                                 retry=RetryPolicy(initial_s=0.05, max_s=0.2, give_up_after_s=30))
        outage = Outage(db)
        threading.Timer(1.0, outage.end).start()
        report = client.participate(max_wait_s=30)
        assert report.accepted and server.coordinator.version == 1


def test_the_deadline_timer_survives_an_outage(db: Path) -> None:
    clock = ManualClock()
    with SqlStore(f"sqlite:///{db}") as store:
        coordinator = Coordinator(store, _task(), clock=clock)
        with start_server(coordinator, tick_s=0.05) as server:
            coordinator.check_in("movies", "alice", 1)
            outage = Outage(db)
            clock.now += 31  # past the deadline: failing the round needs the store
            time.sleep(0.6)
            outage.end()
            assert server._ticker.is_alive()
            deadline = time.monotonic() + 60  # generous: the machine may be busy
            while store.list_rounds("movies")[0].state == RoundState.OPEN and time.monotonic() < deadline:
                time.sleep(0.05)
            assert store.list_rounds("movies")[0].state == RoundState.FAILED


