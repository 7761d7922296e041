"""A scripted fault drill against a live coordinator process; prints and writes what survived.

    python benchmarks/fault_drill.py --out benchmarks/results/fault_drill.json [--store URL]

``fedrecon serve`` runs as its own process (SQLite in a temporary folder unless ``--store`` is given) with
a task of 8 reports per round, over-selection 1.25 (10 assigned), minimum 6, 3 s selection and 4 s
reporting windows. Clients are ``FederatedClient``s on the embedded synthetic data. The phases:

1. normal: two rounds with 10 clients each (2 over-selected reports are told the round is over);
2. dropouts: 10 assigned, 3 vanish after downloading; the round commits from 7 at its deadline;
3. bad input: 200 malformed or hostile messages from one client, "mallory" (garbage streams, local-variable
   names, wrong shapes, forged tokens, wrong rounds, infinite weights, oversized messages, wrong protocol,
   unknown task, NaN deltas), then a normal round must still commit. Mallory holds one assignment: after
   its first invalid update is refused, later ones are refused as already answered (FAILED_PRECONDITION),
   and once its round has failed for want of other clients, as ABORTED;
4. late: 3 assigned clients report after the round committed at its deadline;
5. kill: SIGKILL while a round holds 4 reports; restart on the same store and port; a full round commits.

Figures: rounds committed and failed (from the store); reports accepted (acknowledged with accepted=True)
and refused by reason (as the clients saw them); ``versions_verified``: every committed version's bytes
equal before and after the kill; ``updates_lost``: acknowledged reports of committed rounds minus the
reports the store says those rounds folded (must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections import Counter
from functools import partial
from pathlib import Path

import grpc
import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fedrecon.client import FederatedClient, RetryPolicy
from fedrecon.server.process import CoordinatorProcess
from fedrecon.server.store import RoundState, SqlStore
from fedrecon.simulations.ratings import load_dataset
from fedrecon.tensors import chunks, manifest
from fedrecon.v1 import coordinator_pb2 as pb
from fedrecon.v1 import coordinator_pb2_grpc as pb_grpc

TASK = """
name = "drill"
batch_size = 5
[model]
kind = "matrix_factorization"
num_items = 600
num_factors = 8
[rounds]
clients_per_round = 8
over_selection = 1.25
min_reports = 6
selection_timeout_s = 3.0
reporting_timeout_s = 4.0
retry_delay_s = [0.05, 0.3]
max_check_ins_per_minute = 600.0
"""


class Drill:
    def __init__(self, store_url: str, folder: Path) -> None:
        self.store_url = store_url
        self.folder = folder
        self.task = folder / "task.toml"
        self.task.write_text(TASK)
        self.data = load_dataset("synthetic", seed=42)
        self.users = iter(sorted(self.data.train))
        self.acknowledged: Counter[int] = Counter()  # round id -> reports acknowledged as accepted
        self.refused: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.coordinator: CoordinatorProcess | None = None
        self.retry = RetryPolicy(initial_s=0.05, max_s=0.5, give_up_after_s=60.0)

    # ----- the coordinator process ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the coordinator; a restart keeps the port, so clients find it where it was."""
        port = self.coordinator.port if self.coordinator else 0
        self.coordinator = CoordinatorProcess(self.task, self.store_url, self.folder, port=port)

    @property
    def address(self) -> str:
        assert self.coordinator is not None
        return self.coordinator.address

    def snapshot(self) -> dict[int, bytes]:
        with SqlStore(self.store_url) as store:
            return {v.version: store.get_version("drill", v.version).parameters
                    for v in store.list_versions("drill")}

    # ----- clients -------------------------------------------------------------------------------------
    def client(self) -> FederatedClient:
        user = next(self.users)
        return FederatedClient(self.address, "drill", f"user-{user}", self.data.train[user], retry=self.retry)

    def _note(self, round_id: int, accepted: bool, status: str, message: str) -> None:
        with self.lock:
            if accepted:
                self.acknowledged[round_id] += 1
            elif status != "OK":
                reason = "late" if "deadline" in message else "round_over" if "is over" in message else status
                self.refused[reason] += 1

    def honest(self, client: FederatedClient, assignment: pb.Assignment | None = None) -> None:
        try:
            if assignment is None:
                report = client.participate(max_wait_s=60)
            else:
                client.check_in = lambda **_: assignment  # type: ignore[method-assign]
                report = client.participate()
        except grpc.RpcError as err:
            self._note(-1, False, err.code().name, err.details() or "")
            return
        self._note(report.round_id, report.accepted, report.status, report.message)

    def together(self, jobs: list) -> None:  # type: ignore[type-arg]
        threads = [threading.Thread(target=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)

    def version(self) -> int:
        return int(self.client().transport.latest_model("drill").model_version)

    def wait_for_version(self, version: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.version() < version:
            if time.monotonic() > deadline:
                raise RuntimeError(f"version {version} never came")
            time.sleep(0.1)

    # ----- phases --------------------------------------------------------------------------------------
    def normal_round(self) -> None:
        before = self.version()
        self.together([partial(self.honest, self.client()) for _ in range(10)])
        self.wait_for_version(before + 1)

    def dropouts(self) -> None:
        before = self.version()
        vanishing = [self.client() for _ in range(3)]

        def vanish(c: FederatedClient) -> None:
            a = c.check_in(max_wait_s=30)
            c.globals_for(a.model_version)

        self.together([partial(vanish, c) for c in vanishing]
                      + [partial(self.honest, self.client()) for _ in range(7)])
        self.wait_for_version(before + 1)

    def bad_input(self, count: int = 200) -> None:
        channel = grpc.insecure_channel(self.address)
        stub = pb_grpc.CoordinatorStub(channel)
        rng = np.random.default_rng(0)
        a = stub.CheckIn(pb.CheckInRequest(task_name="drill", client_id="mallory", protocol_version=1),
                         timeout=10)
        assignment = a.assignment if a.HasField("assignment") else pb.Assignment()
        names = ["item_embedding"]
        good = [np.zeros((600, 8), np.float32)]

        def report(header_names: list[str], arrays: list[np.ndarray], **fields: object) -> None:
            header = pb.ReportHeader(task_name="drill", client_id="mallory", round_id=assignment.round_id,
                                     assignment_token=assignment.assignment_token, weight=1.0,
                                     manifest=manifest(header_names, arrays))
            for key, value in fields.items():
                setattr(header, key, value)
            stub.ReportUpdate(iter([pb.ReportUpdateRequest(header=header),
                                    *(pb.ReportUpdateRequest(chunk=c) for c in chunks(arrays, 65536))]),
                              timeout=10)

        nan = [good[0].copy()]
        nan[0][3, 3] = np.nan
        cases = {
            "garbage stream": lambda: stub.ReportUpdate(iter([pb.ReportUpdateRequest(
                chunk=pb.TensorChunk(data=rng.bytes(64)))]), timeout=10),
            "local variable": lambda: report(["user_embedding"], good),
            "wrong shape": lambda: report(names, [good[0][:10]]),
            "forged token": lambda: report(names, good, assignment_token="forged"),
            "wrong round": lambda: report(names, good, round_id=assignment.round_id + 1000),
            "bad weight": lambda: report(names, good, weight=float("inf")),
            "oversized": lambda: stub.ReportUpdate(iter([pb.ReportUpdateRequest(
                chunk=pb.TensorChunk(data=b"\0" * (5 << 20)))]), timeout=10),
            "protocol": lambda: stub.CheckIn(pb.CheckInRequest(task_name="drill", client_id="mallory",
                                                               protocol_version=7), timeout=10),
            "unknown task": lambda: stub.CheckIn(pb.CheckInRequest(task_name="nope", client_id="mallory",
                                                                   protocol_version=1), timeout=10),
            "nan": lambda: report(names, nan),  # last: it uses up mallory's one answer for the round
        }
        kinds = list(cases)
        for i in range(count):
            kind = kinds[min(i * len(kinds) // count, len(kinds) - 1)]
            try:
                cases[kind]()
                self.refused["NOT REFUSED: " + kind] += 1
            except grpc.RpcError as err:
                self.refused[f"{kind}: {err.code().name}"] += 1
        channel.close()
        self.normal_round()  # the coordinator still works

    def late(self) -> None:
        before = self.version()
        stragglers = [self.client() for _ in range(3)]
        assignments = [c.check_in(max_wait_s=30) for c in stragglers]
        self.together([partial(self.honest, self.client()) for _ in range(7)])
        self.wait_for_version(before + 1)  # commits at its deadline with 7 >= 6
        self.together([partial(self.honest, c, a) for c, a in zip(stragglers, assignments, strict=True)])

    def kill(self) -> bool:
        before = self.version()
        self.together([partial(self.honest, self.client()) for _ in range(4)])
        snapshot = self.snapshot()
        assert self.coordinator is not None
        self.coordinator.kill()
        self.start()
        intact = self.snapshot() == snapshot
        self.normal_round()
        return intact and self.version() == before + 1

    def stop(self) -> None:
        if self.coordinator is not None:
            self.coordinator.stop()


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="SQLAlchemy URL (default: SQLite in a temporary folder)")
    parser.add_argument("--bad-messages", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fault_drill.json"))
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedrecon-drill-") as tmp:
        folder = Path(tmp)
        drill = Drill(args.store or f"sqlite:///{folder / 'drill.db'}", folder)
        drill.start()
        try:
            for phase in (drill.normal_round, drill.normal_round, drill.dropouts,
                          lambda: drill.bad_input(args.bad_messages), drill.late):
                phase()
            verified = drill.kill()
        finally:
            drill.stop()
        with SqlStore(drill.store_url) as store:
            rounds = store.list_rounds("drill")
            versions = store.list_versions("drill")
    committed = [r for r in rounds if r.state == RoundState.COMMITTED]
    lost = sum(max(0, drill.acknowledged[r.round_id] - r.num_accepted) for r in committed)
    summary: dict[str, object] = {
        "rounds_committed": len(committed),
        "rounds_failed": sum(r.state == RoundState.FAILED for r in rounds),
        "reports_accepted": sum(drill.acknowledged.values()),
        "reports_folded_in_committed_rounds": sum(r.num_accepted for r in committed),
        "reports_refused": dict(sorted(drill.refused.items())),
        "versions": len(versions),
        "versions_verified": verified,
        "updates_lost": lost,
        "seconds": round(time.monotonic() - t0, 1),
    }
    print(json.dumps(summary, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
