"""Sweep FedRecon variants on MovieLens, scored on *validation* users only.

Every variant is trained with the same split and seeds; the script prints and appends one JSON line per
variant (best validation RMSE, its round, accuracy there, seconds per round). Test users are never
evaluated here, so choosing the table's configuration from this output cannot leak test information.

    python benchmarks/tune_movielens.py --data ../shared/data/movielens/ml-1m-2998u --rounds 500 \
        --only reference,biases --out benchmarks/results/tuning.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fedrecon.core.config import FedReconConfig, OptimizerSpec
from fedrecon.simulations.experiment import ExperimentSpec, build_model, selection_key
from fedrecon.simulations.ratings import load_dataset
from fedrecon.simulations.runner import SimulationSettings

REF = FedReconConfig()


def variants(rounds: int) -> dict[str, ExperimentSpec]:
    s = SimulationSettings(rounds=rounds, eval_every=25)
    clip = SimulationSettings(rounds=rounds, eval_every=25, eval_clip=(1.0, 5.0))

    def spec(config: FedReconConfig = REF, *, biases: bool = False, settings: SimulationSettings = s
             ) -> ExperimentSpec:
        return ExperimentSpec(use_biases=biases, config=config, settings=settings)

    def server(name: str, lr: float, **kw: float) -> FedReconConfig:
        return REF.replace(server_optimizer=OptimizerSpec(name, lr, **kw))

    return {
        "reference": spec(),
        "clip": spec(settings=clip),
        "biases": spec(biases=True),
        "biases_clip": spec(biases=True, settings=clip),
        "biases_momentum_0.5": spec(server("momentum", 0.5, momentum=0.9), biases=True, settings=clip),
        "biases_momentum_0.2": spec(server("momentum", 0.2, momentum=0.9), biases=True, settings=clip),
        "biases_sgd_2": spec(server("sgd", 2.0), biases=True, settings=clip),
        "biases_adam_0.003": spec(server("adam", 0.003), biases=True, settings=clip),
        "biases_yogi_0.01": spec(server("yogi", 0.01), biases=True, settings=clip),
        "biases_recon_lr_0.3": spec(REF.replace(reconstruction_optimizer=OptimizerSpec("sgd", 0.3)),
                                    biases=True, settings=clip),
        "biases_eval_recon_100": spec(REF.replace(eval_recon_epochs=10, eval_recon_steps_max=100),
                                      biases=True, settings=clip),
        "biases_client_lr_1": spec(REF.replace(client_optimizer=OptimizerSpec("sgd", 1.0)), biases=True,
                                   settings=clip),
        "biases_post_epochs_2": spec(REF.replace(post_recon_epochs=2), biases=True, settings=clip),
        "biases_momentum_0.3": spec(server("momentum", 0.3, momentum=0.9), biases=True, settings=clip),
        "biases_adam_0.002": spec(server("adam", 0.002), biases=True, settings=clip),
        "biases_adam_0.003_l2_0.003": spec(server("adam", 0.003).replace(reconstruction_l2=0.003),
                                           biases=True, settings=clip),
        "biases_adam_0.003_l2_0.03": spec(server("adam", 0.003).replace(reconstruction_l2=0.03),
                                          biases=True, settings=clip),
        "biases_adam_0.003_eval_recon_100": spec(
            server("adam", 0.003).replace(eval_recon_epochs=10, eval_recon_steps_max=100),
            biases=True, settings=clip),
        "biases_sgd_3": spec(server("sgd", 3.0), biases=True, settings=clip),
        "biases_sgd_2_l2_0.01": spec(server("sgd", 2.0).replace(reconstruction_l2=0.01), biases=True,
                                     settings=clip),
        "biases_sgd_2_eval_recon_100": spec(
            server("sgd", 2.0).replace(eval_recon_epochs=10, eval_recon_steps_max=100),
            biases=True, settings=clip),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tuning.jsonl"))
    args = parser.parse_args()

    from fedrecon.core.algorithm import FedRecon
    from fedrecon.simulations.runner import Simulation

    data = load_dataset(args.data)
    table = variants(args.rounds)
    names = [n for n in args.only.split(",") if n] or list(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        spec = table[name]
        model = build_model(spec, data, shared_user=False)
        algorithm = FedRecon(model, spec.config)
        sim = Simulation(algorithm, data.train, spec.settings)
        t0 = time.perf_counter()
        _, history = sim.run(algorithm.initial_state(spec.settings.seed), validation=data.validation)
        best = min(history.validation, key=selection_key)
        times = sorted(r.seconds for r in history.rounds[1:])
        row = {"variant": name, "rounds": args.rounds, "best_round": best["round"],
               "val_rmse": round(best["rmse"], 4), "val_accuracy": round(best["accuracy"], 4),
               "final_val_rmse": round(history.validation[-1]["rmse"], 4),
               "median_s_per_round": round(times[len(times) // 2], 4),
               "wall_s": round(time.perf_counter() - t0, 1)}
        print(json.dumps(row), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
