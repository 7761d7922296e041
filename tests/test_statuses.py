"""Every call ends with a documented status a client can act on; never UNKNOWN (issue 10, point 5).

A hostile corpus (bytes that are not protobuf, bad and malformed tokens, unknown tasks and versions,
oversized and absurd values, broken report streams, unknown methods) goes to a coordinator that requires
tokens, over real gRPC, on SQLite and PostgreSQL. A PostgreSQL outage behind the token check is
UNAVAILABLE with a retry hint, and the client library waits as hinted before it retries.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fedrecon.client.transport import CoordinatorChannel, RetryPolicy
from fedrecon.protocol import retry_after_ms
from fedrecon.server.app import start_server
from fedrecon.server.auth import TokenAuthInterceptor, issue_token
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.statuses import status_of
from fedrecon.server.store import SqlStore, StoreError, StoreUnavailable
from fedrecon.server.task import RoundSettings, TaskSpec
from fedrecon.tensors import chunks, manifest
from fedrecon.v1 import coordinator_pb2 as pb
from fedrecon.v1 import coordinator_pb2_grpc as pb_grpc

TASK = "statuses"
SERVICE = "/fedrecon.v1.Coordinator/"
C = grpc.StatusCode


def _task() -> TaskSpec:
    return TaskSpec(name=TASK, model={"kind": "matrix_factorization", "num_items": 6, "num_factors": 2},
                    rounds=RoundSettings(clients_per_round=50, min_reports=1, selection_timeout_s=600,
                                         reporting_timeout_s=600, max_check_ins_per_minute=1e6))


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 's.db'}"
    return request.getfixturevalue("postgres_url")


def _hostile_corpus(channel: grpc.Channel, token: str, revoked: str
                    ) -> list[tuple[str, Callable[[], Any], set[grpc.StatusCode]]]:
    """(name, call, the statuses the status table allows for it)."""
    stub = pb_grpc.CoordinatorStub(channel)
    good = (("authorization", f"Bearer {token}"),)

    def raw(method: str, kind: str, data: bytes, metadata: Any = good) -> Callable[[], Any]:
        if kind == "unary":
            call = channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)
            return lambda: call(data, metadata=metadata, timeout=30)
        if kind == "server-stream":
            stream = channel.unary_stream(SERVICE + method, request_serializer=None,
                                          response_deserializer=None)
            return lambda: list(stream(data, metadata=metadata, timeout=30))
        upload = channel.stream_unary(SERVICE + method, request_serializer=None, response_deserializer=None)
        return lambda: upload(iter([data]), metadata=metadata, timeout=30)

    methods = [("CheckIn", "unary"), ("GetLatestModel", "unary"), ("GetRound", "unary"),
               ("ReportEvaluation", "unary"),
               ("DownloadModel", "server-stream"), ("ReportUpdate", "client-stream")]
    corpus: list[tuple[str, Callable[[], Any], set[grpc.StatusCode]]] = []
    for method, kind in methods:
        corpus.append((f"{method}: not protobuf", raw(method, kind, b"\xff\xff\xff\x0f"),
                       {C.INVALID_ARGUMENT}))
        corpus.append((f"{method}: bad UTF-8 in a string", raw(method, kind, b"\x0a\x02\xc3\x28"),
                       {C.INVALID_ARGUMENT}))
        for label, bad in [("no token", None), ("forged", "frc_1_forged"), ("revoked", revoked),
                           ("id beyond int64", "frc_99999999999999999999999_secret"),
                           ("negative id", "frc_-1_secret"), ("not ours", "Basic abc"),
                           ("7 KiB", "frc_1_" + "x" * 7_000)]:
            metadata = None if bad is None else (("authorization", f"Bearer {bad}"),)
            corpus.append((f"{method}: token {label}", raw(method, kind, b"", metadata), {C.UNAUTHENTICATED}))
        # Metadata beyond gRPC's soft 8 KiB header limit may be refused by gRPC itself, before any handler
        # (at random between the soft and the hard limit, by design).
        corpus.append((f"{method}: token 10 KiB", raw(method, kind, b"", (
            ("authorization", "Bearer frc_1_" + "x" * 10_000),)), {C.UNAUTHENTICATED, C.RESOURCE_EXHAUSTED}))
    check_in = pb.CheckInRequest(task_name=TASK, client_id="hostile", protocol_version=1)
    corpus += [
        ("unknown method", raw("Steal", "unary", b""), {C.UNIMPLEMENTED}),
        ("CheckIn: unknown task", lambda: stub.CheckIn(pb.CheckInRequest(
            task_name="other", client_id="x", protocol_version=1), metadata=good), {C.NOT_FOUND}),
        ("CheckIn: 3 MiB task name", lambda: stub.CheckIn(pb.CheckInRequest(
            task_name="t" * (3 << 20), client_id="x", protocol_version=1), metadata=good), {C.NOT_FOUND}),
        ("CheckIn: protocol 99", lambda: stub.CheckIn(pb.CheckInRequest(
            task_name=TASK, client_id="x", protocol_version=99), metadata=good), {C.FAILED_PRECONDITION}),
        ("CheckIn: 5 MiB message", lambda: stub.CheckIn(pb.CheckInRequest(
            task_name=TASK, client_id="x" * (5 << 20), protocol_version=1), metadata=good),
         {C.RESOURCE_EXHAUSTED}),
        ("CheckIn: valid", lambda: stub.CheckIn(check_in, metadata=good), {C.OK}),
        ("GetLatestModel: unknown task", lambda: stub.GetLatestModel(pb.GetLatestModelRequest(
            task_name="other"), metadata=good), {C.NOT_FOUND}),
        ("GetRound: unknown task", lambda: stub.GetRound(pb.GetRoundRequest(
            task_name="other", round_id=1), metadata=good), {C.NOT_FOUND}),
        ("GetRound: unknown round", lambda: stub.GetRound(pb.GetRoundRequest(
            task_name=TASK, round_id=2**62), metadata=good), {C.NOT_FOUND}),
        ("GetRound: negative round id", lambda: stub.GetRound(pb.GetRoundRequest(
            task_name=TASK, round_id=-(2**63)), metadata=good), {C.NOT_FOUND}),
        ("DownloadModel: unknown version", lambda: list(stub.DownloadModel(pb.DownloadModelRequest(
            task_name=TASK, model_version=7), metadata=good)), {C.NOT_FOUND}),
        ("DownloadModel: negative version", lambda: list(stub.DownloadModel(pb.DownloadModelRequest(
            task_name=TASK, model_version=-(2**63)), metadata=good)), {C.NOT_FOUND}),
        ("DownloadModel: 1-byte chunks asked", lambda: list(stub.DownloadModel(pb.DownloadModelRequest(
            task_name=TASK, model_version=0, max_chunk_bytes=1), metadata=good)), {C.OK}),
        ("ReportUpdate: empty stream", lambda: stub.ReportUpdate(iter([]), metadata=good),
         {C.INVALID_ARGUMENT}),
        ("ReportUpdate: chunk first", lambda: stub.ReportUpdate(iter([pb.ReportUpdateRequest(
            chunk=pb.TensorChunk(data=b"x"))]), metadata=good), {C.INVALID_ARGUMENT}),
        ("ReportUpdate: no assignment", lambda: stub.ReportUpdate(_report(round_id=2**62), metadata=good),
         {C.FAILED_PRECONDITION}),
    ]
    for label, values in [("NaN", (math.nan, 1.0, 2.0)), ("negative", (-1.0, 0.0, 1.0)),
                          ("1e308", (1e308, 1e308, 1e308)), ("beyond int64", (1.0, 1.0, 1e30)),
                          ("correct > examples", (1.0, 5.0, 2.0))]:
        request = pb.ReportEvaluationRequest(task_name=TASK, client_id="e", model_version=0,
                                             squared_error=values[0], num_correct=values[1],
                                             num_examples=values[2])
        # Point 7 of issue 10 (evaluation bounds) is another change: until it lands, an absurd count that
        # the store cannot hold is INTERNAL; either way never UNKNOWN.
        corpus.append((f"ReportEvaluation: {label}",
                       lambda request=request: stub.ReportEvaluation(request, metadata=good),
                       {C.INVALID_ARGUMENT, C.OK, C.INTERNAL}))
    return corpus


def _report(round_id: int) -> Any:
    delta = [np.zeros((6, 2), np.float32)]
    header = pb.ReportHeader(task_name=TASK, client_id="hostile", round_id=round_id, assignment_token="t",
                             weight=1.0, manifest=manifest(["item_embedding"], delta))
    return iter([pb.ReportUpdateRequest(header=header),
                 *(pb.ReportUpdateRequest(chunk=c) for c in chunks(delta, 16))])


def test_the_hostile_corpus_gets_documented_statuses_and_never_unknown(store_url: str) -> None:
    with SqlStore(store_url) as store:
        _, token = issue_token(store, "device")
        revoked_id, revoked = issue_token(store, "gone")
        store.revoke_credential(revoked_id)
        auth = TokenAuthInterceptor(store)
        with start_server(Coordinator(store, _task()), interceptors=[auth]) as server, \
                grpc.insecure_channel(server.address) as channel:
            seen = {}
            for name, call, allowed in _hostile_corpus(channel, token, revoked):
                try:
                    call()
                    code = C.OK
                except grpc.RpcError as err:
                    code = err.code()  # type: ignore[attr-defined]
                    assert len(err.details() or "") <= 1000, name  # type: ignore[attr-defined]
                seen[name] = (code, allowed)
            assert server.coordinator.version == 0
    assert len(seen) > 60
    assert not [name for name, (code, _) in seen.items() if code == C.UNKNOWN]
    assert {name: code.name for name, (code, allowed) in seen.items() if code not in allowed} == {}


class _Counting(grpc.aio.ServerInterceptor):
    """Counts the calls that reach the server, before any other interceptor can refuse them."""

    def __init__(self) -> None:
        self.calls = 0

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        self.calls += 1
        return await continuation(handler_call_details)


def test_a_store_outage_behind_the_token_check_is_unavailable_with_a_hint_and_clients_wait_for_it(
        postgres_url: str, pg_outage: Any) -> None:
    hint_ms = 800
    with SqlStore(postgres_url) as store:
        _, token = issue_token(store, "device")
        counting = _Counting()
        auth = TokenAuthInterceptor(store, cache_s=0.0, retry_hint_ms=hint_ms)
        with start_server(Coordinator(store, _task()), interceptors=[counting, auth]) as server:
            stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(server.address))
            metadata = (("authorization", f"Bearer {token}"),)
            pg_outage.start()
            try:
                with pytest.raises(grpc.RpcError) as caught:
                    stub.GetLatestModel(pb.GetLatestModelRequest(task_name=TASK), metadata=metadata,
                                        timeout=30)
                assert caught.value.code() == C.UNAVAILABLE, caught.value
                assert retry_after_ms(caught.value.trailing_metadata()) == hint_ms
                # The library retries UNAVAILABLE, never sooner than hinted: its own backoff would have
                # tried about every 10 ms.
                impatient = RetryPolicy(initial_s=0.005, max_s=0.01, give_up_after_s=60)
                client = CoordinatorChannel(server.address, token=token, retry=impatient)
                outage_s = 3.0
                threading.Timer(outage_s, pg_outage.end).start()
                before, started = counting.calls, time.monotonic()
                assert client.latest_model(TASK).model_version == 0
                elapsed, attempts = time.monotonic() - started, counting.calls - before
            finally:
                pg_outage.end()
    assert elapsed >= outage_s - 0.5
    assert 2 <= attempts <= outage_s / (hint_ms / 1000) + 2, attempts


@pytest.mark.parametrize("error", [StoreUnavailable("down"), StoreError("constraint"), RuntimeError("bug")])
def test_store_errors_map_by_kind(error: Exception) -> None:
    """Only connectivity is an outage: any other store error (a future ``StoreFault`` too, being a
    ``StoreError``) is INTERNAL and carries no retry hint."""
    status = status_of(error, retry_hint_ms=500)
    if isinstance(error, StoreUnavailable):
        assert status.code == C.UNAVAILABLE and retry_after_ms(status.trailing) == 500
    else:
        assert status.code == C.INTERNAL and not status.trailing and "constraint" not in status.details
