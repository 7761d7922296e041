"""Simulation beyond one process: rounds on Ray workers, and a population of a million users.

    python benchmarks/simulator_scale.py --data ../shared/data/movielens/ml-1m-2998u --rounds 10 \
        --out benchmarks/results/simulator_speed.json

Two measurements, each part in a fresh process (so each peak RSS is that part's alone):

- ``ray``: the reference configuration of ``simulator_speed.py`` (MovieLens, 50 factors, 100 clients per
  round, batch 5) in process, then on a local Ray (``ray.init(num_cpus=2)``) with 1 and with 2 worker
  actors (one CPU and one TensorFlow thread each): median seconds per round after one warm-up round, and
  whether every round's model equals the in-process one within 1e-6.
- ``population_1e6``: 10⁶ synthetic users generated on demand (``simulations.population``), 1,000 clients per
  round, 50 factors over 1,000 items: seconds per round and peak RSS in process and on Ray with 2 workers
  (driver and each worker), against the same run on 10⁴ users (memory should not grow with the population).

Writes its keys into ``--out``, keeping the keys already there (``simulator_speed.py`` writes the in-process
speed into the same file). The machine's load average is recorded at the start and end of every part: on
a shared machine the figures are only comparable within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TOLERANCE = 1e-6


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _timed_rounds(runner: Any, state: Any, rounds: int) -> tuple[list[float], list[list[Any]]]:
    """Wall seconds of each round after the first (warm-up) and the globals after every round."""
    seconds, models = [], []
    for i in range(rounds + 1):
        t0 = time.perf_counter()
        state, _ = runner(state)
        if i:
            seconds.append(time.perf_counter() - t0)
        models.append([g.copy() for g in state.globals])
    return seconds, models


def part_ray(data_dir: str, rounds: int) -> dict[str, Any]:
    """In process, then Ray with 1 and 2 workers, on the MovieLens reference configuration."""
    import numpy as np
    import ray

    from fedrecon.core.algorithm import FedRecon
    from fedrecon.core.config import FedReconConfig
    from fedrecon.core.matrix_factorization import MatrixFactorization
    from fedrecon.simulations.ratings import load_dataset
    from fedrecon.simulations.ray_backend import RayRounds, start_local_ray
    from fedrecon.simulations.runner import Simulation, SimulationSettings

    start_load = load()
    data = load_dataset(data_dir)
    algorithm = FedRecon(MatrixFactorization(data.num_items, 50), FedReconConfig())
    settings = SimulationSettings(rounds=rounds + 1, clients_per_round=100, batch_size=5)
    sim = Simulation(algorithm, data.train, settings)
    local_s, local_models = _timed_rounds(sim.run_round, algorithm.initial_state(0), rounds)
    t0 = time.perf_counter()
    start_local_ray(2)
    ray_start_s = time.perf_counter() - t0
    out: dict[str, Any] = {"in_process": statistics.median(local_s)}
    worst = 0.0
    for workers in (1, 2):
        with RayRounds(algorithm, data.train, settings, workers=workers) as runner:
            s, models = _timed_rounds(runner, algorithm.initial_state(0), rounds)
        out[f"workers_{workers}"] = statistics.median(s)
        for mine, theirs in zip(models, local_models, strict=True):
            worst = max(worst, *(float(np.abs(a - b).max()) for a, b in zip(mine, theirs, strict=True)))
    ray.shutdown()
    out.update({"speedup_2_over_1": out["workers_1"] / out["workers_2"],
                "equal_to_in_process": worst <= TOLERANCE, "max_abs_difference": worst,
                "rounds": rounds, "clients_per_round": 100, "ray_start_seconds": ray_start_s,
                "ray_version": ray.__version__, "load_average": {"start": start_load, "end": load()}})
    return out


def part_population(num_users: int, rounds: int, workers: int) -> dict[str, Any]:
    """Rounds of 1,000 clients over ``num_users`` users made on demand; ``workers`` 0: in process."""
    from fedrecon.core.algorithm import FedRecon
    from fedrecon.core.config import FedReconConfig
    from fedrecon.core.matrix_factorization import MatrixFactorization
    from fedrecon.simulations.population import Population, SyntheticUsers
    from fedrecon.simulations.runner import Simulation, SimulationSettings

    start_load = load()
    users = SyntheticUsers(seed=0)
    population = Population(users, range(1, num_users + 1))
    algorithm = FedRecon(MatrixFactorization(users.num_items, 50), FedReconConfig())
    settings = SimulationSettings(rounds=rounds + 1, clients_per_round=1000, batch_size=5)
    out: dict[str, Any] = {"users": num_users, "clients_per_round": 1000, "rounds": rounds}
    if workers == 0:
        sim = Simulation(algorithm, population, settings)
        seconds, _ = _timed_rounds(sim.run_round, algorithm.initial_state(0), rounds)
    else:
        from fedrecon.simulations.ray_backend import RayRounds, start_local_ray

        ray = start_local_ray(workers)
        with RayRounds(algorithm, population, settings, workers=workers) as runner:
            seconds, _ = _timed_rounds(runner, algorithm.initial_state(0), rounds)
            out["worker_peak_rss_mb"] = runner.worker_peak_rss_mb()
        ray.shutdown()
        out["workers"] = workers
    out.update({"seconds_per_round": statistics.median(seconds), "peak_rss_mb": peak_rss_mb(),
                "load_average": {"start": start_load, "end": load()}})
    return out


def run_part(*args: str) -> dict[str, Any]:
    """One part in a fresh interpreter (its own peak RSS); its result is the last line it prints."""
    done = subprocess.run([sys.executable, __file__, "--part", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"part {' '.join(args)} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="MovieLens folder for the Ray comparison (ml-1m-2998u)")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds of the Ray comparison")
    parser.add_argument("--population-rounds", type=int, default=3)
    parser.add_argument("--population", type=int, default=1_000_000)
    parser.add_argument("--reference-population", type=int, default=10_000)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--part", nargs="+", help=argparse.SUPPRESS)  # internal: one part, JSON to stdout
    args = parser.parse_args()
    if args.part:
        kind, *rest = args.part
        result = (part_ray(rest[0], int(rest[1])) if kind == "ray"
                  else part_population(int(rest[0]), int(rest[1]), int(rest[2])))
        print(json.dumps(result))
        return
    if args.out is None or args.data is None:
        parser.error("--data and --out are required")

    started = load()
    ray_result = run_part("ray", args.data, str(args.rounds))
    print(f"ray (MovieLens, 100 clients/round): in process {ray_result['in_process']:.3f} s/round, "
          f"1 worker {ray_result['workers_1']:.3f}, 2 workers {ray_result['workers_2']:.3f} "
          f"(speed-up {ray_result['speedup_2_over_1']:.2f}x); equal to in process: "
          f"{ray_result['equal_to_in_process']} (max |diff| {ray_result['max_abs_difference']:.2e})")
    pop_rounds = str(args.population_rounds)
    reference = run_part("population", str(args.reference_population), pop_rounds, "0")
    in_process = run_part("population", str(args.population), pop_rounds, "0")
    on_ray = run_part("population", str(args.population), pop_rounds, "2")
    for name, r in (("reference", reference), ("in process", in_process), ("ray, 2 workers", on_ray)):
        extra = f", workers {r['worker_peak_rss_mb']}" if "worker_peak_rss_mb" in r else ""
        print(f"population {r['users']:,} ({name}): {r['seconds_per_round']:.2f} s/round of 1,000 clients, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB{extra}")

    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result["ray"] = ray_result
    result["population_1e6"] = {
        "seconds_per_round": in_process["seconds_per_round"], "peak_rss_mb": in_process["peak_rss_mb"],
        "in_process": in_process, "ray_2_workers": on_ray, "reference_population": reference,
        "peak_rss_ratio_to_reference": in_process["peak_rss_mb"] / reference["peak_rss_mb"]}
    result["scale_machine"] = {"cpus": os.cpu_count(), "load_average_start": started,
                               "load_average_end": load(),
                               "note": "shared machine: load average (1, 5, 15 min) at start and end"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
