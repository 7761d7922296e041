"""Clients that vanish mid-round: the round commits from the rest when the minimum is met, or fails at its
deadline and the next round starts; nothing hangs. Real gRPC on loopback; the coordinator's clock is moved
past the deadline by hand once the clients that stay have reported, so a slow (busy) machine cannot make
their reports late."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from fedrecon.client import FederatedClient
from fedrecon.server.app import start_server
from fedrecon.server.clock import ManualClock
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.store import Outcome, RoundState, SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec
from fedrecon.simulations.ratings import load_dataset

SELECTED = 10
VANISH = 3  # 30% of the selected clients


def _task(min_reports: int) -> TaskSpec:
    rounds = RoundSettings(clients_per_round=SELECTED, over_selection=1.0, min_reports=min_reports,
                           selection_timeout_s=60.0, reporting_timeout_s=60.0, retry_delay_s=(0.05, 0.1))
    return TaskSpec(name="drops", model={"kind": "matrix_factorization", "num_items": 600, "num_factors": 8},
                    rounds=rounds)


def _round_with_dropouts(address: str, users: list[int], data) -> list[object]:  # type: ignore[no-untyped-def]
    """All check in and download; the first VANISH never report; the rest take part fully."""
    results: list[object] = []

    def vanish(user: int) -> None:
        client = FederatedClient(address, "drops", f"gone-{user}", data.train[user])
        assignment = client.check_in(max_wait_s=10)
        client.globals_for(assignment.model_version)  # downloads, then disappears

    def report(user: int) -> None:
        results.append(FederatedClient(address, "drops", f"user-{user}", data.train[user]).participate(
            max_wait_s=10))

    threads = [threading.Thread(target=vanish, args=(u,)) for u in users[:VANISH]]
    threads += [threading.Thread(target=report, args=(u,)) for u in users[VANISH:SELECTED]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a client hung"
    return results


def _wait_until(condition, timeout: float = 90.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_round_commits_from_the_clients_that_stayed(tmp_path: Path) -> None:
    data = load_dataset("synthetic", seed=42)
    clock = ManualClock()
    with SqlStore(f"sqlite:///{tmp_path / 's.db'}") as store, \
            start_server(Coordinator(store, _task(min_reports=7), clock=clock), tick_s=0.05) as server:
        reports = _round_with_dropouts(server.address, sorted(data.train), data)
        assert len(reports) == SELECTED - VANISH and all(r.accepted for r in reports)  # type: ignore[attr-defined]
        assert server.coordinator.version == 0  # three assigned clients have not answered: it waits
        clock.now += 121.0  # past the deadline
        _wait_until(lambda: server.coordinator.version == 1)  # at the deadline, with 7 >= 7 reports
        (record,) = store.list_rounds("drops")
        assert (record.state, record.num_selected, record.num_accepted) == (RoundState.COMMITTED, 10, 7)
        outcomes = sorted(p.outcome for p in store.participations(record.round_id))
        assert outcomes.count(Outcome.DROPPED) == VANISH and outcomes.count(Outcome.ACCEPTED) == 7


def test_round_below_minimum_fails_at_the_deadline_and_the_next_one_commits(tmp_path: Path) -> None:
    data = load_dataset("synthetic", seed=42)
    users = sorted(data.train)
    clock = ManualClock()
    with SqlStore(f"sqlite:///{tmp_path / 's.db'}") as store, \
            start_server(Coordinator(store, _task(min_reports=8), clock=clock), tick_s=0.05) as server:
        _round_with_dropouts(server.address, users, data)
        clock.now += 121.0  # past the deadline
        _wait_until(lambda: store.list_rounds("drops")[0].state == RoundState.FAILED)
        assert server.coordinator.version == 0
        failed = store.list_rounds("drops")[0]
        assert "only 7 reports by the deadline" in (failed.failure_reason or "")
        # The next check-ins open round 2 on the unchanged model; with everyone reporting it commits at once.
        threads = [threading.Thread(target=lambda u=u: FederatedClient(
            server.address, "drops", f"next-{u}", data.train[u]).participate(max_wait_s=10))
            for u in users[SELECTED:2 * SELECTED]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert server.coordinator.version == 1
        assert [r.state for r in store.list_rounds("drops")] == [RoundState.FAILED, RoundState.COMMITTED]
