"""Streams that stall cannot starve the coordinator (issue 10, point 4), over real gRPC on loopback.

Idle report streams hold no thread (the servicer runs on an event loop), have their own slots (unary calls
never wait for them), are capped per credential, and are ended by their time budgets: the first message,
each gap between messages, the whole report; a download that is not read is ended too. Every such end is
RESOURCE_EXHAUSTED (not DEADLINE_EXCEEDED, which clients take for their own timeout and retry).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedrecon.protocol import retry_after_ms
from fedrecon.server.app import RunningServer, start_server
from fedrecon.server.auth import TokenAuthInterceptor, issue_token
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.limits import Keepalive, ServerLimits
from fedrecon.server.store import SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec
from fedrecon.tensors import chunks, manifest
from fedrecon.v1 import coordinator_pb2 as pb
from fedrecon.v1 import coordinator_pb2_grpc as pb_grpc

IDLE = 200
CHECK_INS = 100


def _task(num_items: int = 50) -> TaskSpec:
    return TaskSpec(name="streams", model={"kind": "matrix_factorization", "num_items": num_items,
                                           "num_factors": 4},
                    rounds=RoundSettings(clients_per_round=1000, min_reports=1, selection_timeout_s=600,
                                         reporting_timeout_s=600, max_check_ins_per_minute=1e6))


@dataclass(frozen=True)
class Ended:
    code: grpc.StatusCode
    details: str
    retry_after_ms: int | None
    seconds: float  # from opening the stream to its end


def _hold_idle_streams(address: str, n: int, token: str | None) -> Future[list[Ended]]:
    """Open ``n`` ReportUpdate streams that never send a message (from a grpc.aio client on its own loop,
    so holding them costs the test no thread each); the future gives how each one ended."""
    result: Future[list[Ended]] = Future()
    metadata = (("authorization", f"Bearer {token}"),) if token else None

    async def hold() -> list[Ended]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.CoordinatorStub(channel)

            async def one() -> Ended:
                opened = time.monotonic()
                call = stub.ReportUpdate(metadata=metadata, timeout=300)
                try:
                    await call
                except grpc.aio.AioRpcError as err:
                    return Ended(err.code(), err.details() or "", retry_after_ms(err.trailing_metadata()),
                                 time.monotonic() - opened)
                raise AssertionError("an idle report stream was answered")

            return await asyncio.gather(*(one() for _ in range(n)))

    def run() -> None:
        try:
            result.set_result(asyncio.run(hold()))
        except BaseException as err:
            result.set_exception(err)

    threading.Thread(target=run, name="idle-streams", daemon=True).start()
    return result


def _wait_for(condition: object, timeout_s: float, what: str) -> None:
    give_up = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > give_up:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.02)


def _check_in_latencies(stub: pb_grpc.CoordinatorStub, metadata: Sequence[tuple[str, str]] | None
                        ) -> list[float]:
    latencies = []
    for i in range(CHECK_INS):
        started = time.monotonic()
        answer = stub.CheckIn(pb.CheckInRequest(task_name="streams", client_id=f"honest-{i}",
                                                protocol_version=1), metadata=metadata, timeout=10)
        latencies.append(time.monotonic() - started)
        assert answer.WhichOneof("outcome") in ("assignment", "retry")
    return latencies


def _p99(values: list[float]) -> float:
    return float(np.percentile(values, 99))


@pytest.mark.parametrize("mode", ["trusted", "token"])
def test_idle_report_streams_do_not_starve_check_ins(tmp_path: Path, mode: str) -> None:
    """200 report streams that never send a byte: honest check-ins are answered in well under a second
    meanwhile, and the idle streams are ended by the first-message budget (or, from one token holder, all
    but two are refused at once)."""
    first_message_s = 15.0  # long enough to open all 200 and measure on a busy machine
    limits = ServerLimits(max_report_streams=256, first_message_s=first_message_s)
    with SqlStore(f"sqlite:///{tmp_path / 's.db'}") as store:
        interceptors = [TokenAuthInterceptor(store)] if mode == "token" else []
        _, attacker = issue_token(store, "attacker")
        _, honest = issue_token(store, "honest")
        with start_server(Coordinator(store, _task()), limits=limits, interceptors=interceptors) as server:
            held = 2 if mode == "token" else IDLE  # the default cap per credential
            idle = _hold_idle_streams(server.address, IDLE, attacker if mode == "token" else None)
            _wait_for(lambda: server.servicer.streams_open()["reports"] == held, 90, f"{held} streams held")
            with grpc.insecure_channel(server.address) as channel:
                latencies = _check_in_latencies(
                    pb_grpc.CoordinatorStub(channel),
                    (("authorization", f"Bearer {honest}"),) if mode == "token" else None)
                assert server.servicer.streams_open()["reports"] == held  # measured while all were held
            ended = idle.result(timeout=first_message_s + 60)
            _wait_for(lambda: server.servicer.streams_open()["reports"] == 0, 60, "every slot given back")
    print(f"\n{mode}: honest check-in p99 {_p99(latencies) * 1000:.1f} ms, max "
          f"{max(latencies) * 1000:.1f} ms with {held} idle report streams held")
    assert _p99(latencies) < 1.0, sorted(latencies)[-5:]
    assert all(e.code == grpc.StatusCode.RESOURCE_EXHAUSTED for e in ended), {e.code for e in ended}
    stalled = [e for e in ended if "no report header" in e.details]
    refused = [e for e in ended if "no free slot" in e.details]
    assert (len(stalled), len(refused)) == (held, IDLE - held)
    assert all(e.retry_after_ms is None for e in stalled)  # a stalled stream is not invited back
    assert all(e.retry_after_ms == limits.retry_hint_ms for e in refused)
    assert all(first_message_s - 0.5 <= e.seconds <= first_message_s + 30 for e in stalled)
    assert all(e.seconds < first_message_s for e in refused)


def _server(tmp_path: Path, limits: ServerLimits, num_items: int = 50, **options: object
            ) -> tuple[SqlStore, RunningServer]:
    store = SqlStore(f"sqlite:///{tmp_path / 's.db'}")
    return store, start_server(Coordinator(store, _task(num_items)), limits=limits, **options)  # type: ignore[arg-type]


def _header(stub: pb_grpc.CoordinatorStub, client: str, delta: np.ndarray) -> pb.ReportUpdateRequest:
    a = stub.CheckIn(pb.CheckInRequest(task_name="streams", client_id=client, protocol_version=1),
                     timeout=10).assignment
    return pb.ReportUpdateRequest(header=pb.ReportHeader(
        task_name="streams", client_id=client, round_id=a.round_id, assignment_token=a.assignment_token,
        weight=1.0, manifest=manifest(["item_embedding"], [delta])))


def test_a_report_that_stalls_between_chunks_or_trickles_is_ended(tmp_path: Path) -> None:
    limits = ServerLimits(chunk_gap_s=1.0, report_s=3.0)
    store, server = _server(tmp_path, limits)
    delta = np.zeros((50, 4), np.float32)
    pieces = [pb.ReportUpdateRequest(chunk=c) for c in chunks([delta], 16)]  # 50 chunks
    try:
        stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(server.address))

        def stalls() -> Iterator[pb.ReportUpdateRequest]:
            yield _header(stub, "staller", delta)
            yield pieces[0]
            time.sleep(limits.chunk_gap_s + 3)  # the server gives up first
            yield from pieces[1:]

        def trickles() -> Iterator[pb.ReportUpdateRequest]:  # every gap within budget, the whole not
            yield _header(stub, "trickler", delta)
            for piece in pieces:
                time.sleep(limits.chunk_gap_s / 4)
                yield piece

        for stream, expected in ((stalls, "no message for 1 s"), (trickles, "report budget 3 s")):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                stub.ReportUpdate(stream(), timeout=60)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value
            assert expected in caught.value.details() and time.monotonic() - started < 30
        assert server.coordinator.reports_accepted == 0
        honest = stub.ReportUpdate(iter([_header(stub, "honest", delta), *pieces]), timeout=30)
        assert honest.accepted
    finally:
        server.stop()
        store.close()


def test_a_download_that_is_not_read_is_ended_and_frees_its_slot(tmp_path: Path) -> None:
    """A model of 2.6 MB does not fit in the connection's flow-control windows (64 KiB while the client
    does not let them grow): a client that reads one message and stops would hold the server's write for
    ever without ``download_s``."""
    store, server = _server(tmp_path, ServerLimits(download_s=2.0), num_items=40_000)
    try:
        channel = grpc.insecure_channel(server.address, options=[("grpc.http2.bdp_probe", 0)])
        stub = pb_grpc.CoordinatorStub(channel)
        stream = stub.DownloadModel(pb.DownloadModelRequest(task_name="streams", model_version=0,
                                                            max_chunk_bytes=64 * 1024), timeout=120)
        next(stream)
        _wait_for(lambda: server.servicer.streams_open()["downloads"] == 0, 30, "the stalled download ended")
        with pytest.raises(grpc.RpcError) as caught:
            for _ in stream:
                pass
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "not read within 2 s" in caught.value.details()
        whole = list(stub.DownloadModel(pb.DownloadModelRequest(task_name="streams", model_version=0),
                                        timeout=60))
        assert sum(len(m.chunk.data) for m in whole) == 40_000 * 4 * 4
    finally:
        server.stop()
        store.close()


def test_idle_connections_are_closed_by_the_server(tmp_path: Path) -> None:
    """``Keepalive.max_idle_s``: a connection with no call for that long is closed by the server (the
    client's channel drops from READY to IDLE and reconnects on its next call)."""
    store, server = _server(tmp_path, ServerLimits(), keepalive=Keepalive(max_idle_s=0.5))
    try:
        channel = grpc.insecure_channel(server.address)
        states: list[grpc.ChannelConnectivity] = []
        channel.subscribe(states.append)
        stub = pb_grpc.CoordinatorStub(channel)
        latest = pb.GetLatestModelRequest(task_name="streams")
        assert stub.GetLatestModel(latest, timeout=10).model_version == 0
        # Connectivity changes reach the callback asynchronously, starting with the channel's first IDLE.
        _wait_for(lambda: grpc.ChannelConnectivity.READY in states, 30, "the channel connected")
        _wait_for(lambda: states[-1] == grpc.ChannelConnectivity.IDLE, 30, "the server closed the connection")
        assert stub.GetLatestModel(latest, timeout=10).model_version == 0
        channel.close()
    finally:
        server.stop()
        store.close()


def test_a_version_is_encoded_once_when_its_first_downloads_arrive_together(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A round's first downloads all miss the cache at once: one encodes the version, the others wait for
    it and get the same messages (each encoding only starts once every caller has arrived, so without the
    single encoder every caller would encode)."""
    from fedrecon.server import servicer as servicer_module

    callers = 8
    encodings: list[int] = []
    arrived, everyone = [0], threading.Event()
    lock = threading.Lock()
    real = servicer_module._encoded

    def counted(*args: object) -> list[bytes]:
        encodings.append(1)
        assert everyone.wait(timeout=120)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(servicer_module, "_encoded", counted)
    with SqlStore(f"sqlite:///{tmp_path / 's.db'}") as store:
        servicer = servicer_module.CoordinatorServicer(Coordinator(store, _task()))

        def download() -> list[bytes]:
            with lock:
                arrived[0] += 1
                if arrived[0] == callers:
                    everyone.set()
            return servicer._download_messages("streams", 0, servicer.max_chunk_bytes)

        with ThreadPoolExecutor(max_workers=callers) as pool:
            streams = list(pool.map(lambda _: download(), range(callers)))
    assert len(encodings) == 1
    assert all(s is streams[0] for s in streams) and len(streams[0]) >= 2  # the manifest, then chunks
