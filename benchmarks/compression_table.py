"""What compressed uploads save and cost: bytes a client sends per round, and unseen-user RMSE.

    python benchmarks/compression_table.py --data ../shared/data/movielens/ml-1m-2998u \\
        --out benchmarks/results/compression_table.json

For each codec of ``--codecs`` (``core.compression``; default: all of them):

- ``upload_bytes_per_client``: the bytes one client sends to the coordinator in one round, counted on the
  socket by a loopback relay (``simulations.wire_tap``): everything it sends (check-in, vocabulary and model
  requests, its report) with gRPC and HTTP/2 framing, each client on its own connection. ``--byte-clients``
  users of the tuned MovieLens task take part in the first round of a real coordinator over loopback,
  each with the client library, encoding as the task's assignment says.
  ``serialized_upload_bytes_per_client`` is the client library's own count (serialized request messages),
  the figure of ``coordinator_load.py``.
- ``rmse`` / ``accuracy``: the tuned MovieLens configuration (``movielens_table.tuned_spec``) trained in
  process for ``--rounds`` rounds with every client's upload encoded and decoded by the codec (the same
  functions the client library and the coordinator run; a quantised round draws its rounding from
  ``upload_rng(seed, round, user)``, as over gRPC), the round selected on validation users, scored once on
  all unseen test users.

``measure_table`` (every codec: bytes, then training) is what ``privacy_table.py``'s compression section
calls; this script's command line writes its result as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from movielens_table import tuned_spec

from fedrecon.client import FederatedClient
from fedrecon.core.aggregation import AggregationConfig
from fedrecon.core.compression import UploadCodec
from fedrecon.server.app import start_server
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.store import SqlStore
from fedrecon.simulations.experiment import ExperimentSpec, build_model, run_experiment
from fedrecon.simulations.grpc_transport import simulation_task
from fedrecon.simulations.ratings import FederatedRatings, load_dataset
from fedrecon.simulations.runner import local_rng, select_clients, upload_rng
from fedrecon.simulations.wire_tap import WireTap

MAX_MESSAGE_BYTES = 4 << 20


def measure_upload(spec: ExperimentSpec, data: FederatedRatings, codec: UploadCodec, clients: int
                   ) -> dict[str, float]:
    """One real round over loopback with ``clients`` clients: the bytes each sends, as the relay saw them."""
    model = build_model(spec, data, shared_user=False)
    settings = dataclasses.replace(spec.settings, clients_per_round=clients, rounds=1)
    aggregation = dataclasses.replace(spec.aggregation, upload_codec=codec)
    task = simulation_task("compression", model, spec.config, settings, len(data.train), aggregation)
    seed = settings.seed
    users = select_clients(sorted(data.train), clients, seed=seed, round_num=1)
    with tempfile.TemporaryDirectory(prefix="fedrecon-compression-") as tmp, \
            SqlStore(f"sqlite:///{Path(tmp) / 'coordinator.db'}") as store, \
            start_server(Coordinator(store, task)) as server, WireTap(server.port) as tap:
        serialized = []
        for user in users:
            channel = tap.device_channel(MAX_MESSAGE_BYTES)  # its own connection, as a device has
            with FederatedClient(None, task.name, f"user-{user}", data.train[user],
                                 channel=channel) as client:
                report = client.participate(rng_for=lambda _a, u=user: local_rng(seed, 1, u),
                                            upload_rng_for=lambda _a, u=user: upload_rng(seed, 1, u),
                                            max_wait_s=60.0)
                if not report.in_round:
                    raise RuntimeError(f"user {user}: {report.status} {report.message}")
                serialized.append(client.transport.bytes_uploaded)
        if not server.coordinator.wait_for_version(1, timeout=60.0):
            raise RuntimeError("the measured round did not commit")
        per_connection = tap.sent_per_connection()
    return {"upload_bytes_per_client": sum(per_connection) / clients,
            "upload_bytes_median_client": statistics.median(per_connection),
            "connections": len(per_connection),
            "serialized_upload_bytes_per_client": sum(serialized) / clients}


def print_row(row: dict[str, Any]) -> None:
    print(f"{row['codec']:>14}: {row['upload_bytes_per_client']:>10,.0f} B/client/round on the wire "
          f"({row['serialized_upload_bytes_per_client']:,.0f} serialized)  test RMSE {row['rmse']:.4f}  "
          f"accuracy {row['accuracy']:.4f}  ({row['seconds_per_round']:.3f} s/round)", flush=True)


def measure_table(data: FederatedRatings, *, data_name: str, rounds: int = 500, clients_per_round: int = 100,
                  byte_clients: int = 20, codecs: Sequence[UploadCodec] = tuple(UploadCodec),
                  on_row: Callable[[dict[str, Any]], None] | None = print_row) -> dict[str, Any]:
    """For each codec the bytes of one real round of ``byte_clients`` clients, then the RMSE after
    ``rounds`` rounds of ``clients_per_round``: ``{"compression": rows, ...}``, the JSON this script
    writes (``data_name`` is what it records as the data). ``on_row`` sees each row as it is measured."""
    logging.getLogger("fedrecon.server").setLevel(logging.ERROR)  # not "created task ..." for every codec
    base = tuned_spec()
    spec = dataclasses.replace(base, settings=dataclasses.replace(
        base.settings, rounds=rounds, clients_per_round=clients_per_round))
    rows = []
    for codec in codecs:
        t0 = time.perf_counter()
        wire = measure_upload(spec, data, codec, byte_clients)
        result = run_experiment(dataclasses.replace(spec, aggregation=AggregationConfig(upload_codec=codec)),
                                data)
        row = {"codec": codec.value, **wire, "rmse": result.test["rmse"], "accuracy": result.test["accuracy"],
               "validation_rmse": result.selected.get("rmse"), "selected_round": result.selected.get("round"),
               "seconds_per_round": result.seconds_per_round, "wall_seconds": time.perf_counter() - t0}
        rows.append(row)
        if on_row is not None:
            on_row(row)
    plain = next((r["upload_bytes_per_client"] for r in rows if r["codec"] == UploadCodec.NONE), None)
    if plain:
        for r in rows:
            r["bytes_vs_none"] = r["upload_bytes_per_client"] / plain
    return {"compression": rows, "data": data_name, "rounds": rounds,
            "clients_per_round": clients_per_round, "byte_clients": byte_clients,
            "bytes_measured": "client-to-coordinator bytes on each client's TCP connection (loopback relay), "
                              "whole participation in round 1, all calls, gRPC/HTTP/2 framing included",
            "spec": spec.to_dict(), "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/movielens/ml-1m-2998u")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compression_table.json"))
    parser.add_argument("--rounds", type=int, default=500, help="training rounds for the RMSE column")
    parser.add_argument("--clients-per-round", type=int, default=100)
    parser.add_argument("--byte-clients", type=int, default=20, help="clients whose bytes are counted")
    parser.add_argument("--codecs", default=",".join(c.value for c in UploadCodec))
    args = parser.parse_args()

    codecs = [UploadCodec(c.strip()) for c in args.codecs.split(",")]
    data = load_dataset(args.data)
    print(f"{args.data}: {len(data.train)} training users, {data.num_items} items; tuned configuration, "
          f"{args.rounds} rounds of {args.clients_per_round} clients; bytes over {args.byte_clients} "
          "clients of one real round on loopback", flush=True)
    out = measure_table(data, data_name=args.data, rounds=args.rounds, codecs=codecs,
                        clients_per_round=args.clients_per_round, byte_clients=args.byte_clients)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, allow_nan=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
