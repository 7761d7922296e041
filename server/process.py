"""``fedrecon serve`` as a child process, and a TCP relay to its database that can be cut: for tests,
benchmarks and drills that must kill, restart, cut off and measure a real coordinator (its pid is the
serving Python process itself, not a wrapper)."""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path


class CoordinatorProcess:
    """Starts ``python -m fedrecon.cli serve`` and waits until it listens (it writes its port to a file)."""

    def __init__(self, task_file: Path, store_url: str, workdir: Path, *, port: int = 0,
                 name: str = "coordinator", extra_args: Sequence[str] = (), timeout_s: float = 60.0) -> None:
        port_file = workdir / f"{name}.port"
        port_file.unlink(missing_ok=True)
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed when the process ends: stop/kill)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedrecon.cli", "serve", "--task", str(task_file), "--store", store_url,
             "--host", "127.0.0.1", "--port", str(port), "--port-file", str(port_file), *extra_args],
            stdout=self._log, stderr=subprocess.STDOUT)
        give_up = time.monotonic() + timeout_s
        while not port_file.exists():  # serve writes the file whole (rename), once listening
            if self.proc.poll() is not None or time.monotonic() > give_up:
                self.stop()
                raise RuntimeError(f"the coordinator did not start:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        self.address = f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        """What the process printed so far (also after ``stop``/``kill``)."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (a graceful shutdown) and wait; SIGKILL if it does not end in time. The exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> int:
        """SIGKILL, as a crash: nothing in the process gets to run."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log.close()
        return self.proc.returncode


class StoreRelay:
    """A TCP relay 127.0.0.1:<port> -> the database server, that the drill can cut and heal.

    ``cut("partition")`` stops carrying bytes both ways (sent bytes wait in the relay and arrive when it
    heals, as TCP retransmits across a healed network partition; new connections are accepted and hang);
    ``cut("reset")`` closes every connection and refuses new ones at once (a crashed proxy);
    ``cut("mid_pipeline")`` is a partition that starts only once a client has sent the server an Execute
    with no Sync after it yet (see `cut_mid_pipeline`)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._reset = False
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._mid_pipeline: threading.Event | None = None  # armed by cut_mid_pipeline, set once cut
        threading.Thread(target=self._accept, name=f"relay-{self.port}", daemon=True).start()

    def cut(self, mode: str) -> None:
        if mode == "mid_pipeline":
            self.cut_mid_pipeline()
            return
        with self._lock:
            self._flowing.clear()
            self._reset = mode == "reset"
            if self._reset:
                for s in self._sockets:
                    _close(s)
                self._sockets.clear()

    def cut_mid_pipeline(self) -> threading.Event:
        """Cut as a partition the moment a connection's client has sent the server an Execute that no Sync
        follows yet: psycopg's ``executemany`` pipelines its rows with one Sync at the end, so the server
        ran the first row and waits for the rest, outside PostgreSQL's idle-in-transaction timeout (which
        it arms only after a Sync). Needs the protocol in clear text (``sslmode=disable``). The event is
        set once the relay is cut."""
        with self._lock:
            self._mid_pipeline = threading.Event()
            return self._mid_pipeline

    def heal(self) -> None:
        with self._lock:
            self._reset = False
            self._mid_pipeline = None
            self._flowing.set()

    def close(self) -> None:
        _close(self._listener)
        self.heal()
        with self._lock:
            for s in self._sockets:
                _close(s)

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._reset:
                    _close(downstream)
                    continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                _close(downstream)
                continue
            with self._lock:
                self._sockets |= {downstream, upstream}
            for src, dst, messages in ((downstream, upstream, _ClientMessages()),
                                       (upstream, downstream, None)):
                threading.Thread(target=self._pump, args=(src, dst, messages), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, messages: _ClientMessages | None) -> None:
        try:
            while data := src.recv(65536):
                self._flowing.wait()  # a partition: the bytes wait here until it heals
                dst.sendall(data)
                if messages is not None and messages.feed(data):
                    with self._lock:
                        armed = self._mid_pipeline
                        if armed is not None and not armed.is_set():
                            self._flowing.clear()
                            armed.set()
        except OSError:
            pass
        finally:
            for s in (src, dst):
                _close(s)
            with self._lock:
                self._sockets -= {src, dst}


def _close(s: socket.socket) -> None:
    with suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()


_UNTYPED_REQUESTS = frozenset({80877103, 80877104})  # SSLRequest, GSSENCRequest: 8 bytes, before startup


class _ClientMessages:
    """The client-to-server half of a PostgreSQL connection cut into its messages (the framing only: a type
    byte and a length; the startup packet and the requests before it have no type byte), to tell whether
    the server was sent an Execute that no Sync followed yet."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._started = False
        self.execute_pending = False

    def feed(self, data: bytes) -> bool:
        """Take the next bytes the client sent; whether an Execute now waits for its Sync."""
        self._buffer += data
        while True:
            if not self._started:
                if len(self._buffer) < 8:
                    break
                length, code = struct.unpack("!ii", self._buffer[:8])
                if len(self._buffer) < length:
                    break
                del self._buffer[:length]
                self._started = code not in _UNTYPED_REQUESTS
                continue
            if len(self._buffer) < 5:
                break
            kind, length = self._buffer[0], struct.unpack("!i", self._buffer[1:5])[0]
            if len(self._buffer) < 1 + length:
                break
            del self._buffer[:1 + length]
            if kind == ord("E"):
                self.execute_pending = True
            elif kind == ord("S"):
                self.execute_pending = False
        return self.execute_pending
