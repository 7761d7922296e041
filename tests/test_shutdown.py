"""Shutting down never drops accepted updates silently (issue 10, point 6).

SIGTERM with a round that already has its minimum of reports commits it; while the store is down the commit
is retried for ``--shutdown-grace-s``; if the store never comes back, ``fedrecon serve`` exits 1 with one line
saying which accepted updates were lost. Real ``fedrecon serve`` processes on PostgreSQL with a real outage
(connections refused and cut), and the coordinator on SQLite with its write lock held.
"""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

import fedrecon.server.store.sql_store as sql_store
from fedrecon.protocol import Assignment
from fedrecon.server.checkpoints import globals_from_bytes
from fedrecon.server.clock import ManualClock
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.process import CoordinatorProcess
from fedrecon.server.store import RoundState, SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec
from fedrecon.tensors import chunks, manifest
from fedrecon.v1 import coordinator_pb2 as pb
from fedrecon.v1 import coordinator_pb2_grpc as pb_grpc

MODEL = {"kind": "matrix_factorization", "num_items": 6, "num_factors": 2}


def _task_file(folder: Path, name: str, *, clients: int = 3, minimum: int = 1) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(f"""
name = "{name}"
[model]
kind = "matrix_factorization"
num_items = 6
num_factors = 2
[rounds]
clients_per_round = {clients}
over_selection = 1.0
min_reports = {minimum}
selection_timeout_s = 600.0
reporting_timeout_s = 600.0
""")
    return path


def _check_in(address: str, task: str, client: str) -> pb.CheckInResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.CoordinatorStub(channel).CheckIn(
            pb.CheckInRequest(task_name=task, client_id=client, protocol_version=1), timeout=30)


def _report(address: str, task: str, client: str, a: pb.Assignment, value: float = 0.5) -> None:
    with grpc.insecure_channel(address) as channel:
        delta = [np.full((6, 2), value, np.float32)]
        header = pb.ReportHeader(task_name=task, client_id=client, round_id=a.round_id,
                                 assignment_token=a.assignment_token, weight=1.0,
                                 manifest=manifest(["item_embedding"], delta))
        answer = pb_grpc.CoordinatorStub(channel).ReportUpdate(
            iter([pb.ReportUpdateRequest(header=header),
                  *(pb.ReportUpdateRequest(chunk=c) for c in chunks(delta, 16))]), timeout=30)
        assert answer.accepted, answer.message


def _report_one(address: str, task: str) -> None:
    """One client checks in and reports: the round then has its minimum (1) but not its goal (3)."""
    _report(address, task, "alice", _check_in(address, task, "alice").assignment)


def _rounds(url: str, task: str) -> list[tuple[RoundState, int | None]]:
    with SqlStore(url) as store:
        return [(r.state, r.new_version) for r in store.list_rounds(task)]


def test_sigterm_during_an_outage_that_outlasts_the_grace_exits_1_and_says_what_was_lost(
        tmp_path: Path, postgres_url: str, pg_outage) -> None:  # type: ignore[no-untyped-def]
    task = "lost"
    proc = CoordinatorProcess(_task_file(tmp_path, task), postgres_url, tmp_path,
                              extra_args=["--shutdown-grace-s", "2"])
    _report_one(proc.address, task)
    pg_outage.start()
    code = proc.stop(timeout_s=120)
    log = proc.log_text()
    pg_outage.end()
    assert code == 1, log
    lost = [line for line in log.splitlines() if "LOST" in line]
    assert len(lost) == 1 and "LOST 1 accepted update(s) of round 1" in lost[0], log
    assert "stopped at model version" not in log
    assert _rounds(postgres_url, task) == [(RoundState.OPEN, None)]  # nothing committed; the next start
    # marks the round failed, as after a crash


def test_sigterm_during_an_outage_commits_when_the_store_returns_within_the_grace(
        tmp_path: Path, postgres_url: str, pg_outage) -> None:  # type: ignore[no-untyped-def]
    task = "kept"
    proc = CoordinatorProcess(_task_file(tmp_path, task), postgres_url, tmp_path,
                              extra_args=["--shutdown-grace-s", "60"])
    _report_one(proc.address, task)
    pg_outage.start()
    back = threading.Timer(3.0, pg_outage.end)
    back.start()
    try:
        code = proc.stop(timeout_s=120)
    finally:
        back.join()
    log = proc.log_text()
    assert code == 0, log
    assert "round 1 committed version 1 with 1 updates" in log and "LOST" not in log
    assert _rounds(postgres_url, task) == [(RoundState.COMMITTED, 1)]


@pytest.mark.parametrize("store_back", [False, True], ids=["store-stays-down", "store-comes-back"])
def test_shut_down_retries_a_due_commit_on_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  store_back: bool) -> None:
    monkeypatch.setattr(sql_store, "SQLITE_BUSY_TIMEOUT_S", 0.2)
    db = tmp_path / "s.db"
    task = TaskSpec(name="movies", model=MODEL, rounds=RoundSettings(
        clients_per_round=3, over_selection=1.0, min_reports=1, selection_timeout_s=600,
        reporting_timeout_s=600))
    with SqlStore(f"sqlite:///{db}") as store:
        c = Coordinator(store, task, clock=ManualClock())
        a = c.check_in("movies", "alice", 1)
        assert isinstance(a, Assignment)
        assert c.report("movies", "alice", a.round_id, a.token, 1.0, {},
                        [np.full((6, 2), 0.5, np.float32)]).accepted
        lock = sqlite3.connect(db, isolation_level=None, timeout=1.0, check_same_thread=False)
        lock.execute("BEGIN IMMEDIATE")  # every write of the store times out while this is held
        back = threading.Timer(1.0, lock.rollback) if store_back else None
        if back:
            back.start()
        outcome = c.shut_down(grace_s=3.0 if store_back else 1.0, retry_every_s=0.1)
        if back:
            back.join()
        else:
            lock.rollback()
        lock.close()
        if store_back:
            assert (outcome.state, outcome.lost_updates, c.version) == ("committed", 0, 1)
            assert [r.state for r in store.list_rounds("movies")] == [RoundState.COMMITTED]
        else:
            assert (outcome.state, outcome.lost_updates, c.version) == ("lost", 1, 0)
            assert "LOST 1 accepted update(s) of round 1" in outcome.message
            assert [r.state for r in store.list_rounds("movies")] == [RoundState.OPEN]


def test_sigterm_drains_the_open_round_so_its_selected_clients_still_count(tmp_path: Path) -> None:
    """A rolling restart while a round waits for its last report: after SIGTERM the coordinator assigns no
    one (a new client is told to come back, health says NOT_SERVING) but the client already selected can
    still report, the round commits with both updates, and serve exits 0. Without the drain the round
    would fail with its one report (the minimum is 2)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    task = "drained"
    url = f"sqlite:///{tmp_path / 'drain.db'}"
    proc = CoordinatorProcess(_task_file(tmp_path, task, clients=2, minimum=2), url, tmp_path,
                              extra_args=["--drain-s", "600"])
    try:
        first, second = (_check_in(proc.address, task, who).assignment for who in ("alice", "bob"))
        _report(proc.address, task, "alice", first, 1.0)
        proc.proc.send_signal(signal.SIGTERM)
        give_up = time.monotonic() + 120
        while "draining: round 1 has 1 of 2" not in proc.log_text():
            assert proc.proc.poll() is None and time.monotonic() < give_up, proc.log_text()
            time.sleep(0.05)
        late = _check_in(proc.address, task, "carol")
        assert late.WhichOneof("outcome") == "retry" and "shutting down" in late.retry.reason
        again = _check_in(proc.address, task, "bob")  # bob's check-in retried: the same assignment
        assert again.assignment.assignment_token == second.assignment_token
        with grpc.insecure_channel(proc.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        _report(proc.address, task, "bob", second, 3.0)
        assert proc.proc.wait(timeout=120) == 0, proc.log_text()
    finally:
        code = proc.stop()
    log = proc.log_text()
    assert code == 0 and "round 1 committed while draining" in log, log
    assert _rounds(url, task) == [(RoundState.COMMITTED, 1)]
    with SqlStore(url) as store:
        (record,) = store.list_rounds(task)
        assert record.num_accepted == 2
        before, after = (globals_from_bytes(store.get_version(task, v).payload()[0], ["item_embedding"])[0]
                         for v in (0, 1))
    # The mean of alice's 1.0 and bob's 3.0, applied by the server's SGD at learning rate 1.
    np.testing.assert_allclose(after - before, 2.0, atol=1e-6)
