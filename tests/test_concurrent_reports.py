"""Hundreds of clients reporting at once: every accepted report is folded exactly once, no more, no less.

The clients here skip training (their deltas are made up, each 1.0 scaled by a known weight) so that 300
reports can hit the coordinator together over real gRPC; the store must then show exactly as many folded
updates as reports answered ``accepted``, and the committed model must move by their weighted mean.
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import numpy as np

from fedrecon.core.aggregation import DEFAULT_MAX_UPDATE_NORM
from fedrecon.server.app import start_server
from fedrecon.server.checkpoints import globals_from_bytes
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.limits import ServerLimits
from fedrecon.server.store import SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec
from fedrecon.tensors import chunks, manifest
from fedrecon.v1 import coordinator_pb2 as pb
from fedrecon.v1 import coordinator_pb2_grpc as pb_grpc

CLIENTS = 300


def test_hundreds_of_simultaneous_reports_are_each_folded_once(tmp_path: Path) -> None:
    task = TaskSpec(name="burst", model={"kind": "matrix_factorization", "num_items": 50, "num_factors": 4},
                    rounds=RoundSettings(clients_per_round=CLIENTS, over_selection=1.0, min_reports=CLIENTS,
                                         selection_timeout_s=120, reporting_timeout_s=120))
    with SqlStore(f"sqlite:///{tmp_path / 's.db'}") as store, \
            start_server(Coordinator(store, task), max_workers=64,
                         limits=ServerLimits(max_report_streams=CLIENTS)) as server:  # all read at once
        g0 = globals_from_bytes(store.get_version("burst", 0).parameters, ["item_embedding"])[0]
        channels = [grpc.insecure_channel(server.address, options=[("grpc.channel_id", i)]) for i in range(8)]
        stubs = [pb_grpc.CoordinatorStub(c) for c in channels]
        assignments = [stubs[i % 8].CheckIn(pb.CheckInRequest(task_name="burst", client_id=f"c{i}",
                                                              protocol_version=1)).assignment
                       for i in range(CLIENTS)]
        assert len({a.round_id for a in assignments}) == 1
        go = threading.Barrier(CLIENTS)
        answers: list[bool] = []
        lock = threading.Lock()

        def report(i: int) -> None:
            a = assignments[i]
            delta = [np.full((50, 4), 1.0 + i % 3, np.float32)]  # deltas 1, 2, 3; weights 1..3 below
            header = pb.ReportHeader(task_name="burst", client_id=f"c{i}", round_id=a.round_id,
                                     assignment_token=a.assignment_token, weight=float(1 + i % 3),
                                     manifest=manifest(["item_embedding"], delta))
            messages = [pb.ReportUpdateRequest(header=header),
                        *(pb.ReportUpdateRequest(chunk=c) for c in chunks(delta, 256))]
            go.wait()
            response = stubs[i % 8].ReportUpdate(iter(messages), timeout=60)
            with lock:
                answers.append(response.accepted)

        threads = [threading.Thread(target=report, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert answers.count(True) == CLIENTS
        (record,) = store.list_rounds("burst")
        assert record.num_accepted == CLIENTS and record.metrics["updates_folded"] == CLIENTS
        assert record.new_version == 1
        # Weighted mean of the clipped deltas: each third has delta d (200 values) with weight d. The default
        # bound S clips d = 2 and d = 3 (norms 28.3 and 42.4) to norm S, i.e. S/√200 per value; d = 1 (norm
        # 14.1) stays: (1·1 + 2·S/√200 + 3·S/√200) / 6.
        clipped = DEFAULT_MAX_UPDATE_NORM / np.sqrt(200.0)
        g1 = globals_from_bytes(store.get_version("burst", 1).parameters, ["item_embedding"])[0]
        np.testing.assert_allclose(g1 - g0, (1.0 + 5.0 * clipped) / 6.0, rtol=1e-5)
        assert record.metrics["updates_clipped"] == 200
        for c in channels:
            c.close()
