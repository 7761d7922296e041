"""Seconds per FedRecon round: lock-step simulator against one client at a time, in one process.

    python benchmarks/simulator_speed.py --data ../shared/data/movielens/ml-1m-2998u --rounds 20 \
        --out benchmarks/results/simulator_speed.json

Both paths run the same client step (``client_work``) with the reference configuration and 100 clients
per round. The reference path calls it once per client (``client_update``, what a device does, C = 1) and
folds each update into the running sum; the simulator packs all clients of a round into one call. The
figure is the median wall time per round after one warm-up round, and the ratio between the two.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fedrecon.core.algorithm import FedRecon
from fedrecon.core.client_work import client_update
from fedrecon.core.config import FedReconConfig
from fedrecon.core.matrix_factorization import MatrixFactorization
from fedrecon.simulations.ratings import load_dataset
from fedrecon.simulations.runner import Simulation, SimulationSettings, local_rng, select_clients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    data = load_dataset(args.data)
    model = MatrixFactorization(data.num_items, 50)
    algorithm = FedRecon(model, FedReconConfig())
    settings = SimulationSettings(rounds=args.rounds, clients_per_round=100, batch_size=5)
    sim = Simulation(algorithm, data.train, settings)

    state = algorithm.initial_state(0)
    lockstep = []
    for _ in range(args.rounds + 1):
        state, record = sim.run_round(state)
        lockstep.append(record.seconds)

    state = algorithm.initial_state(0)
    one_by_one = []
    for _ in range(args.rounds + 1):
        t0 = time.perf_counter()
        round_num = state.round_num + 1
        aggregate = algorithm.new_aggregate(max_clients=100, batch_size=5)
        for user in select_clients(sim.user_ids, 100, seed=settings.seed, round_num=round_num):
            update = client_update(algorithm.client_step, state.globals, data.train[user],
                                   batch_size=5, rng=local_rng(settings.seed, round_num, user))
            aggregate.fold_one(update.delta, update.weight)
        state = algorithm.server_update(state, aggregate)
        one_by_one.append(time.perf_counter() - t0)

    fast = statistics.median(lockstep[1:])
    slow = statistics.median(one_by_one[1:])
    result = {"rounds": args.rounds, "clients_per_round": 100,
              "lockstep_seconds_per_round": fast, "one_client_at_a_time_seconds_per_round": slow,
              "speedup": slow / fast, "cpus": os.cpu_count()}
    print(f"lock-step simulator:  {fast:.4f} s/round")
    print(f"one client at a time: {slow:.4f} s/round")
    print(f"speed-up:             {slow / fast:.1f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
