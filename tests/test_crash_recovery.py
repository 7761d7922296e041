"""A coordinator killed with SIGKILL in the middle of a round loses nothing that was committed.

Real processes and signals: ``fedrecon serve`` runs as a subprocess; clients run here over loopback. Round 1
commits; round 2 has half its reports when the process is killed. The restarted coordinator (same store,
same port) must find every committed version byte-identical, mark the interrupted round failed (no partial
aggregate becomes a version), and clients that were mid-call must carry on through their retries. Run on
SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrecon.cli import app
from fedrecon.client import FederatedClient, ReportOutcome, RetryPolicy
from fedrecon.server.process import CoordinatorProcess
from fedrecon.server.store import RoundState, SqlStore
from fedrecon.simulations.ratings import load_dataset

PER_ROUND = 6
TASK = f"""
name = "crash"
batch_size = 5
[model]
kind = "matrix_factorization"
num_items = 600
num_factors = 8
[rounds]
clients_per_round = {PER_ROUND}
over_selection = 1.0
min_reports = {PER_ROUND}
selection_timeout_s = 120.0
reporting_timeout_s = 120.0
retry_delay_s = [0.05, 0.2]
"""


def _snapshot(store_url: str) -> dict[int, bytes]:
    with SqlStore(store_url) as store:
        return {v.version: store.get_version("crash", v.version).parameters
                for v in store.list_versions("crash")}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sigkill_mid_round_then_restart(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store_url = (f"sqlite:///{tmp_path / 'store.db'}" if backend == "sqlite"
                 else request.getfixturevalue("postgres_url"))
    task = tmp_path / "task.toml"
    task.write_text(TASK)
    data = load_dataset("synthetic", seed=42)
    users = sorted(data.train)[:2 * PER_ROUND]
    retry = RetryPolicy(initial_s=0.05, max_s=0.5, give_up_after_s=90.0, connect_timeout_s=None)  # patient

    first = CoordinatorProcess(task, store_url, tmp_path, name="first",
                               extra_args=["--replica-id", "node-1"])
    address = first.address

    def client(user: int) -> FederatedClient:
        return FederatedClient(address, "crash", f"user-{user}", data.train[user], retry=retry)

    def in_parallel(chosen: list[int]) -> list[ReportOutcome]:
        reports: list[ReportOutcome] = []
        threads = [threading.Thread(target=lambda u=u: reports.append(client(u).participate(max_wait_s=90)))
                   for u in chosen]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        return reports

    try:
        assert all(r.accepted for r in in_parallel(users[:PER_ROUND]))  # round 1 commits: version 1
        half = in_parallel(users[:PER_ROUND // 2])  # round 2: 3 of 6 reports folded, round still open
        assert all(r.accepted for r in half)
        before = _snapshot(store_url)
        assert sorted(before) == [0, 1]
        assert first.kill() == -signal.SIGKILL
    finally:
        first.stop()

    # A client that calls while the coordinator is dead rides it out with its retries.
    patient: list[ReportOutcome] = []
    waiting = threading.Thread(target=lambda: patient.append(client(users[-1]).participate(max_wait_s=90)))
    waiting.start()
    time.sleep(0.5)
    second = CoordinatorProcess(task, store_url, tmp_path, port=first.port, name="second",
                                extra_args=["--replica-id", "node-1"])  # restarted by its supervisor
    try:
        assert "marked 1 interrupted round(s) failed" in second.log_text()
        after = _snapshot(store_url)
        assert after == before  # every committed version byte-identical, no partial aggregate committed
        rest = in_parallel(users[PER_ROUND:2 * PER_ROUND - 1])  # 5 more + the patient one = a full round
        waiting.join(120)
        assert len(patient) == 1 and patient[0].accepted
        assert all(r.accepted for r in rest)
    finally:
        assert second.stop() == 0, second.log_text()

    with SqlStore(store_url) as store:
        versions = store.list_versions("crash")
        rounds = store.list_rounds("crash")
        assert [(v.version, v.parent) for v in versions] == [(0, None), (1, 0), (2, 1)]
        assert [(r.round_num, r.state, r.new_version) for r in rounds] == [
            (1, RoundState.COMMITTED, 1), (2, RoundState.FAILED, None), (3, RoundState.COMMITTED, 2)]
        assert "restarted" in (rounds[1].failure_reason or "")
        assert rounds[2].num_accepted == PER_ROUND  # the new version holds one full round, nothing more
        for version, parameters in before.items():
            assert store.get_version("crash", version).parameters == parameters
    status = CliRunner().invoke(app, ["status", "--store", store_url, "--json"])
    assert json.loads(status.output)["tasks"][0]["rounds"] == {"open": 0, "aggregating": 0, "committed": 2,
                                                               "failed": 1}
