"""Starting and stopping a coordinator: a gRPC server around one ``Coordinator`` and a timer for deadlines."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedrecon.server.auth import TokenAuthInterceptor
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.identity import Identifier
from fedrecon.server.servicer import CoordinatorServicer
from fedrecon.tensors import DEFAULT_CHUNK_BYTES
from fedrecon.v1 import coordinator_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 4 * DEFAULT_CHUNK_BYTES
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS. With ``client_ca`` the server also demands a client certificate signed by it
    (mutual TLS)."""

    cert_chain: Path
    private_key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key.read_bytes(), self.cert_chain.read_bytes())],
            root_certificates=self.client_ca.read_bytes() if self.client_ca else None,
            require_client_auth=self.client_ca is not None)


@dataclass
class RunningServer:
    """A started coordinator; ``stop`` shuts it down cleanly (open round committed or failed)."""

    server: grpc.Server
    coordinator: Coordinator
    port: int
    address: str
    _ticker: threading.Thread
    _stopped: threading.Event

    def stop(self, grace_s: float = 5.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.server.stop(grace_s).wait()  # refuse new calls, let running ones finish
        self._ticker.join()
        self.coordinator.shut_down()

    def wait(self) -> None:
        self.server.wait_for_termination()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(coordinator: Coordinator, *, host: str = "127.0.0.1", port: int = 0, max_workers: int = 32,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, tick_s: float = 0.2,
                 interceptors: Sequence[grpc.ServerInterceptor] = (), tls: TlsFiles | None = None,
                 max_concurrent_rpcs: int | None = None, identifier: Identifier | None = None
                 ) -> RunningServer:
    """Serve ``coordinator`` on ``host:port`` (port 0 picks a free one), with TLS when ``tls`` is given.

    Memory must not grow with the number of clients reporting at once. gRPC accepts and buffers the data of
    every open stream even while all ``max_workers`` handlers are busy, and its bandwidth-delay probing
    widens flow-control windows towards a whole update per stream; with probing off each stream keeps the
    default 64 KiB window, so waiting reports cost little (benchmarks/coordinator_load.py: peak memory
    flat from 100 to 1,000 clients). Capping streams per connection instead made clients see
    REFUSED_STREAM (UNAVAILABLE) and re-send whole reports, so it is not done.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="coordinator"),
        interceptors=list(interceptors),
        # Calls beyond this many in progress are refused at once with RESOURCE_EXHAUSTED (None: no limit).
        maximum_concurrent_rpcs=max_concurrent_rpcs,
        options=[("grpc.max_receive_message_length", max_message_bytes),
                 ("grpc.max_send_message_length", max_message_bytes),
                 ("grpc.http2.bdp_probe", 0),
                 ("grpc.so_reuseport", 0)])
    if identifier is None:  # derive identities from whatever the transport verifies
        store = coordinator.store
        identifier = Identifier(
            tokens=any(isinstance(i, TokenAuthInterceptor) for i in interceptors),
            client_certs=tls is not None and tls.client_ca is not None,
            devices_of=lambda credential_id: store.get_credential(credential_id).max_devices)
    pb_grpc.add_CoordinatorServicer_to_server(
        CoordinatorServicer(coordinator, max_chunk_bytes=min(DEFAULT_CHUNK_BYTES, max_message_bytes // 2),
                            identifier=identifier),
        server)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    server.start()
    stopped = threading.Event()

    def tick() -> None:
        while not stopped.wait(tick_s):
            try:
                coordinator.tick()
            except Exception:  # the timer must outlive any one failure (a store outage, say)
                log.exception("coordinator tick failed; trying again in %.1f s", tick_s)

    ticker = threading.Thread(target=tick, name="coordinator-deadlines", daemon=True)
    ticker.start()
    return RunningServer(server, coordinator, bound, f"{host}:{bound}", ticker, stopped)
