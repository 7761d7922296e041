"""fedrecon against TensorFlow Federated's ``build_fed_recon``: the same experiment, both engines, one run.

    make tff-env   # once: the pinned TFF environment
    python benchmarks/tff_side_by_side.py --data ../shared/data/movielens/ml-1m-2998u --rounds 500 \
        --out benchmarks/results/tff_side_by_side.json
    python benchmarks/tff_side_by_side.py --task nwp --data ../shared/data/text/tinyshakespeare \
        --rounds 30 --out benchmarks/results/tff_side_by_side_nwp.json

``--task movielens`` (the default), matrix factorization:

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

``--task nwp``, a Keras model with a local layer: the personal-adapter row of ``benchmarks/nwp_table.py``
(``core.nextword``'s ``personal_layer`` variant: embedding 48, LSTM 96, a residual adapter after it that is
local and starts at zero, projection 48, 2,004 output classes) in that table's configuration (speakers with
100 tokens or more, split by seed 42, 2,000-word vocabulary from the training speakers, sequences of 16,
at most 256 per speaker; 20 clients per round, batches of 16, client and reconstruction SGD 0.5, one
epoch per phase capped at 4 steps, server Adam 0.01). The TFF worker rebuilds the model in tf.keras 2
(``tff/keras_bridge.py``). Both engines advance round by round from the same initial globals with the same
clients (``SideBySide``); seconds per round are again medians over rounds 2..N, fedrecon's around the whole
simulator round, TFF's around ``process.next`` in its process. Also written: the max abs difference of
the two engines' globals after each round, both training losses, and both engines' reconstruct-then-
evaluate loss and accuracy on the validation speakers after the last round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from nwp_table import load_texts, training_config

from fedrecon.core.aggregation import UNBOUNDED_MEAN
from fedrecon.core.config import FedReconConfig
from fedrecon.core.nextword import NextWordSizes, nextword_model, parameter_count
from fedrecon.simulations.experiment import ExperimentSpec, run_experiment
from fedrecon.simulations.ratings import load_dataset
from fedrecon.simulations.runner import SimulationSettings
from fedrecon.simulations.text import split_texts
from fedrecon.simulations.tff_backend import SideBySide

#: ``benchmarks/nwp_table.py``'s configuration of its committed table (its defaults)
NWP = {"vocab": 2000, "oov_buckets": 50, "seq_len": 16, "embedding": 48, "hidden": 96, "min_words": 100,
       "max_examples": 256, "clients_per_round": 20, "batch_size": 16, "steps_max": 4, "client_lr": 0.5,
       "server_optimizer": "adam", "server_lr": 0.01}


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "machine": platform.machine(), "platform": platform.platform()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("movielens", "nwp"), default="movielens")
    parser.add_argument("--data", required=True)
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--eval-every", type=int, default=25, help="movielens: validation every N rounds")
    parser.add_argument("--local-init", choices=("shared", "zeros"), default="shared",
                        help="movielens: shared: one ±0.05 draw for every client (what TFF does); zeros: "
                             "deterministic")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    report = nextword(args) if args.task == "nwp" else movielens(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


def movielens(args: argparse.Namespace) -> dict[str, Any]:
    """The MovieLens experiment through ``run_experiment``, once per engine."""
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
    return {"ours": ours, "tff": tff, "speedup": speedup,
            "rounds": args.rounds, "eval_every": args.eval_every, "local_init": args.local_init,
            "data": Path(args.data).name, "spec": spec.to_dict(), "cpus": os.cpu_count(),
            "machine": platform.machine()}


def nextword(args: argparse.Namespace) -> dict[str, Any]:
    """The personal-adapter next-word model, both engines round by round (``SideBySide``)."""
    c = NWP
    load_before = list(os.getloadavg())
    texts = load_texts(args.data)
    data = split_texts(texts, vocab_size=c["vocab"], seq_len=c["seq_len"], seed=42, min_words=c["min_words"],
                       oov_buckets=c["oov_buckets"], max_examples_per_user=c["max_examples"])
    sizes = NextWordSizes(data.vocabulary.size, seq_len=c["seq_len"], embedding=c["embedding"],
                          hidden=c["hidden"], oov_buckets=c["oov_buckets"])
    model = nextword_model(sizes, "personal_layer", accuracy_excludes=data.vocabulary.accuracy_excludes(),
                           seed=0)
    config = training_config("personal_layer", c["client_lr"], argparse.Namespace(
        server_optimizer=c["server_optimizer"], server_lr=c["server_lr"], steps_max=c["steps_max"]))
    settings = SimulationSettings(clients_per_round=c["clients_per_round"], batch_size=c["batch_size"],
                                  seed=0)
    print(f"{args.data}: {len(data.train)} training / {len(data.validation)} validation speakers, "
          f"{sizes.vocab_classes} classes", flush=True)
    t0 = time.perf_counter()
    with SideBySide(model, config, data.train, {**data.train, **data.validation}, settings) as pair:
        build_seconds = time.perf_counter() - t0
        differences = []
        for _ in range(args.rounds):
            differences.append(pair.step())
            ours, theirs = pair.records[-1]
            print(f"round {ours.round_num}: fedrecon {ours.seconds:.3f} s, TFF {theirs.seconds:.3f} s, "
                  f"max |Δ| {differences[-1]:.2e}, loss {ours.train_loss:.5f} / {theirs.train_loss:.5f}",
                  flush=True)
        validation = pair.evaluate(data.validation)
        tff_info = dict(pair.engine.info)

    def figures(side: int, evaluation: dict[str, float]) -> dict[str, Any]:
        seconds = [records[side].seconds for records in pair.records]
        return {"seconds_per_round": statistics.median(seconds[1:] or seconds),
                "first_round_seconds": seconds[0], "seconds": seconds,
                "train_loss": [records[side].train_loss for records in pair.records],
                "validation": evaluation}

    ours_figures, tff_figures = figures(0, validation[0]), figures(1, validation[1])
    speedup = tff_figures["seconds_per_round"] / ours_figures["seconds_per_round"]
    print(f"personal-layer next-word model: fedrecon {ours_figures['seconds_per_round']:.4f} s/round, "
          f"TFF {tff_figures['seconds_per_round']:.4f} s/round: {speedup:.1f}x; max |Δ| of the globals "
          f"after round 1 {differences[0]:.2e}, after round {args.rounds} {differences[-1]:.2e}; validation "
          f"loss {validation[0]['loss']:.6f} / {validation[1]['loss']:.6f}, accuracy "
          f"{validation[0]['accuracy']:.6f} / {validation[1]['accuracy']:.6f}", flush=True)
    return {"task": "nwp_personal_layer", "ours": ours_figures, "tff": tff_figures, "speedup": speedup,
            "max_abs_difference_per_round": differences, "rounds": args.rounds,
            "data": Path(args.data).name, "config": {**c, "training": config.to_dict()},
            "speakers": {"train": len(data.train), "validation": len(data.validation)},
            "parameters": parameter_count(model), "tff_build_seconds": tff_info.get("build_seconds"),
            "side_by_side_build_seconds": build_seconds, "tff_version": tff_info.get("tff_version"),
            "tff_tensorflow_version": tff_info.get("tensorflow_version"),
            **machine(), "load_average": {"start": load_before, "end": list(os.getloadavg())}}


if __name__ == "__main__":
    main()
