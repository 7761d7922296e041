"""fedrecon against TensorFlow Federated's ``build_fed_recon``: the same experiment, both engines, one run.

    make tff-env   # once: the pinned TFF environment
    python benchmarks/tff_side_by_side.py --data ../shared/data/movielens/ml-1m-2998u --rounds 500 \
        --out benchmarks/results/tff_side_by_side.json

Both engines run ``simulations.experiment.run_experiment`` with the reference configuration (100 clients
per round, batch 5, reconstruction SGD 0.1 for 5 epochs capped at 50 steps, client SGD 0.5 capped at 50
steps, server SGD 1.0, 50 factors, user factors starting from one ±0.05 draw shared by all clients, which
is what TFF 0.87 does; ``--local-init zeros`` makes both engines deterministic): the same data, user split,
client selection per round and validation-based choice of the round to keep, scored once on the unseen test
users. Only the computation differs: this project's lock-step client step, or TFF 0.87 in its own environment
(``--backend tff``).

Seconds per round are medians over rounds 2..N (round 1 includes tracing). For TFF they time
``process.next`` inside the TFF process, so the time spent passing weights between processes is not charged
to TFF (nor is building its clients' datasets, done once up front; fedrecon's time includes packing each
round's clients). Peak resident memory: this process for fedrecon (data included); for TFF the Python
worker only (TFF's C++ executor is another process, not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fedrecon.core.aggregation import UNBOUNDED_MEAN
from fedrecon.core.config import FedReconConfig
from fedrecon.simulations.experiment import ExperimentSpec, run_experiment
from fedrecon.simulations.ratings import load_dataset
from fedrecon.simulations.runner import SimulationSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--local-init", choices=("shared", "zeros"), default="shared",
                        help="shared: one ±0.05 draw for every client (what TFF does); zeros: deterministic")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    data = load_dataset(args.data)
    # Both engines aggregate alike: TFF's plain weighted mean (fedrecon's default also clips and caps).
    spec = ExperimentSpec(num_factors=50, local_init=args.local_init, config=FedReconConfig(),
                          aggregation=UNBOUNDED_MEAN,
                          settings=SimulationSettings(rounds=args.rounds, clients_per_round=100, batch_size=5,
                                                      eval_every=args.eval_every, seed=0))
    figures = {}
    for backend in ("fedrecon", "tff"):
        t0 = time.perf_counter()
        result = run_experiment(spec, data, backend=backend)
        figures[backend] = {
            "seconds_per_round": result.seconds_per_round,
            "rmse": result.test["rmse"], "accuracy": result.test["accuracy"],
            "selected_round": int(result.selected["round"]), "validation_rmse": result.selected["rmse"],
            "wall_seconds": time.perf_counter() - t0,
            # fedrecon computes in this process; TFF in the worker, the only child this process waits for.
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF if backend == "fedrecon"
                                              else resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        }
        print(f"{backend:9s} {figures[backend]['seconds_per_round']:.4f} s/round  "
              f"test RMSE {result.test['rmse']:.4f}  accuracy {result.test['accuracy']:.4f}  "
              f"(round {figures[backend]['selected_round']} picked on validation, "
              f"{figures[backend]['wall_seconds']:.0f} s in all)", flush=True)
    ours, tff = figures["fedrecon"], figures["tff"]
    speedup = tff["seconds_per_round"] / ours["seconds_per_round"]
    print(f"speed-up per round: {speedup:.1f}x; test RMSE fedrecon - TFF = {ours['rmse'] - tff['rmse']:+.4f}")
    report = {"ours": ours, "tff": tff, "speedup": speedup,
              "rounds": args.rounds, "eval_every": args.eval_every, "local_init": args.local_init,
              "data": Path(args.data).name, "spec": spec.to_dict(), "cpus": os.cpu_count(),
              "machine": platform.machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
