"""Tune the DP rows of ``privacy_table.py`` on *validation* users only.

    python benchmarks/tune_privacy.py --data ../shared/data/movielens/ml-1m-2998u \
        --try "eps=3 rounds=100 k=400 clip=1 opt=sgd lr=3" --try "eps=3 rounds=50 k=800 clip=0.5 lr=6"

Each ``--try`` is one configuration (keys: eps, rounds, k, clip, opt, lr, momentum, factors,
sampling; unset keys take the current ``privacy_table.TUNED`` row for that ε). It is trained exactly as a
table row would be (same spec, same noise calibration) and scored on validation users every
``--eval-every`` rounds; the best validation RMSE, its round, z and the time are printed and appended as
one JSON line to ``--out``. Test users are never evaluated: the data's test users are replaced by the
validation users before training, so choosing the table's configuration from this output cannot leak test
information.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from privacy_table import DpRun, dp_spec, tuned_run

from fedrecon.core.config import OptimizerSpec
from fedrecon.core.privacy import AccountantKind, Sampling
from fedrecon.simulations.experiment import run_experiment
from fedrecon.simulations.ratings import load_dataset

KEYS = {"eps", "rounds", "k", "clip", "opt", "lr", "momentum", "factors", "sampling"}


def parse_try(text: str) -> tuple[float, DpRun, Sampling | None]:
    """``"eps=3 rounds=100 k=400 clip=1 opt=sgd lr=3"`` -> (ε, the run, a sampling override)."""
    pairs = dict(item.split("=", 1) for item in text.split())
    unknown = set(pairs) - KEYS
    if unknown:
        raise SystemExit(f"unknown keys {sorted(unknown)} in {text!r}; use {sorted(KEYS)}")
    epsilon = float(pairs.get("eps", "inf"))
    base = tuned_run(epsilon)
    o = base.server_optimizer
    name = pairs.get("opt", o.name)
    momentum = float(pairs.get("momentum", o.momentum if name == o.name else 0.0))
    optimizer = OptimizerSpec(name, float(pairs.get("lr", o.learning_rate)), momentum=momentum)
    run = DpRun(int(pairs.get("rounds", base.rounds)), int(pairs.get("k", base.clients_per_round)),
                float(pairs.get("clip", base.clip)), optimizer, int(pairs.get("factors", base.num_factors)))
    return epsilon, run, Sampling(pairs["sampling"]) if "sampling" in pairs else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/movielens/ml-1m-2998u")
    parser.add_argument("--try", dest="tries", action="append", required=True, help="one configuration")
    parser.add_argument("--delta", type=float, default=1e-6)
    parser.add_argument("--sampling", choices=[s.value for s in Sampling], default="fixed")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/privacy_tuning.jsonl"))
    args = parser.parse_args()

    data = load_dataset(args.data)
    data = dataclasses.replace(data, test=data.validation)  # test users are never looked at
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for text in args.tries:
        epsilon, run, sampling = parse_try(text)
        sampling = sampling or Sampling(args.sampling)
        spec = dp_spec(run, epsilon, delta=args.delta, sampling=sampling, accountant=AccountantKind.RDP)
        settings = dataclasses.replace(spec.settings, eval_every=args.eval_every)
        spec = dataclasses.replace(spec, settings=settings)
        t0 = time.perf_counter()
        result = run_experiment(spec, data)
        curve = {int(v["round"]): round(v["rmse"], 4) for v in result.validation}
        row = {"epsilon": None if math.isinf(epsilon) else epsilon, "delta": args.delta,
               "sampling": str(sampling), "rounds": run.rounds, "clients_per_round": run.clients_per_round,
               "clip": run.clip, "factors": run.num_factors, "server_optimizer": run.server_optimizer.name,
               "server_lr": run.server_optimizer.learning_rate, "momentum": run.server_optimizer.momentum,
               "noise_multiplier": result.privacy["noise_multiplier"] if result.privacy else 0.0,
               "val_rmse": round(result.selected["rmse"], 4),
               "val_accuracy": round(result.selected["accuracy"], 4),
               "best_round": int(result.selected["round"]), "validation_curve": curve,
               "median_s_per_round": round(result.seconds_per_round or 0.0, 3),
               "wall_s": round(time.perf_counter() - t0, 1)}
        print(json.dumps({k: v for k, v in row.items() if k != "validation_curve"}), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
