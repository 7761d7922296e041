"""What one coordinator process gives any caller: stream slots, time budgets, connection lifetimes.

Plain values (no gRPC import) so ``fedrecon serve`` can take its defaults from here. Why these limits exist:
an untrusted client can open a stream and then say nothing. The coordinator serves calls on an event loop,
so a waiting stream holds no thread, but it still holds memory (a report is assembled in memory as it
arrives) and a slot; these limits bound both, and keep the unary calls (CheckIn, GetLatestModel,
ReportEvaluation) out of the streams' reach: they have their own budget.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerLimits:
    """Capacity and time budgets of the gRPC face (see ``servicer``).

    Streams over a cap are refused at once with RESOURCE_EXHAUSTED and a retry hint (``retry_hint_ms``);
    streams over a time budget are ended with RESOURCE_EXHAUSTED without one (see ``statuses``).
    """

    coordinator_threads: int = 32  # threads that run coordinator calls (store I/O blocks one of them)
    max_unary_calls: int = 1024  # CheckIn/GetLatestModel/ReportEvaluation in progress or queued
    max_report_streams: int = 64  # ReportUpdate streams open at once (each may hold one update in memory)
    max_downloads: int = 64  # DownloadModel streams open at once
    max_streams_per_credential: int = 2  # report + download streams one credential/certificate holds
    max_streams_per_peer: int | None = None  # the same per network address, trusted-network mode only
    first_message_s: float = 10.0  # a report stream must send its header within this
    chunk_gap_s: float = 30.0  # and then each next message within this
    report_s: float = 120.0  # and be complete within this
    download_s: float = 120.0  # a download must be read to its end within this
    retry_hint_ms: int = 1000  # told to callers refused for want of a slot, and during store outages

    def __post_init__(self) -> None:
        counts = (self.coordinator_threads, self.max_unary_calls, self.max_report_streams,
                  self.max_downloads, self.max_streams_per_credential)
        if min(counts) < 1 or (self.max_streams_per_peer is not None and self.max_streams_per_peer < 1):
            raise ValueError("every capacity limit must be at least 1")
        if min(self.first_message_s, self.chunk_gap_s, self.report_s, self.download_s) <= 0:
            raise ValueError("every time budget must be positive")
        if self.retry_hint_ms < 0:
            raise ValueError("retry_hint_ms must not be negative")


@dataclass(frozen=True)
class Keepalive:
    """HTTP/2 connection policy (gRPC core channel arguments of the server).

    The server pings a connection that has been quiet for ``time_s`` and drops it if the ping is not answered
    within ``timeout_s`` (a vanished phone frees its connection). A connection without calls for
    ``max_idle_s`` is closed, and any connection is retired after ``max_age_s`` (clients reconnect
    transparently) with ``max_age_grace_s`` for its calls to finish, at least a whole report's budget. A
    client that pings more often than every ``min_client_ping_s`` without sending data gets
    ``max_ping_strikes`` warnings and then a GOAWAY.
    """

    time_s: float = 60.0
    timeout_s: float = 20.0
    max_idle_s: float = 300.0
    max_age_s: float = 1800.0
    max_age_grace_s: float = 180.0
    min_client_ping_s: float = 30.0
    max_ping_strikes: int = 2

    def __post_init__(self) -> None:
        if min(self.time_s, self.timeout_s, self.max_idle_s, self.max_age_s, self.min_client_ping_s) <= 0:
            raise ValueError("keepalive periods must be positive")
        if self.max_age_grace_s < 0 or self.max_ping_strikes < 0:
            raise ValueError("max_age_grace_s and max_ping_strikes must not be negative")

    def channel_options(self) -> list[tuple[str, int]]:
        def ms(seconds: float) -> int:
            return int(seconds * 1000)

        return [("grpc.keepalive_time_ms", ms(self.time_s)),
                ("grpc.keepalive_timeout_ms", ms(self.timeout_s)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.max_connection_idle_ms", ms(self.max_idle_s)),
                ("grpc.max_connection_age_ms", ms(self.max_age_s)),
                ("grpc.max_connection_age_grace_ms", ms(self.max_age_grace_s)),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", ms(self.min_client_ping_s)),
                ("grpc.http2.max_ping_strikes", self.max_ping_strikes)]
