"""How closely fedrecon's engine and TensorFlow Federated's ``build_fed_recon`` agree, round by round.

    make tff-env   # once
    python benchmarks/tff_parity.py --data ../shared/data/movielens/ml-1m-2998u --rounds 20 \
        --out benchmarks/results/tff_parity.json

For server SGD 1.0 (the reference configuration, 50 factors) and server Adam 0.01 (with biases), both
engines start from the same global weights, train the same 100 clients per round with the even/odd split,
and start every client's user factors at zero (the start every client shares must be the same in both; the
parity tests also run fedrecon's shared ±0.05 draw, which the TFF worker is given).
Printed and written: the max abs difference of the global weights after each round, and both engines'
validation RMSE and accuracy after the last round. The parity tests assert the same on fewer rounds.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fedrecon.core.config import FedReconConfig, OptimizerSpec
from fedrecon.core.matrix_factorization import MatrixFactorization
from fedrecon.simulations.ratings import load_dataset
from fedrecon.simulations.runner import SimulationSettings
from fedrecon.simulations.tff_backend import SideBySide

CASES = {
    "server_sgd": (False, OptimizerSpec("sgd", 1.0)),
    "server_adam_biases": (True, OptimizerSpec("adam", 0.01)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    data = load_dataset(args.data)
    report: dict[str, object] = {"rounds": args.rounds, "clients_per_round": 100,
                                 "data": Path(args.data).name}
    for name, (biases, server) in CASES.items():
        model = MatrixFactorization(data.num_items, 50, use_biases=biases, local_init="zeros",
                                    initial_offset=data.mean_rating if biases else 0.0)
        settings = SimulationSettings(clients_per_round=100, batch_size=5)
        with SideBySide(model, FedReconConfig(server_optimizer=server), data.train,
                        {**data.train, **data.validation}, settings) as pair:
            diffs = [pair.step() for _ in range(args.rounds)]
            ours, theirs = pair.evaluate(data.validation)
        report[name] = {"max_abs_difference_per_round": diffs, "validation_ours": ours,
                        "validation_tff": theirs}
        print(f"{name}: max |Δ| after round 1 {diffs[0]:.2e}, after round {args.rounds} {diffs[-1]:.2e}; "
              f"validation RMSE {ours['rmse']:.6f} (fedrecon) vs {theirs['rmse']:.6f} (TFF), "
              f"accuracy {ours['accuracy']:.6f} vs {theirs['accuracy']:.6f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
