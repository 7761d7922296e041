"""A flood of check-ins from one client is refused (RESOURCE_EXHAUSTED) while others are served promptly."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedrecon.protocol import retry_after_ms
from fedrecon.server.app import start_server
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.limits import ServerLimits
from fedrecon.server.store import SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec
from fedrecon.tensors import manifest
from fedrecon.v1 import coordinator_pb2 as pb
from fedrecon.v1 import coordinator_pb2_grpc as pb_grpc


def test_a_check_in_flood_is_refused_and_the_coordinator_stays_responsive(tmp_path: Path) -> None:
    task = TaskSpec(name="limits", model={"kind": "matrix_factorization", "num_items": 50, "num_factors": 4},
                    rounds=RoundSettings(clients_per_round=5, min_reports=1, max_check_ins_per_minute=60))
    with SqlStore(f"sqlite:///{tmp_path / 's.db'}") as store, \
            start_server(Coordinator(store, task)) as server:
        stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(server.address))
        flood = pb.CheckInRequest(task_name="limits", client_id="flooder", protocol_version=1)
        outcomes: Counter[str] = Counter()
        lock = threading.Lock()
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                try:
                    stub.CheckIn(flood, timeout=5)
                    result = "answered"
                except grpc.RpcError as err:
                    result = err.code().name
                with lock:
                    outcomes[result] += 1

        threads = [threading.Thread(target=hammer) for _ in range(8)]
        started = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(0.5)
        latencies = []
        for i in range(5):  # honest clients during the flood
            t0 = time.monotonic()
            answer = stub.CheckIn(pb.CheckInRequest(task_name="limits", client_id=f"honest-{i}",
                                                    protocol_version=1), timeout=5)
            latencies.append(time.monotonic() - t0)
            assert answer.WhichOneof("outcome") in ("assignment", "retry")
        stop.set()
        for t in threads:
            t.join(10)
        elapsed = time.monotonic() - started
    assert outcomes["RESOURCE_EXHAUSTED"] > 100
    # Burst of 10, then one a second: the flooder got at most that many answers.
    assert outcomes["answered"] <= 10 + elapsed + 1
    assert max(latencies) < 1.0, latencies
    assert server.coordinator.refusals["check_in_rate"] == outcomes["RESOURCE_EXHAUSTED"]


def test_streams_beyond_their_limit_are_refused_and_unary_calls_are_still_served(tmp_path: Path) -> None:
    """Report streams have their own slots: when they are all held, another report is refused at once with
    RESOURCE_EXHAUSTED and a retry hint, while GetLatestModel (a unary call) is still answered."""
    task = TaskSpec(name="limits", model={"kind": "matrix_factorization", "num_items": 50, "num_factors": 4},
                    rounds=RoundSettings(clients_per_round=5, min_reports=1))
    limits = ServerLimits(max_report_streams=2, max_unary_calls=2, retry_hint_ms=700)
    with SqlStore(f"sqlite:///{tmp_path / 's.db'}") as store, \
            start_server(Coordinator(store, task), limits=limits) as server:
        stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(server.address))

        assigned = {c: stub.CheckIn(pb.CheckInRequest(task_name="limits", client_id=c, protocol_version=1),
                                    timeout=5).assignment for c in ("slow-0", "slow-1", "third")}

        def stalled(client: str) -> Iterator[pb.ReportUpdateRequest]:  # a header, then nothing: holds a slot
            a = assigned[client]
            yield pb.ReportUpdateRequest(header=pb.ReportHeader(
                task_name="limits", client_id=client, round_id=a.round_id,
                assignment_token=a.assignment_token, weight=1.0,
                manifest=manifest(["item_embedding"], [np.zeros((50, 4), np.float32)])))
            release.wait(30)

        release = threading.Event()
        held = [stub.ReportUpdate.future(stalled(f"slow-{i}"), timeout=40) for i in range(2)]
        try:
            deadline = time.monotonic() + 30
            while True:  # until both streams hold their slots (a refusal with the hint proves it)
                with pytest.raises(grpc.RpcError) as caught:
                    stub.ReportUpdate(stalled("third"), timeout=10)
                if caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                    break
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value
            assert retry_after_ms(caught.value.trailing_metadata()) == 700
            latest = stub.GetLatestModel(pb.GetLatestModelRequest(task_name="limits"), timeout=5)
            assert latest.model_version == 0
        finally:
            release.set()
        for call in held:
            with pytest.raises(grpc.RpcError) as ended:
                call.result()
            assert "stream ended" in ended.value.details()  # the bytes never came


def test_no_rpc_hands_out_another_clients_data() -> None:
    """The service has exactly these calls, and none of their answers carries a report or an update."""
    service = pb.DESCRIPTOR.services_by_name["Coordinator"]
    answers = {m.name: m.output_type.name for m in service.methods}
    assert answers == {"CheckIn": "CheckInResponse", "DownloadModel": "TensorStreamMessage",
                       "ReportUpdate": "ReportUpdateResponse", "ReportEvaluation": "ReportEvaluationResponse",
                       "GetLatestModel": "GetLatestModelResponse", "GetRound": "GetRoundResponse",
                       "SecureAggregation": "SecureAggregationResponse"}
    # A secure round's answers carry only what the protocol gives every participant: public keys and
    # shares encrypted to the recipient, never a report, an update or a masked input.
    secure_next = {f.message_type.name for f in pb.SecureAggregationResponse.DESCRIPTOR.oneofs_by_name[
        "next"].fields}
    assert secure_next == {"SecAggWait", "SecAggParameters", "SecAggRoster", "SecAggDelivery",
                           "SecAggUnmaskRequest", "SecAggDone"}
    report_fields = {f.name for f in pb.ReportUpdateResponse.DESCRIPTOR.fields}
    assert report_fields == {"accepted", "message"}
    evaluation_fields = {f.name for f in pb.ReportEvaluationResponse.DESCRIPTOR.fields}
    assert evaluation_fields == set()
    # A round's answer is its state and a count, never whose reports it took.
    round_fields = {f.name for f in pb.GetRoundResponse.DESCRIPTOR.fields}
    assert round_fields == {"round_id", "round_num", "state", "new_version", "num_accepted", "reason"}
