"""Transport floor: what receiving one 738 KB report costs a server process, by transport, doing no work.

    python benchmarks/transport_floor.py --calls 800 --repeats 3 --out benchmarks/results/transport_floor.json

Why: the coordinator's target is at most 1 ms of CPU per 737,486-byte MovieLens report, and
``coordinator_load.py --lightweight`` shows a bare ``grpc.aio`` server (``grpc_floor``) already costing about
that much. This script says how much of that is the transport and how far below it one could go: each
server below runs in its own process, receives the same bytes from the same client threads and discards
them, and its process CPU (user + system, ``/proc/<pid>/stat``) per call is the figure. The variants run
interleaved, ``--repeats`` times each, so a change in the machine's load touches them all alike:

- ``grpc_aio_stream``: the coordinator's call: a ``grpc.aio`` server with the coordinator's options
  (``server.app.server_options``), a client-streaming call of the messages a report sends (a 300-byte
  header, then the chunks of the item embeddings, the item biases and the global bias), read with
  ``context.read()`` to the end (what ``grpc_floor`` does).
- ``grpc_aio_unary``: the same bytes as one unary request (header and update in one message).
- ``grpc_aio_empty``: a unary call of 300 bytes: what any call costs before its payload.
- ``grpc_sync_stream``: the stream of ``grpc_aio_stream`` on gRPC's synchronous server (a thread pool).
- ``tcp_socket``: a plain TCP connection on an asyncio loop: a length prefix, then the bytes, received
  straight into a buffer allocated once per connection (``asyncio.BufferedProtocol``), and a one-byte
  answer. What the kernel, one copy and an event loop cost: no framing, no multiplexing, no flow control,
  no call. The reference each ratio is taken against.

Every client thread (``--threads``) has its own connection, as each device has; ``--warmup`` calls per
variant are sent before its CPU is read. A server ends when it is sent SIGTERM or when its standard input
(a pipe from this script) closes, so none outlives a script that was killed. The JSON holds the calls
measured per variant and repeat, each variant's CPU ms per call in every repeat, the median, the median's
ratio to ``tcp_socket``'s, the run's wall time, and the machine (CPUs, load average before and after, the
commit, and this script's SHA-256).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

# A MovieLens ml-1m-2998u report's chunk messages as the load generator sends them (737,464 float32 bytes
# and their framing): the item embeddings (3615 x 50), the item biases (3615), the global bias.
CHUNK_BYTES = (723_008, 14_468, 10)
REPORT_BYTES = sum(CHUNK_BYTES)  # 737,486
HEADER_BYTES = 300  # about a report header's size (task, client, round, token, weight, manifest)
MAX_FRAME_BYTES = 4 << 20  # the largest frame the TCP server takes: gRPC's default message limit
SERVICE = "fedrecon.bench.TransportFloor"
VARIANTS = ("grpc_aio_stream", "grpc_aio_unary", "grpc_aio_empty", "grpc_sync_stream", "tcp_socket")
REFERENCE = "tcp_socket"
_PREFIX = struct.Struct("!I")


# ----- the servers (each in its own process: ``--serve VARIANT``) -------------------------------------------
def _publish(port: int, port_file: Path) -> None:
    """Write the bound port whole (a rename), so the parent never reads half a number."""
    partial = port_file.with_suffix(".tmp")
    partial.write_text(str(port))
    partial.rename(port_file)


def _stop_when_parent_goes(stop: Callable[[], object]) -> None:
    """Call ``stop`` (from a thread of its own) once standard input, a pipe from the parent, closes."""
    def watch() -> None:
        sys.stdin.buffer.read()
        stop()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _handlers(read_stream: Callable[..., Any], unary: Callable[..., Any]) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Stream": grpc.stream_unary_rpc_method_handler(read_stream),
        "Unary": grpc.unary_unary_rpc_method_handler(unary)})


def serve_grpc_aio(port_file: Path) -> None:
    """The coordinator's server: ``grpc.aio`` with its options; reads and discards, answers 2 bytes."""
    async def read_stream(_requests: object, context: grpc.aio.ServicerContext) -> bytes:
        while await context.read() is not grpc.aio.EOF:
            pass
        return b"ok"

    async def unary(_request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
        return b"ok"

    async def main() -> None:
        from fedrecon.server.app import DEFAULT_MAX_MESSAGE_BYTES, server_options

        server = grpc.aio.server(options=server_options(DEFAULT_MAX_MESSAGE_BYTES))
        server.add_generic_rpc_handlers((_handlers(read_stream, unary),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        _stop_when_parent_goes(lambda: loop.call_soon_threadsafe(stop.set))
        _publish(port, port_file)
        await stop.wait()
        await server.stop(grace=1.0)

    asyncio.run(main())


def serve_grpc_sync(port_file: Path) -> None:
    """gRPC's synchronous server (a pool of 8 threads), same options, same handlers."""
    def read_stream(requests: Any, _context: grpc.ServicerContext) -> bytes:
        for _ in requests:
            pass
        return b"ok"

    def unary(_request: bytes, _context: grpc.ServicerContext) -> bytes:
        return b"ok"

    from fedrecon.server.app import DEFAULT_MAX_MESSAGE_BYTES, server_options

    server = grpc.server(ThreadPoolExecutor(8), options=server_options(DEFAULT_MAX_MESSAGE_BYTES))
    server.add_generic_rpc_handlers((_handlers(read_stream, unary),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    _stop_when_parent_goes(stop.set)
    _publish(port, port_file)
    stop.wait()
    server.stop(grace=1.0)


class _FramedReceiver(asyncio.BufferedProtocol):
    """One connection of ``serve_tcp``: the kernel copies each frame straight into one buffer allocated
    per connection (``get_buffer``); a whole frame is answered with one byte."""

    def __init__(self) -> None:
        self.buffer = memoryview(bytearray(MAX_FRAME_BYTES))
        self.need, self.got, self.in_body = _PREFIX.size, 0, False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer[self.got:self.need]

    def buffer_updated(self, nbytes: int) -> None:
        assert self.transport is not None
        self.got += nbytes
        if self.got < self.need:
            return
        if not self.in_body:
            (length,) = _PREFIX.unpack(self.buffer[:_PREFIX.size])
            if not 0 < length <= len(self.buffer):
                self.transport.close()  # empty, or over MAX_FRAME_BYTES: not a frame this server takes
                return
            self.need, self.got, self.in_body = length, 0, True
            return
        self.transport.write(b"k")
        self.need, self.got, self.in_body = _PREFIX.size, 0, False


def serve_tcp(port_file: Path) -> None:
    """A plain TCP server on an asyncio loop (one thread, as ``grpc.aio``'s): a 4-byte length, then that many
    bytes received into a buffer allocated once per connection, and a one-byte answer."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_FramedReceiver, "127.0.0.1", 0)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        _stop_when_parent_goes(lambda: loop.call_soon_threadsafe(stop.set))
        _publish(server.sockets[0].getsockname()[1], port_file)
        await stop.wait()
        server.close()

    asyncio.run(main())


SERVERS = {"grpc_aio_stream": serve_grpc_aio, "grpc_aio_unary": serve_grpc_aio,
           "grpc_aio_empty": serve_grpc_aio, "grpc_sync_stream": serve_grpc_sync, "tcp_socket": serve_tcp}


# ----- the clients (threads of this process) ------------------------------------------------------------
def _caller(variant: str, port: int, index: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """(one call, close) for a client thread of ``variant``, on a connection of its own."""
    header, update = os.urandom(HEADER_BYTES), os.urandom(REPORT_BYTES)
    if variant == "tcp_socket":
        conn = socket.create_connection(("127.0.0.1", port), timeout=60)  # as the gRPC calls' deadline
        framed = _PREFIX.pack(HEADER_BYTES + REPORT_BYTES) + header + update

        def call_tcp() -> None:
            conn.sendall(framed)
            if conn.recv(1) != b"k":
                raise RuntimeError("the TCP server closed the connection")

        return call_tcp, conn.close
    limit = MAX_FRAME_BYTES
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
        ("fedrecon.bench.connection", index)])  # distinct arguments: a connection of its own
    if variant.endswith("_stream"):
        stream = channel.stream_unary(f"/{SERVICE}/Stream")
        ends = list(itertools.accumulate(CHUNK_BYTES, initial=0))
        messages = (header, *(update[a:b] for a, b in itertools.pairwise(ends)))

        def call_stream() -> None:
            stream(iter(messages), timeout=60)

        return call_stream, channel.close
    unary = channel.unary_unary(f"/{SERVICE}/Unary")
    payload = header if variant == "grpc_aio_empty" else header + update

    def call_unary() -> None:
        unary(payload, timeout=60)

    return call_unary, channel.close


def _drive(calls: list[Callable[[], None]], per_thread: int) -> None:
    """Every caller makes ``per_thread`` calls, all threads at once; the first error is raised."""
    def repeat(call: Callable[[], None]) -> None:
        for _ in range(per_thread):
            call()

    with ThreadPoolExecutor(len(calls)) as pool:
        for done in [pool.submit(repeat, call) for call in calls]:
            done.result()


def measured_calls(calls: int, threads: int) -> int:
    """The calls ``measure`` makes for ``calls`` asked: a whole number per thread, at least one each."""
    return max(1, calls // threads) * threads


def measure(variant: str, workdir: Path, *, calls: int, threads: int, warmup: int) -> float:
    """Server CPU ms per call of ``variant`` over ``measured_calls(calls, threads)`` calls (after
    ``warmup``), its server started for this measurement and stopped after it."""
    from coordinator_load import proc_cpu_s  # the parent's only: servers stay lean

    port_file = workdir / f"{variant}.port"
    port_file.unlink(missing_ok=True)
    server = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", variant,
                               "--port-file", str(port_file)], stdin=subprocess.PIPE)
    closers: list[Callable[[], None]] = []
    try:
        give_up = time.monotonic() + 120
        while not port_file.exists():
            if server.poll() is not None or time.monotonic() > give_up:
                raise RuntimeError(f"the {variant} server did not start (exit {server.poll()})")
            time.sleep(0.05)
        port = int(port_file.read_text())
        callers = []
        for k in range(threads):
            call, close = _caller(variant, port, k)
            callers.append(call)
            closers.append(close)
        _drive(callers, max(1, warmup // threads))
        before = proc_cpu_s(server.pid)
        _drive(callers, measured_calls(calls, threads) // threads)
        return 1000 * (proc_cpu_s(server.pid) - before) / measured_calls(calls, threads)
    finally:
        for close in closers:
            close()
        assert server.stdin is not None
        server.stdin.close()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def run(*, calls: int, repeats: int, threads: int, warmup: int, variants: tuple[str, ...],
        workdir: Path) -> dict[str, Any]:
    """Every variant ``repeats`` times, interleaved; the figures as the JSON holds them."""
    import hashlib

    from coordinator_load import code_version

    load_before, started = os.getloadavg(), time.monotonic()
    runs: dict[str, list[float]] = {v: [] for v in variants}
    for k in range(repeats):
        for variant in variants:
            runs[variant].append(measure(variant, workdir, calls=calls, threads=threads, warmup=warmup))
            print(f"  repeat {k + 1}/{repeats} {variant:18s} {runs[variant][-1]:.3f} ms CPU per call",
                  flush=True)
    medians = {v: statistics.median(r) for v, r in runs.items()}
    reference = medians.get(REFERENCE)
    return {
        "payload_bytes": REPORT_BYTES, "header_bytes": HEADER_BYTES, "threads": threads,
        "calls": measured_calls(calls, threads), "seconds": time.monotonic() - started,
        "cpu_ms_per_call": {v: {"runs": runs[v], "median": medians[v],
                                "ratio_vs_tcp_socket": medians[v] / reference if reference else None}
                            for v in variants},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "grpcio": grpc.__version__,
                    "load_average_before": load_before, "load_average_after": os.getloadavg(),
                    "code": code_version(),
                    "script_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()},
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"{'transport':18s} {'server CPU ms per call (median)':>32s} {'runs':>24s} {'vs tcp_socket':>14s}")
    for variant, figures in result["cpu_ms_per_call"].items():
        runs = " / ".join(f"{r:.2f}" for r in figures["runs"])
        ratio = figures["ratio_vs_tcp_socket"]
        print(f"{variant:18s} {figures['median']:32.3f} {runs:>24s} "
              f"{'' if ratio is None else f'{ratio:.1f}x':>14s}")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=800, help="measured calls per variant and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4, help="client threads, a connection each")
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)  # a server process
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        SERVERS[args.serve](args.port_file)
        return None
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # coordinator_load: a sibling script
    with tempfile.TemporaryDirectory(prefix="fedrecon-transport-") as workdir:
        result = run(calls=args.calls, repeats=args.repeats, threads=args.threads, warmup=args.warmup,
                     variants=tuple(args.variants), workdir=Path(workdir))
    print_table(result)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
