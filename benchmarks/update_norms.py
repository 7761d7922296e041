"""Honest update norms: the distribution behind the default norm bound (``DEFAULT_MAX_UPDATE_NORM``).

    python benchmarks/update_norms.py --data ../shared/data/movielens/ml-1m-2998u --rounds 500 \
        --out benchmarks/results/update_norms.json

Trains with the simulator (no norm bound, so the trajectory is the unclipped one) and records the L2 norm
of every honest client update of every round, for the MovieLens reference and tuned configurations
(``movielens_table.py``) and for the embedded synthetic data with the ``simulate`` defaults. Prints
percentiles and the fraction of updates that the candidate bounds would clip.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from movielens_table import REFERENCE, tuned_spec

from fedrecon.core.aggregation import DEFAULT_MAX_UPDATE_NORM, AggregationConfig
from fedrecon.core.algorithm import FedRecon, ServerState
from fedrecon.core.batching import pack_clients
from fedrecon.simulations.experiment import ExperimentSpec, build_model
from fedrecon.simulations.ratings import FederatedRatings, load_dataset
from fedrecon.simulations.runner import local_rng, select_clients

BOUNDS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0)


def honest_norms(spec: ExperimentSpec, data: FederatedRatings, rounds: int) -> np.ndarray:
    """Every finite, non-empty client update's norm over ``rounds`` unclipped rounds."""
    model = build_model(spec, data, shared_user=False)
    algorithm = FedRecon(model, spec.config, aggregation=AggregationConfig(norm_policy="none"))
    s = dataclasses.replace(spec.settings, rounds=rounds)
    state: ServerState = algorithm.initial_state(s.seed)
    users = sorted(data.train)
    norms = []
    for _ in range(rounds):
        round_num = state.round_num + 1
        chosen = select_clients(users, s.clients_per_round, seed=s.seed, round_num=round_num)
        packed = pack_clients(model, [data.train[u] for u in chosen], algorithm.config,
                              batch_size=s.batch_size,
                              local_rngs=[local_rng(s.seed, round_num, u) for u in chosen])
        result = algorithm.client_step.train_clients(state.globals, packed)
        honest = result.finite & (result.weights > 0)
        norms.append(result.deltas.norms()[honest])
        aggregate = algorithm.new_aggregate(max_clients=len(chosen), batch_size=s.batch_size)
        aggregate.fold(result.deltas, result.weights)
        state = algorithm.server_update(state, aggregate)
    return np.concatenate(norms)


def describe(norms: np.ndarray) -> dict:
    q = np.percentile(norms, [50, 90, 99, 99.9])
    return {"updates": len(norms), "p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]),
            "p99_9": float(q[3]), "max": float(norms.max()),
            "fraction_above": {str(b): float((norms > b).mean()) for b in BOUNDS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="MovieLens folder")
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    movielens = load_dataset(args.data)
    synthetic = load_dataset("synthetic")
    runs = {"movielens_reference": (REFERENCE, movielens), "movielens_tuned": (tuned_spec(), movielens),
            "synthetic_defaults": (ExperimentSpec(), synthetic)}
    result: dict = {"rounds": args.rounds, "default_bound": DEFAULT_MAX_UPDATE_NORM}
    for name, (spec, data) in runs.items():
        result[name] = describe(honest_norms(spec, data, args.rounds))
        print(name, json.dumps(result[name]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
