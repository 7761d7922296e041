"""Issue 13's privacy table in one run: what DP costs, what secure aggregation costs, what compression saves.

    python benchmarks/privacy_table.py --data ../shared/data/movielens/ml-1m-2998u \
        --out benchmarks/results/privacy_table.json

writes ``{"dp": [...], "population_1e6_noise_multiplier": {...}, "secagg": [...], "compression": [...]}``
plus each section's setup (``dp_setup``, ``secagg_setup``, ``compression_setup``, and ``secagg_wire`` with
its ``secagg_wire_setup``: the same update over real gRPC, plain and secure, counted at the transport),
``section_wall_seconds``, ``sections_run`` and ``machine``. ``--sections dp,secagg,compression`` (default:
all) picks what this run measures; a section not run keeps what an existing ``--out`` file holds for it.
The file is rewritten after every section, with ``sections_pending`` naming what is still to come (the key
is gone once the run is complete), so a long run shows its progress.

**dp**: unseen-user RMSE and accuracy under user-level DP at ε = ∞, 8, 3, 1 (``--epsilons``). Every run
uses the same aggregation so the rows differ by noise and by the configuration tuned for it: uniform
weights, each update clipped to S, K users per round out of the training population (fixed-size selection
as a coordinator does, or ``--sampling poisson``), the tuned MovieLens configuration of
``movielens_table.py`` otherwise. Rounds, K, S, the server optimizer and the number of factors are chosen
per ε on validation users with ``tune_privacy.py`` (``TUNED``; ``--rounds``, ``--clients-per-round``,
``--clip``, ``--server-*`` and ``--factors`` override them for every DP row); each row's JSON (``runs``)
states its own. For a finite ε the noise multiplier is calibrated by the accountant so that the row's
rounds spend exactly ε at ``--delta``; the ε = ∞ row is the same pipeline without noise. Model selection
uses validation users (outside the guarantee, like all evaluation reports), the figures are on unseen test
users. Also answered without training: the noise multiplier a population of 10⁶ users would need for the
same ε and rounds (and the resulting noise on the mean, z·S/K), and who pays for DP: the RMSE of the test
users with the fewest ratings (bottom third) against those with the most (top third), with and without DP.

**secagg**: ``secagg_cost.measure_table``: one in-process SecAgg+ round per ``--secagg-clients`` (default
100 and 1,000) with a MovieLens-sized update and 30% dropouts, client and coordinator CPU and bytes per
client, then one real loopback gRPC round each way (``--secagg-wire-clients``, 0 skips it). Its docstring
defines the figures.

**compression**: ``compression_table.measure_table``: per codec of ``--compression-codecs`` (default all)
the bytes a client sends in one real loopback round, counted by the transport, and the unseen-user RMSE of
the tuned configuration trained ``--compression-rounds`` rounds (default 500) of
``--compression-clients-per-round`` (100) with every upload encoded. Its docstring defines the figures.
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
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from movielens_table import tuned_spec

from fedrecon.core.aggregation import AggregationConfig, Weighting
from fedrecon.core.algorithm import FedRecon
from fedrecon.core.batching import pack_clients
from fedrecon.core.compression import UploadCodec
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


#: The sections in the order they run, and the keys of the JSON each one writes: a run that leaves a
#: section out keeps these keys from the file it rewrites.
SECTIONS: dict[str, tuple[str, ...]] = {
    "dp": ("dp", "population_1e6_noise_multiplier", "dp_setup", "runs"),
    "secagg": ("secagg", "secagg_setup", "secagg_wire", "secagg_wire_setup"),
    "compression": ("compression", "compression_setup"),
}


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


def measure_dp(data: FederatedRatings, args: argparse.Namespace) -> dict[str, Any]:
    """The dp section: one training per ε of ``--epsilons``, each row printed as it finishes."""
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
    return {"dp": dp,
            "population_1e6_noise_multiplier": {text: r["population_1e6"] for text, r in rows.items()
                                                if "population_1e6" in r},
            "dp_setup": {"data": args.data, "population": population, "sampling": args.sampling,
                         "delta": args.delta, "accountant": args.accountant,
                         "groups": {g: {"users": len(u), "ratings_min": min(counts[g]),
                                        "ratings_max": max(counts[g])} for g, u in groups.items()},
                         "spec": tuned_spec().to_dict()},
            "runs": rows}


def measure_secagg(args: argparse.Namespace) -> dict[str, Any]:
    """The secagg section: ``secagg_cost.measure_table`` with the ``--secagg-*`` sizes."""
    import secagg_cost  # imported here: only this section needs the secagg extra (cryptography)

    table = secagg_cost.measure_table(
        args.secagg_clients, vector_length=args.secagg_vector_length, dropout=args.secagg_dropout,
        seed=args.secagg_seed, wire_clients=args.secagg_wire_clients, wire_items=args.secagg_wire_items,
        wire_factors=args.secagg_wire_factors)
    out = {"secagg": table["secagg"],
           "secagg_setup": {**table["setup"], "vector_length": args.secagg_vector_length,
                            "runs": "in process, one round per row (core.secagg.local_round)"}}
    if "wire" in table:
        out.update(secagg_wire=table["wire"], secagg_wire_setup=table["wire_setup"])
    return out


def measure_compression(data: FederatedRatings, args: argparse.Namespace) -> dict[str, Any]:
    """The compression section: ``compression_table.measure_table`` with the ``--compression-*`` sizes."""
    import compression_table  # imported here: it imports the server (grpc, the store)

    table = compression_table.measure_table(
        data, data_name=args.data, rounds=args.compression_rounds,
        clients_per_round=args.compression_clients_per_round, byte_clients=args.compression_byte_clients,
        codecs=[UploadCodec(c.strip()) for c in args.compression_codecs.split(",")])
    rows = table.pop("compression")
    return {"compression": rows, "compression_setup": table}


def machine_facts() -> dict[str, Any]:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "load_average_start": list(os.getloadavg()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def write_json(path: Path, out: dict[str, Any]) -> None:
    """Replace ``path`` whole (a reader never sees half a file)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(out, indent=2, allow_nan=False) + "\n")
    partial.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/movielens/ml-1m-2998u")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma-separated sections to measure (default: all); the others keep what "
                             "--out holds")
    dp = parser.add_argument_group("dp section")
    dp.add_argument("--rounds", type=int, help="override every DP row's tuned rounds")
    dp.add_argument("--clients-per-round", type=int, help="override every DP row's tuned K")
    dp.add_argument("--clip", type=float, help="override every DP row's L2 bound S of one user's update")
    dp.add_argument("--server-optimizer", choices=SERVER_OPTIMIZERS, help="override every DP row's")
    dp.add_argument("--server-lr", type=float, help="override every DP row's server learning rate")
    dp.add_argument("--server-momentum", type=float, help="override every DP row's server momentum")
    dp.add_argument("--factors", type=int, help="override every DP row's number of item factors")
    dp.add_argument("--delta", type=float, default=1e-6)
    dp.add_argument("--epsilons", default="inf,8,3,1")
    dp.add_argument("--accountant", choices=[a.value for a in AccountantKind], default="rdp")
    dp.add_argument("--sampling", choices=[s.value for s in Sampling], default="fixed")
    sa = parser.add_argument_group("secagg section (secagg_cost.py's options)")
    sa.add_argument("--secagg-clients", type=int, nargs="+", default=[100, 1000])
    sa.add_argument("--secagg-vector-length", type=int, default=184_439,
                    help="values per update (default: the MovieLens update size)")
    sa.add_argument("--secagg-dropout", type=float, default=0.3)
    sa.add_argument("--secagg-seed", type=int, default=0)
    sa.add_argument("--secagg-wire-clients", type=int, default=10,
                    help="clients of the real gRPC round, plain and secure (0: skip it)")
    sa.add_argument("--secagg-wire-items", type=int, default=3616)
    sa.add_argument("--secagg-wire-factors", type=int, default=51)
    co = parser.add_argument_group("compression section (compression_table.py's options)")
    co.add_argument("--compression-rounds", type=int, default=500, help="training rounds for the RMSE")
    co.add_argument("--compression-clients-per-round", type=int, default=100)
    co.add_argument("--compression-byte-clients", type=int, default=20,
                    help="clients of the real round whose bytes are counted")
    co.add_argument("--compression-codecs", default=",".join(c.value for c in UploadCodec))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/privacy_table.json"))
    args = parser.parse_args()
    chosen = {name.strip() for name in args.sections.split(",") if name.strip()}
    if not chosen or chosen - set(SECTIONS):
        parser.error(f"--sections takes a comma-separated subset of {','.join(SECTIONS)}")
    sections = [name for name in SECTIONS if name in chosen]

    # A section left out keeps what the file already holds for it (and its wall time).
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    out: dict[str, Any] = {"sections_pending": list(sections), "sections_run": [], "section_wall_seconds": {}}
    for name in SECTIONS:
        if name not in sections:
            out.update({k: previous[k] for k in SECTIONS[name] if k in previous})
            if name in previous.get("section_wall_seconds", {}):
                out["section_wall_seconds"][name] = previous["section_wall_seconds"][name]
    out["machine"] = machine_facts()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, out)

    data = load_dataset(args.data) if {"dp", "compression"} & chosen else None
    for name in sections:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        if name == "dp":
            assert data is not None
            out.update(measure_dp(data, args))
        elif name == "secagg":
            out.update(measure_secagg(args))
        else:
            assert data is not None
            out.update(measure_compression(data, args))
        out["section_wall_seconds"][name] = time.perf_counter() - t0
        out["sections_run"].append(name)
        out["sections_pending"].remove(name)
        if not out["sections_pending"]:
            del out["sections_pending"]
            out["machine"].update(load_average_end=list(os.getloadavg()),
                                  finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
        write_json(args.out, out)
        print(f"== {name}: {out['section_wall_seconds'][name]:.0f} s; wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
