"""The standard gRPC health service, SERVING only while the store answers, and optional reflection.

Why tie health to the store: a coordinator without its store can neither open nor commit a round, nor
check a token, so a load balancer or a Kubernetes probe should send clients elsewhere (or restart it).
A cheap read (``SqlStore.ping``) is probed every ``every_s`` seconds on a thread of its own, bounded by
``timeout_s``: a store that hangs (packets dropped) turns the status NOT_SERVING after that bound instead
of holding the probe, and no second ping is started while one is still hanging. The status is answered
from memory, so a probe costs the store nothing and is answered even while the store hangs.

The health service needs no client token (probes carry none; ``TokenAuthInterceptor`` lets it through)
and is reported for the whole server ("") and for the coordinator service by name.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

log = logging.getLogger("fedrecon.server.health")

DEFAULT_PROBE_S = 5.0
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name  # grpc.health.v1.Health
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class StoreHealth:
    """Probes the store and sets the health service's status from what it finds.

    ``add_to(server)`` registers the service on a grpc.aio server (before it starts); ``start(loop)``
    begins probing once the server's event loop runs; ``stop()`` says NOT_SERVING (a server shutting down
    takes no new clients) and ends the probing thread."""

    def __init__(self, ping: Callable[[], None], services: Sequence[str], *,
                 every_s: float = DEFAULT_PROBE_S, timeout_s: float | None = None) -> None:
        if every_s <= 0:
            raise ValueError(f"the health probe interval must be positive, got {every_s}")
        self._ping = ping
        self._services = ("", *services)
        self.every_s = every_s
        self.timeout_s = timeout_s if timeout_s is not None else max(1.0, min(every_s, 10.0))
        self.servicer = health_aio.HealthServicer()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._in_flight: Future[None] | None = None
        self._healthy: bool | None = None
        self._changed = threading.Condition()

    def add_to(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        """On the server's loop: NOT_SERVING until the first probe says otherwise, then probe."""
        self._loop = asyncio.get_running_loop()
        status = SERVING if self._healthy else NOT_SERVING
        for service in self._services:
            await self.servicer.set(service, status)
        self._thread = threading.Thread(target=self._run, name="coordinator-health", daemon=True)
        self._thread.start()

    def probe_now(self) -> bool:
        """Probe once, here (bounded by ``timeout_s``), before the server starts: it then answers its first
        health check with what was found rather than NOT_SERVING."""
        healthy, why = self._probe()
        self._publish(healthy, why=why)
        return healthy

    @property
    def healthy(self) -> bool | None:
        """The last probe's finding (None before the first)."""
        with self._changed:
            return self._healthy

    def wait_for(self, healthy: bool, timeout: float) -> bool:
        """Block until a probe finds the store ``healthy`` (or not); True if it did within ``timeout``."""
        with self._changed:
            return self._changed.wait_for(lambda: self._healthy is healthy, timeout)

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 5)
        self._publish(False, why="the coordinator is shutting down")

    def _run(self) -> None:
        while not self._stopped.is_set():
            healthy, why = self._probe()
            if not self._stopped.is_set():
                self._publish(healthy, why=why)
            self._stopped.wait(self.every_s)

    def _probe(self) -> tuple[bool, str]:
        """(reachable, why not); a ping still hanging from before counts as unreachable."""
        if self._in_flight is None or self._in_flight.done():
            self._in_flight = Future()
            # A daemon thread per ping, not a pool: a ping hanging on a dead network must not keep the
            # process from exiting.
            threading.Thread(target=_run_into, args=(self._ping, self._in_flight), name="health-ping",
                             daemon=True).start()
        try:
            self._in_flight.result(timeout=self.timeout_s)
        except FutureTimeout:
            return False, f"the store did not answer within {self.timeout_s:g} s"
        except Exception as err:  # StoreUnavailable, StoreVanished, a fault: not serving either way
            return False, f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        return True, ""

    def _publish(self, healthy: bool, *, why: str) -> None:
        with self._changed:
            changed = healthy is not self._healthy
            self._healthy = healthy
            self._changed.notify_all()
        if not changed:
            return
        status = SERVING if healthy else NOT_SERVING
        if self._loop is not None and not self._loop.is_closed():
            try:
                for service in self._services:
                    asyncio.run_coroutine_threadsafe(self.servicer.set(service, status), self._loop
                                                     ).result(timeout=5)
            except (RuntimeError, FutureTimeout) as err:  # the loop stopped meanwhile (shutdown)
                log.debug("health status not published: %s", err)
        name = "SERVING" if healthy else "NOT_SERVING"
        extra = {"event": "health_changed", "figures": {"status": name, **({"why": why} if why else {})}}
        if healthy:
            log.info("health: SERVING (the store answers)", extra=extra)
        else:  # a shutdown is no trouble; a store that stopped answering is
            level = logging.INFO if self._stopped.is_set() else logging.WARNING
            log.log(level, "health: NOT_SERVING (%s)", why, extra=extra)


def _run_into(fn: Callable[[], None], future: Future[None]) -> None:
    try:
        fn()
    except BaseException as err:
        future.set_exception(err)
    else:
        future.set_result(None)


def enable_reflection(server: grpc.aio.Server, services: Sequence[str]) -> None:
    """gRPC server reflection for ``services`` and the health service (for grpcurl and the like)."""
    from grpc_reflection.v1alpha import reflection

    reflection.enable_server_reflection((*services, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
