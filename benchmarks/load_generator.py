"""A lightweight load generator for the coordinator: clients that do no training.

Why: with real clients (``coordinator_load.py`` without ``--lightweight``) the clients' TensorFlow work
shares the machine with the coordinator and bounds every figure. Here each generator *process* runs a few
threads that play many clients one after the other through the real gRPC calls (check-in, model
download, report), sending an update that was encoded once, up front: the report's tensor chunks are
serialized ``ReportUpdateRequest`` bytes made before the run, and only the small header (the client's
id, round and assignment token) is serialized per report. Downloads are read as raw bytes and counted,
not decoded. The cost left on the generator side is gRPC's own, so the coordinator is what is measured.

The parent drives the processes phase by phase through queues (``Generator``): every client of the
round checks in and downloads (``select``), then the reporting clients report (``report``); stragglers
were assigned and downloaded but never report. The coordinator's CPU is read between phases, so the
report phase is measured alone.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc
import numpy as np

from fedrecon.core.compression import UploadCodec, encode_update
from fedrecon.protocol import PROTOCOL_VERSION
from fedrecon.tensors import DEFAULT_CHUNK_BYTES, TensorLayout, chunks, manifest
from fedrecon.update_encoding import payload_arrays, tensor_encoding
from fedrecon.v1 import coordinator_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
RPC_TIMEOUT_S = 600.0
MAX_CHECK_IN_TRIES = 10_000  # retry windows while a round is being opened or committed


@dataclass(frozen=True)
class PreparedUpdate:
    """One update, encoded once: the header's manifest and encodings, and the serialized chunk messages."""

    manifest: bytes  # a serialized TensorManifest
    encodings: tuple[bytes, ...]  # serialized TensorEncoding messages (empty: plain float32)
    chunk_messages: tuple[bytes, ...]  # serialized ReportUpdateRequest(chunk=...) messages
    weight: float
    metrics: Mapping[str, float]

    @property
    def payload_bytes(self) -> int:
        return sum(len(m) for m in self.chunk_messages)


def realistic_delta(layouts: Sequence[TensorLayout], rng: np.random.Generator, *, touched_rows: int = 150,
                    scale: float = 0.01) -> list[np.ndarray]:
    """A delta shaped like a real FedRecon client's: rows of the items it trained on are non-zero (a real
    MovieLens client has up to 300 ratings, half of them in the post-reconstruction half), every other row
    exactly zero; small values (norm well under the default clip bound)."""
    out = []
    for layout in layouts:
        delta = np.zeros(layout.shape, np.float32)
        if layout.shape:
            rows = rng.choice(layout.shape[0], size=min(touched_rows, layout.shape[0]), replace=False)
            delta[rows] = rng.normal(0.0, scale, size=(len(rows), *layout.shape[1:]))
        else:
            delta[...] = rng.normal(0.0, scale)
        out.append(delta)
    return out


def prepare_update(layouts: Sequence[TensorLayout], delta: Sequence[np.ndarray], codec: UploadCodec, *,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES, weight: float = 50.0,
                   rng: np.random.Generator | None = None) -> PreparedUpdate:
    """Encode ``delta`` once as a client sending with ``codec`` would (``client.transport.report``)."""
    names = [layout.name for layout in layouts]
    payload: Sequence[np.ndarray] = delta
    encodings: list[pb.TensorEncoding] = []
    if codec != UploadCodec.NONE:
        encoded = encode_update(delta, codec, rng if rng is not None else np.random.default_rng(0))
        encodings = [tensor_encoding(e) for e in encoded]
        payload = payload_arrays(encoded)
    messages = tuple(pb.ReportUpdateRequest(chunk=c).SerializeToString()
                     for c in chunks(payload, chunk_bytes))
    return PreparedUpdate(manifest(names, delta).SerializeToString(),
                          tuple(e.SerializeToString() for e in encodings), messages, weight,
                          {"loss": 1.0, "post_recon_examples": weight})


# ----- inside a generator process ----------------------------------------------------------------------
class _Client:
    """The calls one generator thread makes, over its own channel (its own TCP connection)."""

    def __init__(self, address: str, index: int) -> None:
        options = [("grpc.max_receive_message_length", 4 * DEFAULT_CHUNK_BYTES),
                   ("grpc.max_send_message_length", 4 * DEFAULT_CHUNK_BYTES),
                   ("fedrecon.load.channel", index)]  # distinct arguments: a connection of its own
        self.channel = grpc.insecure_channel(address, options=options)
        self.check_in = self.channel.unary_unary(f"/{SERVICE}/CheckIn",
                                                 request_serializer=pb.CheckInRequest.SerializeToString,
                                                 response_deserializer=pb.CheckInResponse.FromString)
        self.download = self.channel.unary_stream(f"/{SERVICE}/DownloadModel",
                                                  request_serializer=pb.DownloadModelRequest.SerializeToString,
                                                  response_deserializer=None)  # raw bytes: counted only
        self.report = self.channel.stream_unary(f"/{SERVICE}/ReportUpdate", request_serializer=None,
                                                response_deserializer=pb.ReportUpdateResponse.FromString)


def _select(client: _Client, task: str, client_id: str) -> tuple[pb.Assignment, int, int]:
    """Check in until assigned, then download the round's model: (assignment, bytes downloaded, retries)."""
    request = pb.CheckInRequest(task_name=task, client_id=client_id, protocol_version=PROTOCOL_VERSION)
    for retries in range(MAX_CHECK_IN_TRIES):
        response = client.check_in(request, timeout=RPC_TIMEOUT_S)
        if response.WhichOneof("outcome") == "assignment":
            a = response.assignment
            stream = client.download(pb.DownloadModelRequest(task_name=task, model_version=a.model_version,
                                                             client_id=client_id), timeout=RPC_TIMEOUT_S)
            return a, sum(len(m) for m in stream), retries
        time.sleep(response.retry.delay_min.ToNanoseconds() / 1e9)
    raise RuntimeError(f"{client_id} was never assigned")


def _report(client: _Client, client_id: str, a: pb.Assignment, update: PreparedUpdate) -> bool:
    header = pb.ReportHeader(task_name=a.task_name, client_id=client_id, round_id=a.round_id,
                             assignment_token=a.assignment_token, weight=update.weight,
                             metrics=dict(update.metrics),
                             manifest=pb.TensorManifest.FromString(update.manifest),
                             encodings=[pb.TensorEncoding.FromString(e) for e in update.encodings])

    def messages() -> Iterator[bytes]:
        yield pb.ReportUpdateRequest(header=header).SerializeToString()
        yield from update.chunk_messages

    return bool(client.report(messages(), timeout=RPC_TIMEOUT_S).accepted)


def _report_as(client: Callable[[], _Client], assignments: Mapping[str, pb.Assignment],
               updates: Sequence[PreparedUpdate], client_id: str) -> bool:
    return _report(client(), client_id, assignments[client_id], updates[_index(client_id) % len(updates)])


def _serve_commands(address: str, task: str, threads: int, first_channel: int,
                    updates: Sequence[PreparedUpdate], commands: Any, results: Any) -> None:
    """A generator process: runs each command on ``threads`` threads (a client each at a time)."""
    local = threading.local()
    counter = iter(range(first_channel, first_channel + threads))
    lock = threading.Lock()
    clients: list[_Client] = []

    def client() -> _Client:
        if not hasattr(local, "client"):
            with lock:
                local.client = _Client(address, next(counter))
                clients.append(local.client)
        return local.client

    assignments: dict[str, pb.Assignment] = {}
    with ThreadPoolExecutor(max_workers=threads) as pool:
        while True:
            command, ids = commands.get()
            if command == "stop":
                break
            try:
                if command == "select":
                    done = list(pool.map(lambda i: (i, *_select(client(), task, i)), ids))
                    assignments = {i: a for i, a, _, _ in done}
                    results.put(("selected", len(done), sum(d for _, _, d, _ in done),
                                 sum(r for _, _, _, r in done)))
                elif command == "report":
                    accepted = list(pool.map(
                        partial(_report_as, client, assignments, updates), ids))
                    results.put(("reported", accepted.count(True), accepted.count(False), 0))
            except Exception as err:  # the parent reports it and stops the run
                results.put(("error", repr(err), 0, 0))
    for c in clients:
        c.channel.close()


def _index(client_id: str) -> int:
    """The number in a generated id (``load-17`` -> 17): which prepared update the client sends."""
    return int(client_id.rpartition("-")[2])


class Generator:
    """``processes`` generator processes of ``threads`` threads each, driven phase by phase."""

    def __init__(self, address: str, task: str, updates: Sequence[PreparedUpdate], *, processes: int = 2,
                 threads: int = 8) -> None:
        ctx = mp.get_context("spawn")  # no fork of a process that holds gRPC state
        self.processes = processes
        self._commands = [ctx.Queue() for _ in range(processes)]
        self._results = ctx.Queue()
        self._procs = [ctx.Process(target=_serve_commands, daemon=True, name=f"load-generator-{p}",
                                   args=(address, task, threads, p * threads, list(updates),
                                         self._commands[p], self._results))
                       for p in range(processes)]
        for proc in self._procs:
            proc.start()

    def _run(self, command: str, ids: Sequence[str], timeout_s: float) -> tuple[int, int, int]:
        """Send each process its share of ``ids``; the summed figures of their answers."""
        shares = [list(ids[p::self.processes]) for p in range(self.processes)]
        for q, share in zip(self._commands, shares, strict=True):
            q.put((command, share))
        totals = [0, 0, 0]
        for _ in range(self.processes):
            try:
                kind, a, b, c = self._results.get(timeout=timeout_s)
            except queue.Empty:
                raise RuntimeError(f"the generator did not finish {command!r} within {timeout_s:g} s"
                                   ) from None
            if kind == "error":
                raise RuntimeError(f"a generator process failed in {command!r}: {a}")
            totals = [totals[0] + a, totals[1] + b, totals[2] + c]
        return totals[0], totals[1], totals[2]

    def select(self, ids: Sequence[str], timeout_s: float = 3600.0) -> tuple[int, int, int]:
        """Check in and download for every id: (assigned, bytes downloaded, retry windows waited)."""
        return self._run("select", ids, timeout_s)

    def report(self, ids: Sequence[str], timeout_s: float = 3600.0) -> tuple[int, int]:
        """Report for every id (each must have been selected in this round): (accepted, not accepted)."""
        accepted, refused, _ = self._run("report", ids, timeout_s)
        return accepted, refused

    def close(self) -> None:
        for q in self._commands:
            q.put(("stop", []))
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
