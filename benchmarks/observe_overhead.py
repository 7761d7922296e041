"""What observing the coordinator costs: its snapshot, a metrics scrape, timed store calls, counted bytes.

    python benchmarks/observe_overhead.py --out benchmarks/results/observe_overhead.json

Measured in one run, each against its reference from the same run:

- ``view_us``: one ``Coordinator.view()`` (taken under the coordinator's lock) with a live round of
  ``--clients`` assigned clients; reference: one ``Coordinator.version`` read (the same lock, nothing else).
- ``scrape_ms``: one Prometheus exposition of every metric (``generate_latest``), after a committed round.
- ``store_call_us``: ``SqlStore.latest_version`` (no payload) plain and wrapped by ``observe_store_calls``
  (timer and histogram), median of interleaved batches; the ratio is the wrapper's cost.
- ``grpc_calls_per_s``: GetLatestModel over loopback gRPC against a server with metrics (byte-counting
  interceptor, store wrapper) and one without, interleaved batches; the ratio is the metrics' cost on the
  hot path of a unary call.

Machine facts (CPU count, load average) are written with the figures: on a shared machine only the ratios
mean much.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
from prometheus_client import generate_latest

from fedrecon.server.app import start_server
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.metrics import CoordinatorMetrics, observe_store_calls
from fedrecon.server.store import SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec
from fedrecon.tensors import chunks, manifest
from fedrecon.v1 import coordinator_pb2 as pb
from fedrecon.v1 import coordinator_pb2_grpc as pb_grpc

TASK = "observed"


def _task(clients: int) -> TaskSpec:
    return TaskSpec(name=TASK, model={"kind": "matrix_factorization", "num_items": 600, "num_factors": 8},
                    rounds=RoundSettings(clients_per_round=clients, over_selection=1.0, min_reports=1,
                                         selection_timeout_s=3600.0, reporting_timeout_s=3600.0,
                                         max_check_ins_per_minute=1e9))


def _per_call(fn: Callable[[], object], n: int) -> float:
    """Seconds per call of ``fn`` over ``n`` calls."""
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n


def _interleaved(a: Callable[[], float], b: Callable[[], float], batches: int) -> tuple[float, float]:
    """Medians of ``a`` and ``b`` over alternating batches (drifting load hits both alike)."""
    xs, ys = [], []
    for _ in range(batches):
        xs.append(a())
        ys.append(b())
    return statistics.median(xs), statistics.median(ys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=1000, help="assigned clients in the live round")
    parser.add_argument("--calls", type=int, default=2000, help="calls per batch (view, store)")
    parser.add_argument("--grpc-calls", type=int, default=300, help="gRPC calls per batch")
    parser.add_argument("--batches", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, object] = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_1m_at_start": os.getloadavg()[0]},
        "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    with tempfile.TemporaryDirectory() as tmp:
        # The snapshot with a live round of --clients assigned clients, against a plain locked read.
        with SqlStore(f"sqlite:///{tmp}/view.db") as store:
            c = Coordinator(store, _task(args.clients))
            for i in range(args.clients):
                c.check_in(TASK, f"client-{i}", 1)
            live = c.view().live_round
            assert live is not None and live.selected == args.clients
            view_s, version_s = _interleaved(lambda: _per_call(c.view, args.calls),
                                             lambda: _per_call(lambda: c.version, args.calls), args.batches)
            results["view_us"] = {"view": view_s * 1e6, "reference_version_read": version_s * 1e6,
                                  "ratio": view_s / version_s, "assigned_clients": args.clients}

        # Store calls, plain and wrapped (two stores on one file: one of them observed).
        with SqlStore(f"sqlite:///{tmp}/store.db") as plain, SqlStore(f"sqlite:///{tmp}/store.db") as timed:
            Coordinator(plain, _task(2))
            metrics = CoordinatorMetrics()
            observe_store_calls(timed, metrics.on_store_call)
            plain_s, timed_s = _interleaved(
                lambda: _per_call(lambda: plain.latest_version(TASK, with_payload=False), args.calls),
                lambda: _per_call(lambda: timed.latest_version(TASK, with_payload=False), args.calls),
                args.batches)
            results["store_call_us"] = {"plain": plain_s * 1e6, "observed": timed_s * 1e6,
                                        "ratio": timed_s / plain_s}

        # gRPC unary calls with and without metrics, and a scrape after a committed round.
        with SqlStore(f"sqlite:///{tmp}/a.db") as store_a, SqlStore(f"sqlite:///{tmp}/b.db") as store_b, \
                start_server(Coordinator(store_a, _task(2)), metrics_port=0) as observed, \
                start_server(Coordinator(store_b, _task(2))) as bare:
            channels = {name: grpc.insecure_channel(s.address) for name, s in (("observed", observed),
                                                                                  ("bare", bare))}
            stubs = {name: pb_grpc.CoordinatorStub(ch) for name, ch in channels.items()}
            request = pb.GetLatestModelRequest(task_name=TASK)

            def rate(server: str) -> Callable[[], float]:
                def run() -> float:
                    return 1.0 / _per_call(lambda: stubs[server].GetLatestModel(request, timeout=30),
                                           args.grpc_calls)
                return run

            with_metrics, without = _interleaved(rate("observed"), rate("bare"), args.batches)
            results["grpc_calls_per_s"] = {"with_metrics": with_metrics, "without_metrics": without,
                                           "ratio": with_metrics / without}
            stub = stubs["observed"]
            delta = np.zeros((600, 8), np.float32)
            for who in ("a", "b"):
                a = stub.CheckIn(pb.CheckInRequest(task_name=TASK, client_id=who, protocol_version=1),
                                 timeout=30).assignment
                header = pb.ReportUpdateRequest(header=pb.ReportHeader(
                    task_name=TASK, client_id=who, round_id=a.round_id, assignment_token=a.assignment_token,
                    weight=1.0, manifest=manifest(["item_embedding"], [delta])))
                stub.ReportUpdate(iter([header, *(pb.ReportUpdateRequest(chunk=x) for x in chunks([delta],
                                                                                                  1 << 16))]),
                                  timeout=60)
            assert observed.coordinator.wait_for_version(1, 60)
            assert observed.metrics is not None
            registry = observed.metrics.registry
            exposition = generate_latest(registry)
            scrape_s = statistics.median(_per_call(lambda: generate_latest(registry), 50)
                                         for _ in range(args.batches))
            results["scrape_ms"] = {"median": scrape_s * 1e3, "bytes": len(exposition),
                                    "lines": exposition.count(b"\n")}
            for ch in channels.values():
                ch.close()
    results["machine"]["load_average_1m_at_end"] = os.getloadavg()[0]  # type: ignore[index]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    json.dump(results, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
