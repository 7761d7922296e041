"""The coordinator's Prometheus metrics (``fedrecon serve --metrics-port``), named by Prometheus conventions.

Three sources, each figure from exactly one:

* Gauges (the model version, leadership, the live round, open streams, privacy ε) and the refusal counts
  are read from ``Coordinator.view()`` at scrape time by a custom collector, so a scrape shows what
  ``fedrecon status`` and the dashboard show, with nothing to keep in step.
* Rounds, reports and durations are counted from the round events (``Coordinator.add_round_listener``):
  a report is counted once its round has closed, with its final status (accepted, refused with its reason,
  or dropped: assigned but never reported).
* Bytes in and out are counted per gRPC method by an interceptor at the message boundary (serialised
  protobuf payloads, before HTTP/2 framing and TLS); store latency and errors by wrapping the store's
  public operations (``observe_store_calls``).

Every server gets its own ``CollectorRegistry``, so several coordinators in one process (tests, drills)
never share a counter.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fedrecon.server.live_view import LiveView, RoundEvent, RoundEventKind, RoundPhase
from fedrecon.server.store import Outcome, SqlStore, StoreError, StoreFault, StoreUnavailable

log = logging.getLogger(__name__)

PREFIX = "fedrecon"
ROUND_SECONDS_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
COMMIT_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STORE_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class CoordinatorMetrics:
    """The metrics of one coordinator, registered in ``registry`` (a fresh one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # no `_created` series beside every counter: noise for dashboards
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rounds = Counter(f"{PREFIX}_rounds", "Rounds closed by this coordinator, by outcome "
                              "(committed into a model version, or failed).", ["outcome"], registry=r)
        self.reports = Counter(f"{PREFIX}_reports", "Assigned clients' final outcome in closed rounds: "
                               "status accepted, refused (with its reason) or dropped (no report).",
                               ["status", "reason"], registry=r)
        self.round_seconds = Histogram(f"{PREFIX}_round_duration_seconds", "Time from a round's opening "
                                       "to its close, by outcome.", ["outcome"],
                                       buckets=ROUND_SECONDS_BUCKETS, registry=r)
        self.commit_seconds = Histogram(f"{PREFIX}_round_commit_duration_seconds", "Time a commit took: the "
                                        "server step and the store write of the new version.",
                                        buckets=COMMIT_SECONDS_BUCKETS, registry=r)
        self.last_commit = _LastCommit()
        self.received_bytes = Counter(f"{PREFIX}_grpc_received_bytes", "Request message bytes received "
                                      "(serialised protobuf), by gRPC method.", ["method"], registry=r)
        self.sent_bytes = Counter(f"{PREFIX}_grpc_sent_bytes", "Response message bytes sent (serialised "
                                  "protobuf), by gRPC method.", ["method"], registry=r)
        self.store_seconds = Histogram(f"{PREFIX}_store_operation_duration_seconds", "Latency of the "
                                       "store's operations (one transaction each), by operation.",
                                       ["operation"], buckets=STORE_SECONDS_BUCKETS, registry=r)
        self.store_errors = Counter(f"{PREFIX}_store_errors", "Store operations that failed, by operation "
                                    "and kind: unavailable (an outage) or fault (a broken store); the "
                                    "store's refusals (an unknown version, a lease held by another "
                                    "coordinator) are answers, not errors.", ["operation", "kind"],
                                    registry=r)
        for outcome in ("committed", "failed"):  # present from the start: increase() and alerts see 0
            self.rounds.labels(outcome)
            self.round_seconds.labels(outcome)

    # ----- sources ---------------------------------------------------------------------------------
    def watch(self, view: Callable[[], LiveView], streams: Callable[[], dict[str, int]] | None = None
              ) -> None:
        """Expose the gauges of ``view`` (``Coordinator.view``) and ``streams`` (open streams by kind) at
        every scrape."""
        self.registry.register(_ViewCollector(view, streams, self.last_commit))

    def on_round(self, event: RoundEvent) -> None:
        """The round listener (``Coordinator.add_round_listener``)."""
        if event.kind == RoundEventKind.OPENED:
            return
        outcome = "committed" if event.kind == RoundEventKind.COMMITTED else "failed"
        self.rounds.labels(outcome).inc()
        if event.duration_s is not None:
            self.round_seconds.labels(outcome).observe(max(0.0, event.duration_s))
        if event.commit_s is not None:
            self.commit_seconds.observe(event.commit_s)
        if event.kind == RoundEventKind.COMMITTED:
            self.last_commit.set(time.time())
        for p in event.participations:
            reason = p.reason if p.outcome == Outcome.REFUSED else ""
            self.reports.labels(str(p.outcome), reason).inc()

    def on_store_call(self, operation: str, seconds: float, error: BaseException | None) -> None:
        """One store operation finished (``observe_store_calls``)."""
        self.store_seconds.labels(operation).observe(seconds)
        if isinstance(error, StoreUnavailable):
            self.store_errors.labels(operation, "unavailable").inc()
        elif error is not None and (not isinstance(error, StoreError) or isinstance(error, StoreFault)):
            self.store_errors.labels(operation, "fault").inc()

    def interceptor(self) -> ByteCounter:
        """The gRPC server interceptor counting message bytes; put it first, so refused calls count too."""
        return ByteCounter(self.received_bytes, self.sent_bytes)

    def serve_http(self, host: str, port: int) -> MetricsEndpoint:
        """Serve ``/metrics`` on ``host:port`` (0 picks a free port) on a daemon thread."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsEndpoint(server, thread, host, server.server_port)


class MetricsEndpoint:
    """A running ``/metrics`` HTTP server; ``close`` stops it."""

    def __init__(self, server: Any, thread: threading.Thread, host: str, port: int) -> None:
        self._server = server
        self._thread = thread
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _LastCommit:
    """When this process last committed a round (Unix time), for a "no commit for N minutes" alert that
    needs no counter arithmetic."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._at: float | None = None

    def set(self, at: float) -> None:
        with self._lock:
            self._at = at

    def get(self) -> float | None:
        with self._lock:
            return self._at


class _ViewCollector(Collector):
    """Gauges and the refusal counters, read from one ``LiveView`` per scrape."""

    def __init__(self, view: Callable[[], LiveView], streams: Callable[[], dict[str, int]] | None,
                 last_commit: _LastCommit) -> None:
        self._view = view
        self._streams = streams
        self._last_commit = last_commit

    def describe(self) -> Iterator[Metric]:
        return iter(())  # unchecked collector: names are stable, but the families depend on the view

    def collect(self) -> Iterator[Metric]:
        v = self._view()
        yield _gauge("coordinator_info", "This coordinator: its task and replica id (always 1).",
                     1, labels={"task": v.task, "replica_id": v.replica_id})
        yield _gauge("model_version", "The task's latest committed model version.", v.model_version)
        yield _gauge("leader", "1 while this coordinator leads the task's rounds, 0 while it stands by.",
                     int(v.leading))
        yield _gauge("committed_rounds", "The task's committed rounds (all coordinators, since the task "
                     "was created).", v.rounds_committed)
        refusals = CounterMetricFamily(f"{PREFIX}_refusals", "Refusals (and notable events such as clipped "
                                       "updates) since this process started, by reason.", labels=["reason"])
        for reason, count in sorted(v.refusals.items()):
            refusals.add_metric([reason], count)
        yield refusals
        r = v.live_round
        yield _gauge("live_round_open", "1 while a round is open (selecting, reporting or committing).",
                     int(r is not None))
        phases = GaugeMetricFamily(f"{PREFIX}_live_round_phase", "The live round's phase (1 for the "
                                   "current one, all 0 when no round is open).", labels=["phase"])
        for phase in RoundPhase:
            phases.add_metric([phase.value], int(r is not None and r.phase == phase))
        yield phases
        yield _gauge("live_round_selected_clients", "Clients assigned to the live round (0 without one).",
                     r.selected if r else 0)
        yield _gauge("live_round_reporting_clients", "Clients of the live round that reported (accepted "
                     "or refused; 0 without one).", r.reporting if r else 0)
        yield _gauge("live_round_accepted_reports", "Accepted reports in the live round (0 without one).",
                     r.accepted if r else 0)
        if r is not None:
            yield _gauge("live_round_number", "The live round's number within the task.", r.round_num)
            yield _gauge("live_round_id", "The live round's id in the store.", r.round_id)
            yield _gauge("live_round_base_version", "The model version the live round trains.",
                         r.base_version)
            yield _gauge("live_round_goal_reports", "Accepted reports at which the live round commits.",
                         r.goal)
            yield _gauge("live_round_selection_goal_clients", "Assignments at which selection stops (the "
                         "over-selected goal).", r.selection_goal)
            yield _gauge("live_round_min_reports", "Fewest accepted reports that still commit at the "
                         "deadline.", r.min_reports)
            yield _gauge("live_round_opened_timestamp_seconds", "When the live round opened (Unix time).",
                         r.opened_at)
            yield _gauge("live_round_deadline_timestamp_seconds", "The live round's reporting deadline "
                         "(Unix time).", r.deadline_at)
        last = self._last_commit.get()
        if last is not None:
            yield _gauge("last_commit_timestamp_seconds", "When this process last committed a round (Unix "
                         "time).", last)
        if self._streams is not None:
            streams = GaugeMetricFamily(f"{PREFIX}_open_streams", "gRPC streams open now, by kind "
                                        "(report uploads, model downloads).", labels=["kind"])
            for kind, count in sorted(self._streams().items()):
                streams.add_metric([kind], count)
            yield streams
        if v.privacy is not None:
            p = v.privacy
            yield _gauge("privacy_epsilon", "ε spent by the task's committed rounds (user-level DP at "
                         "privacy_delta).", p.epsilon)
            yield _gauge("privacy_delta", "δ of the task's (ε, δ) guarantee.", p.delta)
            if p.budget is not None:
                yield _gauge("privacy_epsilon_budget", "The ε budget: no round opens that would exceed it.",
                             p.budget)


def _gauge(name: str, documentation: str, value: float, *, labels: dict[str, str] | None = None
           ) -> GaugeMetricFamily:
    if labels is None:
        return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)
    family = GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


# ----- bytes on the wire ---------------------------------------------------------------------------------
class ByteCounter(grpc.aio.ServerInterceptor):
    """Counts request and response message bytes per method by wrapping the handler's (de)serialisers:
    the coordinator's handlers take raw bytes and downloads write pre-encoded bytes, so the count is of
    what crossed the wire, whatever the handler does with it."""

    def __init__(self, received: Counter, sent: Counter) -> None:
        self._received = received
        self._sent = sent

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = str(handler_call_details.method)
        received, sent = self._received.labels(method), self._sent.labels(method)
        decode = handler.request_deserializer
        encode = handler.response_serializer

        def counted_request(data: bytes) -> Any:
            received.inc(len(data))
            return decode(data) if decode is not None else data

        def counted_response(message: Any) -> bytes:
            data = encode(message) if encode is not None else message
            sent.inc(len(data))
            return data

        return handler._replace(request_deserializer=counted_request, response_serializer=counted_response)


# ----- store operations ----------------------------------------------------------------------------------
StoreCallObserver = Callable[[str, float, "BaseException | None"], None]
_NOT_OPERATIONS = frozenset({"close", "migrate"})
_OBSERVED: weakref.WeakSet[SqlStore] = weakref.WeakSet()


def store_operations() -> list[str]:
    """The store's public operations (methods), found on the class so that new ones are observed too."""
    return sorted(name for name, value in vars(SqlStore).items()
                  if callable(value) and not name.startswith("_") and name not in _NOT_OPERATIONS)


def observe_store_calls(store: SqlStore, observe: StoreCallObserver) -> None:
    """Time every public operation of this ``store`` instance and tell ``observe(operation, seconds,
    error)``, for every user of the instance (the coordinator, the token check, the health probe). Done
    on the instance, not a proxy, so nothing holding the store needs to know; calling it twice on one
    store is refused (every call would be counted twice)."""
    if store in _OBSERVED:
        raise ValueError(f"{store!r} is observed already")
    for name in store_operations():
        setattr(store, name, _timed(name, getattr(store, name), observe))
    _OBSERVED.add(store)


def _timed(name: str, operation: Callable[..., Any], observe: StoreCallObserver) -> Callable[..., Any]:
    @functools.wraps(operation)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            return operation(*args, **kwargs)
        except BaseException as err:
            error = err
            raise
        finally:
            try:
                observe(name, time.perf_counter() - started, error)
            except Exception:  # observing never breaks a store call
                log.exception("observing store operation %s failed", name)
    return timed


# ----- reading it back -----------------------------------------------------------------------------------
def metrics_url(address: str) -> str:
    """``address`` as a metrics URL: ``HOST:PORT`` becomes ``http://HOST:PORT/metrics``; a URL is kept."""
    if "://" in address:
        return address
    return f"http://{address}/metrics"


def scrape_live(address: str, *, timeout_s: float = 3.0) -> dict[str, Any]:
    """The live figures of a running coordinator, read from its metrics endpoint (what ``fedrecon status
    --metrics-url`` shows): its task, replica, leadership, model version and live round (None when no
    round is open). Raises ``OSError`` when the endpoint cannot be read and ``ValueError`` when what it
    serves is not a fedrecon coordinator's metrics."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    url = metrics_url(address)
    with urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode("utf-8")
    values: dict[str, float] = {}
    info: dict[str, str] = {}
    phase = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{PREFIX}_coordinator_info":
                info = dict(sample.labels)
            elif sample.name == f"{PREFIX}_live_round_phase":
                if sample.value == 1:
                    phase = sample.labels.get("phase")
            elif not sample.labels:
                values[sample.name.removeprefix(f"{PREFIX}_")] = sample.value
    if "task" not in info or "model_version" not in values:
        raise ValueError(f"{url} serves no fedrecon coordinator metrics")

    def whole(name: str) -> int:
        return int(values[f"live_round_{name}"])

    live = None
    if values.get("live_round_open") == 1 and "live_round_id" in values:
        deadline = values["live_round_deadline_timestamp_seconds"]
        live = {"round_num": whole("number"), "round_id": whole("id"), "phase": phase,
                "base_version": whole("base_version"), "selected": whole("selected_clients"),
                "reporting": whole("reporting_clients"), "accepted": whole("accepted_reports"),
                "goal": whole("goal_reports"), "min_reports": whole("min_reports"),
                "opened_at": _iso(values["live_round_opened_timestamp_seconds"]), "deadline": _iso(deadline),
                "seconds_left": round(max(0.0, deadline - time.time()), 1)}
    return {"url": url, "task": info["task"], "replica_id": info.get("replica_id"),
            "leader": values.get("leader") == 1, "model_version": int(values["model_version"]),
            "live_round": live}


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat()
