"""What privacy costs: unseen-user RMSE and accuracy under user-level DP at ε = ∞, 8, 3, 1.

    python benchmarks/privacy_table.py --data ../shared/data/movielens/ml-1m-2998u \
        --out benchmarks/results/privacy_table.json

Every run uses the same aggregation so the rows differ by noise and by the configuration tuned for it:
uniform weights, each update clipped to S, K users per round out of the training population (fixed-size
selection as a coordinator does, or ``--sampling poisson``), the tuned MovieLens configuration of
``movielens_table.py`` otherwise. Rounds, K, S, the server optimizer and the number of factors are chosen
per ε on validation users with ``tune_privacy.py`` (``TUNED``; the command line can override them for
every row); each row's JSON states its own. For a finite ε the noise multiplier is calibrated by the
accountant so that the row's rounds spend exactly ε at ``--delta``; the ε = ∞ row is the same pipeline
without noise. Model selection uses validation users (outside the guarantee, like all evaluation
reports), the figures are on unseen test users.

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
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from movielens_table import tuned_spec

from fedrecon.core.aggregation import AggregationConfig, Weighting
from fedrecon.core.algorithm import FedRecon
from fedrecon.core.batching import pack_clients
from fedrecon.core.config import OptimizerSpec
from fedrecon.core.optimizers import SERVER_OPTIMIZERS
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


#: Keys of the deliverable JSON that other benchmarks fill in; rewriting the DP rows keeps them.
SHARED_KEYS = ("secagg", "compression")


@dataclass(frozen=True)
class DpRun:
    """What a row trains with besides the noise: rounds, cohort K, clip S and the server optimizer."""

    rounds: int
    clients_per_round: int
    clip: float
    server_optimizer: OptimizerSpec
    # Item factors: the noise is added to every global coordinate, so its norm grows with the model's
    # size (√(items·(factors+1))) while the users' signal concentrates on few directions.
    num_factors: int = 50

    def describe(self) -> str:
        o = self.server_optimizer
        extra = f" momentum {o.momentum:g}" if o.name == "momentum" else ""
        return (f"{self.rounds} rounds, K={self.clients_per_round}, S={self.clip:g}, server {o.name} "
                f"lr {o.learning_rate:g}{extra}, {self.num_factors} factors")


#: Per-ε configuration, chosen on validation users with ``tune_privacy.py`` (see its log in the module
#: docstring there and in benchmarks/results/privacy_tuning.jsonl). Keys are the ε as written on the CLI.
TUNED: dict[str, DpRun] = {
    # No noise: as many rounds as non-DP training affords (validation 0.9228 at 300, still improving).
    "inf": DpRun(300, 400, 1.0, OptimizerSpec("sgd", 3.0)),
    # With noise what matters is the server step times the clip (lr·S) against z·S/K: S = 0.3 and
    # lr·S 1.5 / 0.6 / 0.2; 10 factors (the noise's norm grows with the model, the signal does not).
    "8": DpRun(100, 400, 0.3, OptimizerSpec("sgd", 5.0), num_factors=10),
    "3": DpRun(100, 400, 0.3, OptimizerSpec("sgd", 2.0), num_factors=10),
    "1": DpRun(100, 400, 0.3, OptimizerSpec("sgd", 0.67), num_factors=10),
}


def tuned_run(epsilon: float) -> DpRun:
    """The tuned row for ``epsilon`` (the nearest tuned ε at or below it, so an untuned ε errs noisy)."""
    if math.isinf(epsilon):
        return TUNED["inf"]
    finite = sorted((float(k), v) for k, v in TUNED.items() if k != "inf")
    below = [v for e, v in finite if e <= epsilon]
    return below[-1] if below else finite[0][1]


def overridden(run: DpRun, args: argparse.Namespace) -> DpRun:
    """``run`` with the command line's overrides (options left unset keep the tuned value)."""
    o = run.server_optimizer
    name = args.server_optimizer or o.name
    optimizer = OptimizerSpec(
        name, args.server_lr if args.server_lr is not None else o.learning_rate,
        momentum=args.server_momentum if args.server_momentum is not None else (
            o.momentum if name == o.name else 0.0))
    return DpRun(args.rounds or run.rounds, args.clients_per_round or run.clients_per_round,
                 args.clip if args.clip is not None else run.clip, optimizer, args.factors or run.num_factors)


def dp_spec(run: DpRun, epsilon: float, *, delta: float, sampling: Sampling,
            accountant: AccountantKind) -> ExperimentSpec:
    """The tuned MovieLens FedRecon spec with DP aggregation: uniform weights, every update clipped to
    ``run.clip``; Gaussian noise calibrated to (ε, δ) over ``run.rounds`` (no noise for ε = ∞)."""
    base = tuned_spec()
    privacy = None if math.isinf(epsilon) else DpOptions(
        target_epsilon=epsilon, delta=delta, sampling=sampling, accountant=accountant)
    return dataclasses.replace(
        base, num_factors=run.num_factors, config=base.config.replace(server_optimizer=run.server_optimizer),
        settings=dataclasses.replace(base.settings, rounds=run.rounds,
                                     clients_per_round=run.clients_per_round),
        aggregation=AggregationConfig(weighting=Weighting.UNIFORM, max_update_norm=run.clip), privacy=privacy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/movielens/ml-1m-2998u")
    parser.add_argument("--rounds", type=int, help="override every row's tuned rounds")
    parser.add_argument("--clients-per-round", type=int, help="override every row's tuned K")
    parser.add_argument("--clip", type=float, help="override every row's L2 bound S of one user's update")
    parser.add_argument("--server-optimizer", choices=SERVER_OPTIMIZERS, help="override every row's")
    parser.add_argument("--server-lr", type=float, help="override every row's server learning rate")
    parser.add_argument("--server-momentum", type=float, help="override every row's server momentum")
    parser.add_argument("--factors", type=int, help="override every row's number of item factors")
    parser.add_argument("--delta", type=float, default=1e-6)
    parser.add_argument("--epsilons", default="inf,8,3,1")
    parser.add_argument("--accountant", choices=[a.value for a in AccountantKind], default="rdp")
    parser.add_argument("--sampling", choices=[s.value for s in Sampling], default="fixed")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/privacy_table.json"))
    args = parser.parse_args()

    data = load_dataset(args.data)
    population = len(data.train)
    # Test users by how many ratings they have: the bottom and top thirds.
    by_count = sorted(data.test, key=lambda u: len(data.test[u]))
    third = len(by_count) // 3
    groups = {"fewest_ratings": by_count[:third], "most_ratings": by_count[-third:]}
    counts = {g: [len(data.test[u]) for u in users] for g, users in groups.items()}

    sampling, accountant = Sampling(args.sampling), AccountantKind(args.accountant)
    rows: dict[str, dict] = {}  # by ε as given
    for text in args.epsilons.split(","):
        epsilon = float(text)
        run = overridden(tuned_run(epsilon), args)
        run_spec = dp_spec(run, epsilon, delta=args.delta, sampling=sampling, accountant=accountant)
        t0 = time.perf_counter()
        result = run_experiment(run_spec, data)
        row = {"epsilon": epsilon if math.isfinite(epsilon) else None,  # null: no noise (ε = ∞)
               "configuration": {"rounds": run.rounds, "clients_per_round": run.clients_per_round,
                                 "sampling_rate": run.clients_per_round / population, "clip": run.clip,
                                 "num_factors": run.num_factors,
                                 "server_optimizer": run.server_optimizer.to_dict()},
               "test_rmse": result.test["rmse"], "test_accuracy": result.test["accuracy"],
               "validation_rmse": result.selected.get("rmse"), "selected_round": result.selected.get("round"),
               "wall_seconds": time.perf_counter() - t0,
               "rmse_by_group": {g: per_user_rmse(result, run_spec, data, users)
                                 for g, users in groups.items()}}
        if result.privacy is not None:
            z = result.privacy["noise_multiplier"]
            row.update(noise_multiplier=z, noise_std_on_mean=z * run.clip / run.clients_per_round,
                       epsilon_spent=result.privacy["epsilon_spent"],
                       epsilon_of_selected_round=result.privacy["epsilon_of_selected_round"])
            # The same ε and rounds for a population of a million users, at this and ten times the cohort.
            row["population_1e6"] = {
                str(k): {"noise_multiplier": (z6 := noise_multiplier_for(
                    epsilon, rounds=run.rounds, population=10**6, clients_per_round=k, delta=args.delta,
                    sampling=sampling, accountant=accountant)),
                    "noise_std_on_mean": z6 * run.clip / k}
                for k in (run.clients_per_round, 10 * run.clients_per_round)}
        rows[text] = row
        by_group = row["rmse_by_group"]
        print(f"ε={text:>4} ({run.describe()}): test RMSE {row['test_rmse']:.4f}  accuracy "
              f"{row['test_accuracy']:.4f}  fewest-ratings RMSE {by_group['fewest_ratings']:.4f}  "
              f"most-ratings RMSE {by_group['most_ratings']:.4f}  validation RMSE "
              f"{row['validation_rmse']:.4f} (round {row['selected_round']:g})"
              + (f"  z={row['noise_multiplier']:.3f}  z(10^6 users)="
                 f"{row['population_1e6'][str(run.clients_per_round)]['noise_multiplier']:.4f}"
                 if "noise_multiplier" in row else ""), flush=True)

    dp = [{"epsilon": r["epsilon"], "delta": args.delta if r["epsilon"] is not None else None,
           "noise_multiplier": r.get("noise_multiplier", 0.0), "rmse": r["test_rmse"],
           "accuracy": r["test_accuracy"], "rmse_few_ratings": r["rmse_by_group"]["fewest_ratings"],
           "rmse_many_ratings": r["rmse_by_group"]["most_ratings"]} for r in rows.values()]
    out = {"dp": dp,
           "population_1e6_noise_multiplier": {text: r["population_1e6"] for text, r in rows.items()
                                               if "population_1e6" in r},
           "data": args.data, "population": population, "sampling": args.sampling, "delta": args.delta,
           "accountant": args.accountant,
           "groups": {g: {"users": len(u), "ratings_min": min(counts[g]), "ratings_max": max(counts[g])}
                      for g, u in groups.items()},
           "runs": rows, "spec": tuned_spec().to_dict(),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    # The secure-aggregation and compression tables share this file but come from their own benchmarks:
    # keep whatever they wrote.
    if args.out.is_file():
        previous = json.loads(args.out.read_text())
        out.update({k: previous[k] for k in SHARED_KEYS if k in previous})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, allow_nan=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
