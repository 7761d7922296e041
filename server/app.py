"""Starting and stopping a coordinator: a grpc.aio server on its own event-loop thread, around one
``Coordinator``, a thread pool for the coordinator's blocking calls, and a timer for deadlines.

The public face stays synchronous (``start_server`` returns a ``RunningServer`` with ``stop``/``wait``), so
tests, benchmarks and ``fedrecon serve`` need no asyncio of their own; inside, calls are served by an event
loop so that waiting streams hold no thread (see ``servicer``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

from fedrecon.core.secagg.updates import SecureEncoding
from fedrecon.server.auth import TokenAuthInterceptor
from fedrecon.server.coordinator import Coordinator, ShutdownOutcome
from fedrecon.server.dashboard import DashboardSettings, RunningDashboard, coordinator_live, start_dashboard
from fedrecon.server.event_log import RefusalTally
from fedrecon.server.health import DEFAULT_PROBE_S, StoreHealth, enable_reflection
from fedrecon.server.identity import Identifier
from fedrecon.server.limits import Keepalive, ServerLimits
from fedrecon.server.metrics import CoordinatorMetrics, MetricsEndpoint, observe_store_calls
from fedrecon.server.servicer import SERVICE, CoordinatorServicer
from fedrecon.tensors import DEFAULT_CHUNK_BYTES

DEFAULT_MAX_MESSAGE_BYTES = 4 * DEFAULT_CHUNK_BYTES
# What the client library sends at most in one gRPC message (``CoordinatorChannel``'s default): a masked
# update travels as one message, so it must fit this whatever the coordinator accepts.
CLIENT_MAX_MESSAGE_BYTES = 4 * DEFAULT_CHUNK_BYTES
_MESSAGE_FRAMING_BYTES = 1024  # the round id, the client's secure-aggregation id and protobuf framing


def check_secure_message_fits(coordinator: Coordinator, max_message_bytes: int) -> None:
    """Raise ``ValueError`` when a secure round of this task could never complete: each client's masked
    update (4 bytes per trainable value, plus the weight) goes as one gRPC message, which neither this
    coordinator (``max_message_bytes``) nor the client library (4 MiB) would carry. Refused at start, with
    the figures, instead of every report failing mid-round."""
    if not coordinator.task.aggregation.secure_aggregation:
        return
    values = SecureEncoding.vector_length(coordinator.algorithm.delta_shapes)  # every value and the weight
    needed = 4 * values + _MESSAGE_FRAMING_BYTES
    limit = min(max_message_bytes, CLIENT_MAX_MESSAGE_BYTES)
    if needed > limit:
        raise ValueError(
            f"task {coordinator.task.name}: secure aggregation sends each client's masked update as one "
            f"message of {needed / (1 << 20):.2f} MiB ({values:,} values), over the {limit / (1 << 20):.2f} "
            f"MiB a message may carry (this coordinator's --max-message-mb and the client library's 4 MiB); "
            f"secure aggregation needs a model under {(limit - _MESSAGE_FRAMING_BYTES) // 4 - 1:,} trainable "
            "global values")
DEFAULT_SHUTDOWN_GRACE_S = 30.0
PROGRESS_EVERY_S = 1.0
"""How often the open round's counts are written to the store for ``fedrecon status`` (when they changed):
at most one small write a second, whatever the number of reports."""
REFUSAL_LOG_EVERY_S = 60.0
"""How often, at most, the refusals counted since the last such line are logged (``RefusalTally``)."""
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS. With ``client_ca`` the server also demands a client certificate signed by it
    (mutual TLS)."""

    cert_chain: Path
    private_key: Path
    client_ca: Path | None = None

    def check(self) -> None:
        """Raise ``ValueError`` unless the files are readable, parse as PEM and the key matches the
        certificate: ``serve`` calls this before it touches the store, so a mistyped flag fails at once
        rather than after the coordinator has taken over a live round."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert_chain, self.private_key, password=lambda: b"")
        except (OSError, ssl.SSLError) as err:
            raise ValueError(f"cannot use TLS certificate {self.cert_chain} with key {self.private_key}: "
                             f"{err}") from err
        if self.client_ca is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except (OSError, ssl.SSLError) as err:
                raise ValueError(f"cannot use client CA {self.client_ca}: {err}") from err

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key.read_bytes(), self.cert_chain.read_bytes())],
            root_certificates=self.client_ca.read_bytes() if self.client_ca else None,
            require_client_auth=self.client_ca is not None)


def check_bindable(host: str, port: int) -> None:
    """Raise ``OSError`` unless ``host:port`` can be listened on now (checked, then released)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
        probe.bind(address)


@dataclass
class RunningServer:
    """A started coordinator; ``stop`` shuts it down (see ``stop``)."""

    coordinator: Coordinator
    servicer: CoordinatorServicer
    port: int
    address: str
    shutdown_grace_s: float
    _server: grpc.aio.Server
    _loop: asyncio.AbstractEventLoop
    _serving: threading.Thread
    _executor: ThreadPoolExecutor
    _ticker: threading.Thread
    _progress: threading.Thread
    _stopped: threading.Event
    _outcome: ShutdownOutcome | None = field(default=None)
    health: StoreHealth | None = None
    metrics: CoordinatorMetrics | None = None
    metrics_endpoint: MetricsEndpoint | None = None
    _refusals: RefusalTally | None = None
    dashboard: RunningDashboard | None = None  # the read-only web page, when asked for
    drain_s: float = 0.0  # on stop, how long the open round may go on taking its clients' reports

    @property
    def dashboard_url(self) -> str | None:
        return self.dashboard.url if self.dashboard is not None else None

    def stop(self, grace_s: float = 5.0) -> ShutdownOutcome:
        """Drain, refuse new calls, give running ones ``grace_s`` seconds, then close the open round:
        committed if it has its minimum of reports, retrying for ``shutdown_grace_s`` while the store is
        unavailable; failed otherwise. The outcome says whether accepted updates were lost
        (``lost_updates``).

        Draining (``drain_s`` > 0) comes first, while calls are still served: health says NOT_SERVING and
        no client is assigned any more, but the clients of the open round may report for up to ``drain_s``
        seconds (`Coordinator.drain`), so a restart does not fail a round that was about to complete."""
        if self._stopped.is_set():
            self._serving.join()
            return self._outcome or ShutdownOutcome("idle", "already stopped")
        if self.health is not None:  # NOT_SERVING first: load balancers stop sending clients here
            self.health.stop()
        if self.drain_s > 0:
            log.info("shutdown: %s", self.coordinator.drain(self.drain_s))
        self._stopped.set()
        if self.dashboard is not None:  # first: the page must not read a store being closed
            self.dashboard.stop()
        asyncio.run_coroutine_threadsafe(self._server.stop(grace_s), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._serving.join()
        self._executor.shutdown(wait=True)  # coordinator calls already started finish
        self._ticker.join()
        self._progress.join()
        self._outcome = self.coordinator.shut_down(self.shutdown_grace_s)
        if self._refusals is not None:
            self._refusals.maybe_log(force=True)
        if self.metrics_endpoint is not None:  # last: a final scrape sees how the open round ended
            self.metrics_endpoint.close()
        return self._outcome

    def wait(self) -> None:
        """Block until the server has stopped."""
        self._serving.join()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, keepalive: Keepalive | None = None
                   ) -> list[tuple[str, int]]:
    """The grpc.aio server's options (message limits, no BDP probing, keepalive): one list, so that the
    coordinator and the bare gRPC server its load benchmark compares it with (``benchmarks/grpc_floor.py``)
    run on the same settings."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.http2.bdp_probe", 0),
            ("grpc.so_reuseport", 0),
            *(keepalive or Keepalive()).channel_options()]


def start_server(coordinator: Coordinator, *, host: str = "127.0.0.1", port: int = 0,
                 max_workers: int | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 tick_s: float = 0.2, interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                 tls: TlsFiles | None = None, identifier: Identifier | None = None,
                 limits: ServerLimits | None = None, keepalive: Keepalive | None = None,
                 shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S,
                 progress_s: float = PROGRESS_EVERY_S, health_probe_s: float | None = DEFAULT_PROBE_S,
                 reflection: bool = False, metrics_port: int | None = None, metrics_host: str = "127.0.0.1",
                 refusal_log_s: float = REFUSAL_LOG_EVERY_S, dashboard: DashboardSettings | None = None,
                 drain_s: float = 0.0) -> RunningServer:
    """Serve ``coordinator`` on ``host:port`` (port 0 picks a free one), with TLS when ``tls`` is given,
    and the read-only web dashboard (``dashboard``) on its own address when ``dashboard`` is given.

    ``max_workers`` (if given) is ``limits.coordinator_threads``: the threads that run coordinator calls.
    Every ``progress_s`` seconds the open round's counts go to the store (``Coordinator.record_progress``).

    Observing it (see ``health``, ``metrics``, ``event_log``): the gRPC health service says SERVING while a
    store probe every ``health_probe_s`` seconds succeeds (None: no health service); ``reflection`` adds gRPC
    server reflection; ``metrics_port`` (None: off) serves Prometheus metrics on ``metrics_host``; the
    refusals counted are logged every ``refusal_log_s`` seconds at most. ``drain_s``: `RunningServer.stop`.

    Memory must not grow with the number of clients reporting at once: a report being read is assembled in
    memory, so ``limits.max_report_streams`` bounds how many are read at once (the rest are told to retry),
    and gRPC's bandwidth-delay probing, which widens flow-control windows towards a whole update per
    stream, is off, so each waiting stream keeps the default 64 KiB window.
    """
    limits = limits or ServerLimits()
    check_secure_message_fits(coordinator, max_message_bytes)
    if dashboard is not None:
        dashboard.check()  # before anything starts: an exposed page without a credential is refused
    if max_workers is not None:
        limits = replace(limits, coordinator_threads=max_workers)
    keepalive = keepalive or Keepalive()
    if identifier is None:  # derive identities from whatever the transport verifies
        store = coordinator.store
        identifier = Identifier(
            tokens=any(isinstance(i, TokenAuthInterceptor) for i in interceptors),
            client_certs=tls is not None and tls.client_ca is not None,
            devices_of=lambda credential_id: store.get_credential(credential_id).max_devices)
    executor = ThreadPoolExecutor(max_workers=limits.coordinator_threads, thread_name_prefix="coordinator")
    servicer = CoordinatorServicer(coordinator, identifier=identifier, limits=limits, executor=executor,
                                   max_chunk_bytes=min(DEFAULT_CHUNK_BYTES, max_message_bytes // 2))
    metrics = None
    if metrics_port is not None:
        metrics = CoordinatorMetrics()
        metrics.watch(coordinator.view, servicer.streams_open)
        coordinator.add_round_listener(metrics.on_round)
        observe_store_calls(coordinator.store, metrics.on_store_call)
        interceptors = [metrics.interceptor(), *interceptors]  # first: refused calls' bytes count too
    # Bound before the gRPC port, so a metrics port in use fails the start before any client is served.
    endpoint = None
    if metrics is not None and metrics_port is not None:
        endpoint = metrics.serve_http(metrics_host, metrics_port)
    health = None
    if health_probe_s is not None:
        health = StoreHealth(coordinator.store.ping, [SERVICE], every_s=health_probe_s)
        health.probe_now()  # the first health check is answered with what the store says
    options = server_options(max_message_bytes, keepalive)
    started: Future[tuple[grpc.aio.Server, asyncio.AbstractEventLoop, int]] = Future()

    async def serve() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(interceptors=list(interceptors), options=options)
        server.add_generic_rpc_handlers((servicer.handler(),))
        if health is not None:
            health.add_to(server)
        if reflection:
            enable_reflection(server, [SERVICE])
        address = f"{host}:{port}"
        bound = (server.add_secure_port(address, tls.credentials()) if tls
                 else server.add_insecure_port(address))
        if bound == 0:
            raise OSError(f"could not bind {host}:{port}")
        await server.start()
        if health is not None:
            await health.start()
        return server, bound

    def run_loop() -> None:
        """The loop runs until ``RunningServer.stop`` has stopped the server and then the loop (not until
        ``wait_for_termination``, which returns as soon as stopping begins, before the grace is over)."""
        loop = asyncio.new_event_loop()
        loop.set_default_executor(executor)  # the token check's store queries run there too
        try:
            server, bound = loop.run_until_complete(serve())
        except BaseException as err:  # handed to the starting thread, which raises it
            started.set_exception(err)
            loop.close()
            return
        started.set_result((server, loop, bound))
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    serving = threading.Thread(target=run_loop, name="coordinator-grpc", daemon=True)
    serving.start()
    try:
        server, loop, bound = started.result()
    except BaseException:
        executor.shutdown(wait=False)
        if endpoint is not None:
            endpoint.close()
        raise
    stopped = threading.Event()
    refusals = RefusalTally(coordinator.view, every_s=refusal_log_s)

    def tick() -> None:
        while not stopped.wait(tick_s):
            try:
                coordinator.tick()
            except Exception:  # the timer must outlive any one failure (a store outage, say)
                log.exception("coordinator tick failed; trying again in %.1f s", tick_s)

    def record_progress() -> None:
        """On its own thread: a slow store write (a locked SQLite file waits for its busy timeout) must not
        hold back the deadline timer."""
        while not stopped.wait(progress_s):
            try:
                coordinator.record_progress()
            except Exception:
                log.exception("recording the open round's progress failed; trying again in %.1f s",
                              progress_s)
            refusals.maybe_log()  # a line only when one is due and something was refused

    ticker = threading.Thread(target=tick, name="coordinator-deadlines", daemon=True)
    ticker.start()
    progress = threading.Thread(target=record_progress, name="coordinator-progress", daemon=True)
    progress.start()
    running = RunningServer(coordinator, servicer, bound, f"{host}:{bound}", shutdown_grace_s, server, loop,
                            serving, executor, ticker, progress, stopped, health=health, metrics=metrics,
                            metrics_endpoint=endpoint, _refusals=refusals, drain_s=drain_s)
    if dashboard is not None:
        try:
            running.dashboard = start_dashboard(dashboard, coordinator.store, coordinator_live(coordinator))
        except BaseException as err:  # the address was taken meanwhile: nothing is left running
            running.stop()
            if isinstance(err, OSError):
                raise OSError(f"could not bind the dashboard on {dashboard.host}:{dashboard.port}: {err}"
                              ) from err
            raise
    return running
