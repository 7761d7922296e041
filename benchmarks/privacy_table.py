"""What privacy costs: unseen-user RMSE and accuracy under user-level DP at ε = ∞, 8, 3, 1.

    python benchmarks/privacy_table.py --data ../shared/data/movielens/ml-1m-2998u \
        --out benchmarks/results/privacy_table.json

Every run uses the same aggregation so the rows differ only by noise: uniform weights, each update clipped
to ``--clip``, ``--clients-per-round`` users per round out of the training population (fixed-size
selection as a coordinator does, or ``--sampling poisson``),
the tuned MovieLens configuration of ``movielens_table.py`` otherwise. For a finite ε the noise multiplier
is calibrated by the accountant so that ``--rounds`` rounds spend exactly ε at ``--delta``; the ε = ∞ row is
the same pipeline without noise. Model selection uses validation users (outside the guarantee, like all
evaluation reports), the figures are on unseen test users.

Also answered without training: the noise multiplier a population of 10⁶ users would need for the same ε
and rounds (and the resulting noise on the mean, z·S/K), and who pays for DP: the RMSE of the test users
with the fewest ratings (bottom third) against those with the most (top third), with and without DP.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from movielens_table import tuned_spec

from fedrecon.core.aggregation import AggregationConfig, Weighting
from fedrecon.core.algorithm import FedRecon
from fedrecon.core.batching import pack_clients
from fedrecon.core.config import OptimizerSpec
from fedrecon.core.privacy import AccountantKind, DpOptions, Sampling, noise_multiplier_for
from fedrecon.simulations.experiment import ExperimentResult, ExperimentSpec, run_experiment
from fedrecon.simulations.ratings import FederatedRatings, load_dataset
from fedrecon.simulations.runner import local_rng


def per_user_rmse(result: ExperimentResult, spec: ExperimentSpec, data: FederatedRatings,
                  users: list[int]) -> float:
    """Example-weighted RMSE over ``users`` for the run's selected model (the same evaluation as the
    experiment's test figures, restricted to a group)."""
    algorithm = FedRecon(result.model, spec.config)
    s = spec.settings
    packed = pack_clients(result.model, [data.test[u] for u in users], spec.config, batch_size=s.batch_size,
                          local_rngs=[local_rng(7, 0, u) for u in users], evaluation=True)
    se, _, count = algorithm.client_step.evaluate_each(result.globals, packed, clip=s.eval_clip)
    return math.sqrt(float(se.sum()) / max(float(count.sum()), 1.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/movielens/ml-1m-2998u")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--clients-per-round", type=int, default=400)
    parser.add_argument("--clip", type=float, default=0.5, help="L2 bound S of one user's update")
    parser.add_argument("--server-lr", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-6)
    parser.add_argument("--epsilons", default="inf,8,3,1")
    parser.add_argument("--accountant", choices=[a.value for a in AccountantKind], default="rdp")
    parser.add_argument("--sampling", choices=[s.value for s in Sampling], default="fixed")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/privacy_table.json"))
    args = parser.parse_args()

    data = load_dataset(args.data)
    base = tuned_spec()
    spec = dataclasses.replace(
        base, config=base.config.replace(server_optimizer=OptimizerSpec("sgd", args.server_lr)),
        settings=dataclasses.replace(base.settings, rounds=args.rounds,
                                     clients_per_round=args.clients_per_round),
        aggregation=AggregationConfig(weighting=Weighting.UNIFORM, max_update_norm=args.clip))
    population = len(data.train)
    # Test users by how many ratings they have: the bottom and top thirds.
    by_count = sorted(data.test, key=lambda u: len(data.test[u]))
    third = len(by_count) // 3
    groups = {"fewest_ratings": by_count[:third], "most_ratings": by_count[-third:]}
    counts = {g: [len(data.test[u]) for u in users] for g, users in groups.items()}

    rows: dict[str, dict] = {}  # by ε as given
    for text in args.epsilons.split(","):
        epsilon = float(text)
        privacy = None if math.isinf(epsilon) else DpOptions(
            target_epsilon=epsilon, delta=args.delta, sampling=Sampling(args.sampling),
            accountant=AccountantKind(args.accountant))
        run_spec = dataclasses.replace(spec, privacy=privacy)
        t0 = time.perf_counter()
        result = run_experiment(run_spec, data)
        row = {"epsilon": epsilon if math.isfinite(epsilon) else None,  # null: no noise (ε = ∞)
               "test_rmse": result.test["rmse"], "test_accuracy": result.test["accuracy"],
               "validation_rmse": result.selected.get("rmse"), "selected_round": result.selected.get("round"),
               "wall_seconds": time.perf_counter() - t0,
               "rmse_by_group": {g: per_user_rmse(result, spec, data, users) for g, users in groups.items()}}
        if result.privacy is not None:
            z = result.privacy["noise_multiplier"]
            row.update(noise_multiplier=z, noise_std_on_mean=z * args.clip / args.clients_per_round,
                       epsilon_spent=result.privacy["epsilon_spent"],
                       epsilon_of_selected_round=result.privacy["epsilon_of_selected_round"])
            # The same ε and rounds for a population of a million users, at this and ten times the cohort.
            row["population_1e6"] = {
                str(k): {"noise_multiplier": (z6 := noise_multiplier_for(
                    epsilon, rounds=args.rounds, population=10**6, clients_per_round=k, delta=args.delta,
                    sampling=Sampling(args.sampling), accountant=AccountantKind(args.accountant))),
                    "noise_std_on_mean": z6 * args.clip / k}
                for k in (args.clients_per_round, 10 * args.clients_per_round)}
        rows[text] = row
        print(f"ε={text:>4}: test RMSE {row['test_rmse']:.4f}  accuracy {row['test_accuracy']:.4f}  "
              f"fewest-ratings RMSE {row['rmse_by_group']['fewest_ratings']:.4f}  most-ratings RMSE "
              f"{row['rmse_by_group']['most_ratings']:.4f}"
              + (f"  z={row['noise_multiplier']:.3f}  z(10^6 users)="
                 f"{row['population_1e6'][str(args.clients_per_round)]['noise_multiplier']:.4f}"
                 if "noise_multiplier" in row else ""), flush=True)

    dp = [{"epsilon": r["epsilon"], "delta": args.delta if r["epsilon"] is not None else None,
           "noise_multiplier": r.get("noise_multiplier", 0.0), "rmse": r["test_rmse"],
           "accuracy": r["test_accuracy"], "rmse_few_ratings": r["rmse_by_group"]["fewest_ratings"],
           "rmse_many_ratings": r["rmse_by_group"]["most_ratings"]} for r in rows.values()]
    out = {"dp": dp,
           "population_1e6_noise_multiplier": {text: r["population_1e6"] for text, r in rows.items()
                                               if "population_1e6" in r},
           "data": args.data, "population": population, "rounds": args.rounds, "sampling": args.sampling,
           "clients_per_round": args.clients_per_round, "sampling_rate": args.clients_per_round / population,
           "clip": args.clip, "delta": args.delta, "accountant": args.accountant, "server_lr": args.server_lr,
           "groups": {g: {"users": len(u), "ratings_min": min(counts[g]), "ratings_max": max(counts[g])}
                      for g, u in groups.items()},
           "runs": rows, "spec": spec.to_dict(),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, allow_nan=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
