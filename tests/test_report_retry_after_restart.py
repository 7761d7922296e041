"""A client whose report was committed by a coordinator that died before answering learns its update is in
the model when it retries against the restarted coordinator (issue 10, point 6).

Real processes: ``fedrecon serve`` is killed with SIGKILL after round 1 committed and while round 2 is half
full, then restarted on the same store. The retries go over gRPC exactly as the client library sends them
(the same round id, assignment token, weight and tensors). Run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedrecon.client import FederatedClient, RetryPolicy
from fedrecon.server.process import CoordinatorProcess
from fedrecon.server.store import RoundState, SqlStore
from fedrecon.simulations.ratings import load_dataset

TASK = """
name = "retry"
batch_size = 5
[model]
kind = "matrix_factorization"
num_items = 600
num_factors = 4
[rounds]
clients_per_round = 2
over_selection = 1.0
min_reports = 2
selection_timeout_s = 120.0
reporting_timeout_s = 120.0
retry_delay_s = [0.05, 0.2]
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_committed_report_retried_after_a_restart_is_answered_as_in_the_model(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store_url = (f"sqlite:///{tmp_path / 'store.db'}" if backend == "sqlite"
                 else request.getfixturevalue("postgres_url"))
    task = tmp_path / "task.toml"
    task.write_text(TASK)
    data = load_dataset("synthetic", seed=42)
    users = sorted(data.train)[:4]
    retry = RetryPolicy(initial_s=0.05, max_s=0.5, give_up_after_s=60.0, connect_timeout_s=None)  # patient

    first = CoordinatorProcess(task, store_url, tmp_path, name="first",
                               extra_args=["--replica-id", "node-1"])
    clients = {u: FederatedClient(first.address, "retry", f"user-{u}", data.train[u], retry=retry)
               for u in users}
    try:
        work = {}
        for u in users[:2]:  # round 1: both report, the second report commits version 1
            assignment = clients[u].check_in(max_wait_s=60)
            work[u] = (assignment, *clients[u].train(assignment, np.random.default_rng(u)))
        answers = [clients[u].transport.report(a, f"user-{u}", names, up.delta, up.weight, up.metrics)
                   for u, (a, names, up) in work.items()]
        assert [x.accepted for x in answers] == [True, True]
        u3 = users[2]  # round 2: one report of two folded, then the coordinator dies
        a3 = clients[u3].check_in(max_wait_s=60)
        names3, up3 = clients[u3].train(a3, np.random.default_rng(3))
        assert clients[u3].transport.report(a3, f"user-{u3}", names3, up3.delta, up3.weight,
                                            up3.metrics).accepted
        assert first.kill() == -signal.SIGKILL
    finally:
        first.stop()

    second = CoordinatorProcess(task, store_url, tmp_path, port=first.port, name="second",
                                extra_args=["--replica-id", "node-1"])  # restarted by its supervisor
    try:
        u2 = users[1]
        a2, names2, up2 = work[u2]
        # The very same report again (what a client told UNAVAILABLE sends): answered, not refused.
        again = clients[u2].transport.report(a2, f"user-{u2}", names2, up2.delta, up2.weight, up2.metrics)
        assert not again.accepted
        assert f"round id {a2.round_id}" in again.message and "in version 1" in again.message

        def refusal(u: int, assignment: object, delta: list[np.ndarray], weight: float) -> grpc.RpcError:
            with pytest.raises(grpc.RpcError) as raised:
                clients[u].transport.report(assignment, f"user-{u}", names2, delta, weight, {})  # type: ignore[arg-type]
            return raised.value

        # A different update under the same assignment is not a retry: the round is over.
        changed = refusal(u2, a2, [d + np.float32(0.5) for d in up2.delta], up2.weight)
        assert changed.code() == grpc.StatusCode.ABORTED and "is over" in changed.details()
        # The round the crash interrupted failed: its update is not in the model, and the client is told so.
        lost = refusal(u3, a3, up3.delta, up3.weight)
        assert lost.code() == grpc.StatusCode.ABORTED and "restarted" in lost.details()
        # Someone who never took part in round 1 gets no answer about it beyond "over".
        stranger = refusal(users[3], a2, up2.delta, up2.weight)
        assert stranger.code() == grpc.StatusCode.ABORTED
        assert "in version" not in stranger.details()
    finally:
        assert second.stop() == 0, second.log_text()

    with SqlStore(store_url) as store:
        assert [v.version for v in store.list_versions("retry")] == [0, 1]  # nothing folded twice
        assert [(r.round_num, r.state) for r in store.list_rounds("retry")] == [
            (1, RoundState.COMMITTED), (2, RoundState.FAILED)]
