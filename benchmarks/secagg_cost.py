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
CPU times come from ``time.process_time`` in one process: clients and the coordinator run one after
the other, so the numbers do not depend on other load on the machine as much as wall time would, but
they do include the shared caches' contention. ``measure`` is what ``privacy_table.py``'s secagg section
calls.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--vector-length", type=int, default=MOVIELENS_UPDATE_VALUES)
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    for n in args.clients:
        row = measure(n, vector_length=args.vector_length, dropout=args.dropout, seed=args.seed)
        rows.append(row)
        print(f"{n:>6} clients (k={row['neighbours']}, t={row['threshold']}, {row['dropped']} dropped): "
              f"client {row['client_ms']:.1f} ms, "
              f"coordinator {row['coordinator_ms_per_client']:.1f} ms/client, "
              f"upload {row['upload_bytes_per_client']:,.0f} B vs {row['plain_upload_bytes_per_client']:,} B "
              f"plain, recovered: {row['dropout_recovered']} ({row['wall_s']:.0f} s wall)")
    result = {"secagg": rows, "setup": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                        "machine": platform.machine(), "dropout": args.dropout,
                                        "seed": args.seed}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
