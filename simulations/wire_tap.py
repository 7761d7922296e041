"""A loopback TCP relay that records what clients send, and counts what they receive, per connection.

``WireTap`` listens on 127.0.0.1 (a free port) and forwards each connection to a coordinator on 127.0.0.1,
keeping every byte of the client-to-server direction and counting every byte of the server-to-client
direction, per connection. It measures what is really on the wire (HTTP/2 frames, gRPC framing, headers,
every call a client makes), where the client library's own counters only add up serialized message sizes.
``tests/test_locals_stay_home.py`` searches the sent bytes for local variables;
``benchmarks/compression_table.py`` counts them per client; ``benchmarks/nwp_table.py`` counts both
directions (upload and download). Loopback only, by design.
"""

from __future__ import annotations

import contextlib
import socket
import threading

import grpc


class WireTap:
    """A relay to ``127.0.0.1:target_port``; ``address`` is where clients connect instead."""

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sent: list[bytearray] = []  # per connection, in the order they were accepted
        self._received: list[list[int]] = []  # per connection: [bytes the server sent to the client]
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, name="wire-tap", daemon=True)]
        self._threads[0].start()

    def device_channel(self, max_message_bytes: int = 4 << 20) -> grpc.Channel:
        """A gRPC channel to the relay on a TCP connection of its own, as each device has: channels in one
        process otherwise share a connection, and the per-connection counts would mix clients."""
        return grpc.insecure_channel(self.address, options=[
            ("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)])

    def sent(self) -> bytes:
        """Everything clients sent so far, all connections one after another."""
        with self._lock:
            return b"".join(bytes(b) for b in self._sent)

    def sent_per_connection(self) -> list[int]:
        """How many bytes each connection's client sent so far."""
        with self._lock:
            return [len(b) for b in self._sent]

    def received_per_connection(self) -> list[int]:
        """How many bytes each connection's client received from the server so far (only counted, not
        kept), in the same order as ``sent_per_connection``."""
        with self._lock:
            return [count[0] for count in self._received]

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self._target)
            record = bytearray()
            count = [0]
            with self._lock:
                self._sent.append(record)
                self._received.append(count)
                self._sockets += [client, server]
            for src, dst, keep, counter in ((client, server, record, None), (server, client, None, count)):
                t = threading.Thread(target=self._pipe, args=(src, dst, keep, counter), name="wire-tap",
                                     daemon=True)
                t.start()
                self._threads.append(t)

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bytearray | None,
              counter: list[int] | None) -> None:
        try:
            while data := src.recv(1 << 16):
                if record is not None:
                    with self._lock:
                        record += data
                if counter is not None:
                    with self._lock:
                        counter[0] += len(data)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:  # the other side is gone
            pass

    def close(self) -> None:
        with self._lock:
            sockets = [self._listener, *self._sockets]
        for s in sockets:  # shutdown wakes a thread blocked in accept() or recv() on it; close alone may not
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self._threads:
            t.join(timeout=10)

    def __enter__(self) -> WireTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
