"""The loopback relay counts both directions per connection: what a client sent (kept) and what it
received (counted), checked against a server whose answers have sizes fixed by hand."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from fedrecon.simulations.wire_tap import WireTap


def _server() -> tuple[socket.socket, threading.Thread]:
    """Answers every connection's request of n bytes with 3·n bytes, then closes it."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                request = conn.recv(1 << 16)
                conn.sendall(b"x" * (3 * len(request)))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def test_sent_and_received_bytes_per_connection() -> None:
    listener, thread = _server()
    try:
        with WireTap(listener.getsockname()[1]) as tap:
            host, port = tap.address.split(":")
            for size in (10, 1000):
                with socket.create_connection((host, int(port))) as client:
                    client.sendall(b"a" * size)
                    got = b""
                    while len(got) < 3 * size:
                        got += client.recv(1 << 16)
            deadline = time.monotonic() + 5
            while tap.received_per_connection() != [30, 3000] and time.monotonic() < deadline:
                time.sleep(0.01)
            assert tap.sent_per_connection() == [10, 1000]
            assert tap.received_per_connection() == [30, 3000]
            assert tap.sent() == b"a" * 1010
    finally:
        with contextlib.suppress(OSError):  # wakes the accept() blocked in the server thread
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(timeout=5)
