"""What secure aggregation costs per client and round: CPU on the client and the coordinator, and bytes.

    python benchmarks/secagg_cost.py --out benchmarks/results/secagg_cost.json

For each population (default 100 and 1,000 clients) one full round of ``fedrecon.core.secagg`` runs in
process (``local_round``: every message passed by a call, no network), with a vector of 184,439 values
(the MovieLens update size the task states; the tuned model's 3,616 items × 51 globals + 1 is 184,417, so
the two agree within 0.02%) and 30% of the clients, drawn at random, dropping after the key-sharing stage
and before sending their masked input, so that their masks must be recovered. SecAgg+ neighbourhoods
of the recommended size for a 30% dropout rate are used (the full graph when that is smaller).

Figures, each row ``{"clients", "client_ms", "coordinator_ms_per_client", "upload_bytes_per_client",
"plain_upload_bytes_per_client", "dropout_recovered"}`` plus the parameters used:
- client_ms: process CPU time of one surviving client over the whole round (quantisation, keys, Shamir
  splitting, share encryption, mask expansion, unmasking answer), the mean over survivors;
- coordinator_ms_per_client: the coordinator object's CPU time for the round divided by the clients;
- upload_bytes_per_client: payload bytes a surviving client sends in the four stages (mean); without
  secure aggregation a client uploads its float32 update (``plain_upload_bytes_per_client``);
- dropout_recovered: the round finished and its sum equals the survivors' quantised sum exactly.
Over the wire (``--wire-clients N``, default 10; 0 skips it): one real round through a coordinator on loopback
(SQLite in a temporary folder) with N clients of a matrix-factorization model of ``--wire-items`` items ×
``--wire-factors`` factors (default 3,616 × 51, so the secure vector is the MovieLens-sized 184,417 values),
once with plain float32 reports and once with ``secure_aggregation = true``. Each client has its own
connection through a loopback relay (``simulations.wire_tap``), which counts every byte the client sends
(HTTP/2 and gRPC framing, check-in, and for the secure round every poll and stage message), so the row
``"wire"`` holds ``plain_upload_bytes_per_client`` and ``secure_upload_bytes_per_client`` as the transport
saw them, their ratio, and the round's wall time. The clients send random updates (no training and no
model download, the same in both runs): the bytes do not depend on the values. ``--keep-rows`` measures
only this round and keeps the in-process rows already in ``--out`` (``wire_setup`` says when the wire row
was measured).

CPU times come from ``time.process_time`` in one process: clients and the coordinator run one after
the other, so the numbers do not depend on other load on the machine as much as wall time would, but
they do include the shared caches' contention. ``measure_table`` (every row, then the wire round) is what
``privacy_table.py``'s secagg section calls; this script's command line writes its result as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedrecon.core.secagg import SecAggServer, build_parameters
from fedrecon.core.secagg.local import DropoutPlan, RoundCosts, local_round
from fedrecon.core.secagg.messages import ID_BYTES

MOVIELENS_UPDATE_VALUES = 184_439


def measure(clients: int, *, vector_length: int = MOVIELENS_UPDATE_VALUES, dropout: float = 0.3,
            clip: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """One round with ``clients`` clients, ``dropout`` of them dropping before their masked input."""
    parameters = build_parameters(round_id=f"secagg-cost/{clients}/{seed}".encode(),
                                  clients=range(1, clients + 1), vector_length=vector_length, clip=clip,
                                  dropout=dropout, graph_seed=seed.to_bytes(8, "big"))
    rng = np.random.default_rng(seed)
    gone = set(rng.choice(np.arange(1, clients + 1), size=round(dropout * clients), replace=False).tolist())
    costs = RoundCosts()
    plain = np.zeros(vector_length, dtype=np.int64)
    quantise_s: dict[int, float] = {}

    def quantised(client: int) -> np.ndarray:
        update = np.random.default_rng([seed, client]).uniform(-clip, clip, vector_length)  # not timed
        start = time.process_time()
        q = parameters.quantiser.quantise(update, np.random.default_rng([seed, client, 1]))
        quantise_s[client] = time.process_time() - start
        plain[:] += q
        return q

    server = SecAggServer(parameters)
    wall = time.perf_counter()
    try:
        result = local_round(parameters, quantised, server=server, costs=costs,
                             dropouts=DropoutPlan(before_masked_input=gone))
        recovered = bool(np.array_equal(result.total.astype(np.int64), plain)) and result.dropped == gone
    except Exception as error:  # a failed round is a figure too: reported, not hidden
        print(f"  round with {clients} clients failed: {type(error).__name__}: {error}")
        recovered = False
    wall = time.perf_counter() - wall
    survivors = sorted(set(parameters.clients) - gone)
    client_s = [costs.client_seconds[c] + quantise_s.get(c, 0.0) for c in survivors]
    return {
        "clients": clients,
        "client_ms": 1000 * float(np.mean(client_s)),
        "coordinator_ms_per_client": 1000 * costs.coordinator_seconds / clients,
        "upload_bytes_per_client": float(np.mean([costs.upload_bytes[c] for c in survivors])),
        "plain_upload_bytes_per_client": ID_BYTES + 4 * vector_length,
        "download_bytes_per_client": float(np.mean([costs.download_bytes[c] for c in survivors])),
        "dropout_recovered": recovered,
        "dropped": len(gone),
        "neighbours": parameters.degree,
        "threshold": parameters.threshold,
        "vector_length": vector_length,
        "client_ms_max": 1000 * float(np.max(client_s)),
        "coordinator_ms_total": 1000 * costs.coordinator_seconds,
        "wall_s": wall,
    }


def measure_wire(clients: int, *, items: int = 3616, factors: int = 51, seed: int = 0) -> dict[str, Any]:
    """Bytes per client per round at the transport, plain and secure (see the module docstring)."""
    import logging

    logging.getLogger("fedrecon.server").setLevel(logging.ERROR)
    rng = np.random.default_rng(seed)
    updates = [rng.normal(0.0, 0.01, (items, factors)).astype(np.float32) for _ in range(clients)]
    row: dict[str, Any] = {"clients": clients, "update_values": items * factors}
    for kind in ("plain", "secure"):
        row.update({f"{kind}_{k}": v for k, v in _wire_round(kind == "secure", updates, seed).items()})
    row["secure_over_plain"] = row["secure_upload_bytes_per_client"] / row["plain_upload_bytes_per_client"]
    return row


def _wire_round(secure: bool, updates: list[np.ndarray], seed: int) -> dict[str, float]:
    """One round, every client in its own thread on its own connection through the relay."""
    import tempfile
    import threading

    from fedrecon.client.secure_report import SecureReporter
    from fedrecon.client.transport import CoordinatorChannel
    from fedrecon.core.aggregation import AggregationConfig
    from fedrecon.protocol import Assignment, ReportOutcome
    from fedrecon.server.app import start_server
    from fedrecon.server.coordinator import Coordinator
    from fedrecon.server.store import SqlStore
    from fedrecon.server.task import RoundSettings, TaskSpec
    from fedrecon.simulations.wire_tap import WireTap

    clients = len(updates)
    items, factors = updates[0].shape
    model = {"kind": "matrix_factorization", "num_items": items, "num_factors": factors}
    task = TaskSpec(name="wire", model=model, aggregation=AggregationConfig(secure_aggregation=secure),
                    rounds=RoundSettings(clients_per_round=clients, over_selection=1.0,
                                         min_reports=clients, max_check_ins_per_minute_per_peer=1e9))
    outcomes: list[ReportOutcome | None] = [None] * clients
    with tempfile.TemporaryDirectory(prefix="fedrecon-secagg-wire-") as tmp, \
            SqlStore(f"sqlite:///{Path(tmp) / 'coordinator.db'}") as store, \
            start_server(Coordinator(store, task)) as server, WireTap(server.port) as tap:
        channels = [CoordinatorChannel(channel=tap.device_channel(64 << 20)) for _ in range(clients)]
        assignments = []
        for i, channel in enumerate(channels):
            a = channel.check_in("wire", f"client-{i}")
            assert isinstance(a, Assignment), a
            assignments.append(a)

        def report(i: int) -> None:
            a, c = assignments[i], channels[i]
            if secure:
                outcomes[i] = SecureReporter(c, a, f"client-{i}", [updates[i]], 10.0,
                                             rng=np.random.default_rng([seed, i])).run()
            else:
                outcomes[i] = c.report(a, f"client-{i}", ["item_embedding"], [updates[i]], 10.0, {})

        start = time.perf_counter()
        threads = [threading.Thread(target=report, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if not server.coordinator.wait_for_version(1, timeout=120.0):
            raise RuntimeError(f"the {'secure' if secure else 'plain'} round did not commit")
        seconds = time.perf_counter() - start
        per_connection = tap.sent_per_connection()
        serialized = [c.bytes_uploaded for c in channels]  # the client library's own count
        for c in channels:
            c.close()
    if not all(o is not None and o.accepted for o in outcomes):
        raise RuntimeError(f"not every client's update was taken: {outcomes}")
    return {"upload_bytes_per_client": sum(per_connection) / clients,
            "serialized_upload_bytes_per_client": sum(serialized) / clients,
            "connections": len(per_connection), "round_s": seconds}


def machine_facts() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
            "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def print_row(row: dict[str, Any]) -> None:
    print(f"{row['clients']:>6} clients (k={row['neighbours']}, t={row['threshold']}, "
          f"{row['dropped']} dropped): client {row['client_ms']:.1f} ms, "
          f"coordinator {row['coordinator_ms_per_client']:.1f} ms/client, "
          f"upload {row['upload_bytes_per_client']:,.0f} B vs {row['plain_upload_bytes_per_client']:,} B "
          f"plain, recovered: {row['dropout_recovered']} ({row['wall_s']:.0f} s wall)", flush=True)


def print_wire(wire: dict[str, Any]) -> None:
    print(f"over gRPC, {wire['clients']} clients, {wire['update_values']:,} values: "
          f"plain {wire['plain_upload_bytes_per_client']:,.0f} B/client, secure "
          f"{wire['secure_upload_bytes_per_client']:,.0f} B/client at the transport "
          f"(x{wire['secure_over_plain']:.3f}); rounds {wire['plain_round_s']:.1f} s and "
          f"{wire['secure_round_s']:.1f} s wall", flush=True)


def measure_table(clients: Sequence[int] = (100, 1000), *, vector_length: int = MOVIELENS_UPDATE_VALUES,
                  dropout: float = 0.3, seed: int = 0, wire_clients: int = 10, wire_items: int = 3616,
                  wire_factors: int = 51,
                  on_row: Callable[[dict[str, Any]], None] | None = print_row) -> dict[str, Any]:
    """Every in-process row (``measure``), then the gRPC round (``measure_wire``; skipped when
    ``wire_clients`` is 0): ``{"secagg": rows, "wire": ..., "wire_setup": ..., "setup": ...}``, the JSON
    this script writes. ``on_row`` sees each row as it is measured (printing it, by default)."""
    rows = []
    for n in clients:
        row = measure(n, vector_length=vector_length, dropout=dropout, seed=seed)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    extra: dict[str, Any] = {}
    if wire_clients:
        wire = measure_wire(wire_clients, items=wire_items, factors=wire_factors, seed=seed)
        if on_row is not None:
            print_wire(wire)
        extra = {"wire": wire, "wire_setup": machine_facts()}
    return {"secagg": rows, **extra, "setup": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                              "machine": platform.machine(), "dropout": dropout,
                                              "seed": seed}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--vector-length", type=int, default=MOVIELENS_UPDATE_VALUES)
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wire-clients", type=int, default=10,
                        help="clients of the real gRPC round measured at the transport (0: skip)")
    parser.add_argument("--wire-items", type=int, default=3616)
    parser.add_argument("--wire-factors", type=int, default=51)
    parser.add_argument("--keep-rows", action="store_true",
                        help="measure only the gRPC round and keep the in-process rows (and their setup) "
                             "already in --out; the wire row gets its own setup facts")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.keep_rows:
        kept = json.loads(args.out.read_text())
        wire = None
        if args.wire_clients:
            wire = measure_wire(args.wire_clients, items=args.wire_items, factors=args.wire_factors,
                                seed=args.seed)
            print_wire(wire)
        kept.update({"wire": wire, "wire_setup": machine_facts()})
        args.out.write_text(json.dumps(kept, indent=2) + "\n")
        return
    result = measure_table(args.clients, vector_length=args.vector_length, dropout=args.dropout,
                           seed=args.seed, wire_clients=args.wire_clients, wire_items=args.wire_items,
                           wire_factors=args.wire_factors)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
