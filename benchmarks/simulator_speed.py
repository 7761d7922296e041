"""Seconds per simulated FedRecon round: the XLA-compiled lock-step simulator, the previous (op-by-op graph)
lock-step path, one client at a time, and TensorFlow Federated, in one run.

    make tff-env   # once, for the TFF figure (without it the TFF figure is left out, with the reason)
    python benchmarks/simulator_speed.py --data ../shared/data/movielens/ml-1m-2998u --rounds 20 \
        --out benchmarks/results/simulator_speed.json

Every path runs the reference configuration (50 factors, 100 clients per round, batch 5, the paper's
reconstruction and client steps). ``fedrecon`` is the lock-step simulator with its training graph compiled
by XLA (``simulate --xla``); ``previous_path`` the same graph run op by op (the default until XLA was
added); ``one_client_at_a_time`` calls the client step once per client (what a device does, C = 1) and
folds each update; ``tff`` is TFF 0.87's ``build_fed_recon`` in its own environment (``process.next`` timed
inside the TFF process). Figures are medians over the rounds after the first (which includes tracing and
compilation); compilation is reported separately. The two lock-step paths also report the process's CPU
seconds per round (every thread), steadier than wall time on a shared machine. A whole process runs fast or
slow on this shared machine (a run's median moved by a third from one process to the next), so the XLA path
runs ``--repeats`` times (the first in this process, the others in fresh processes) and its figure is the
median over those runs; ``runs_seconds_per_round`` lists them.

``--reference CHECKOUT`` also times the XLA lock-step path of another checkout of this project (one with its
own ``.venv`` from ``make setup``, e.g. ``git worktree add ../ref <commit> && make -C ../ref setup``) in a
subprocess in the same run, with its own code, ``--repeats`` times alternating with this checkout's runs:
``reference`` and ``speedup_vs_reference`` (medians over runs) say what a change bought on the same machine
at the same load. Keys other than these (``ray``, ``population_1e6``,
written by ``simulator_scale.py``) are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fedrecon.core.aggregation import UNBOUNDED_MEAN
from fedrecon.core.algorithm import FedRecon
from fedrecon.core.client_work import client_update
from fedrecon.core.config import FedReconConfig
from fedrecon.core.matrix_factorization import MatrixFactorization
from fedrecon.simulations.ratings import FederatedRatings, load_dataset
from fedrecon.simulations.runner import Simulation, SimulationSettings, local_rng, select_clients

REPO = Path(__file__).resolve().parents[1]


def _lockstep_with_cpu(data: FederatedRatings, rounds: int, *, xla: bool) -> tuple[float, float, float]:
    """(median seconds per round after the first, seconds of the first round, median CPU seconds of the
    process per round after the first). The CPU counts every thread: the round, the packing thread and
    TensorFlow's own. It moves less than wall time when other work shares the machine, so it is the
    steadier figure for comparing changes."""
    algorithm = FedRecon(MatrixFactorization(data.num_items, 50), FedReconConfig())
    sim = Simulation(algorithm, data.train, SimulationSettings(rounds=rounds, clients_per_round=100,
                                                               batch_size=5, xla=xla))
    state = algorithm.initial_state(0)
    seconds, cpu = [], []
    try:
        for _ in range(rounds + 1):
            cpu_start = time.process_time()
            state, record = sim.run_round(state)
            cpu.append(time.process_time() - cpu_start)
            seconds.append(record.seconds)
    finally:
        sim.close()
    return statistics.median(seconds[1:]), seconds[0], statistics.median(cpu[1:])


def _fresh_run(checkout: Path, data: str, rounds: int, python: str | None = None
               ) -> tuple[float, float, float | None]:
    """The XLA lock-step path of a checkout (this one or a reference with its own ``.venv``) in a fresh
    process, timed by that checkout's own code: (median seconds per round, first round, median CPU
    seconds per round, or None from a checkout that does not measure CPU)."""
    code = ("import json, sys; sys.path.insert(0, 'benchmarks'); import simulator_speed as s; "
            "from fedrecon.simulations.ratings import load_dataset; "
            f"d = load_dataset({str(Path(data).resolve())!r}); "
            "f = getattr(s, '_lockstep_with_cpu', None); "
            f"r = f(d, {rounds}, xla=True) if f else (*s._lockstep(d, {rounds}, xla=True), None); "
            "print(json.dumps(r))")
    done = subprocess.run([python or str(checkout / ".venv" / "bin" / "python"), "-c", code], cwd=checkout,
                          capture_output=True, text=True, check=True)
    per_round, first, cpu = json.loads(done.stdout.strip().splitlines()[-1])
    return float(per_round), float(first), None if cpu is None else float(cpu)


def _commit(checkout: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True,
                          text=True, check=True).stdout.strip()


def _one_by_one(data: FederatedRatings, rounds: int) -> float:
    algorithm = FedRecon(MatrixFactorization(data.num_items, 50), FedReconConfig())
    user_ids = sorted(data.train)
    state = algorithm.initial_state(0)
    seconds = []
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        round_num = state.round_num + 1
        aggregate = algorithm.new_aggregate(max_clients=100, batch_size=5)
        for user in select_clients(user_ids, 100, seed=0, round_num=round_num):
            update = client_update(algorithm.client_step, state.globals, data.train[user],
                                   batch_size=5, rng=local_rng(0, round_num, user))
            aggregate.fold_one(update.delta, update.weight)
        state = algorithm.server_update(state, aggregate)
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds[1:])


def _tff(data: FederatedRatings, rounds: int) -> tuple[float | None, str | None]:
    from fedrecon.simulations.experiment import ExperimentSpec, run_experiment

    spec = ExperimentSpec(num_factors=50, local_init="shared", config=FedReconConfig(),
                          aggregation=UNBOUNDED_MEAN,
                          settings=SimulationSettings(rounds=rounds, clients_per_round=100, batch_size=5,
                                                      eval_every=10 ** 6, seed=0))
    try:
        result = run_experiment(spec, data, backend="tff")
    except Exception as err:  # no TFF environment here: say so instead of a figure
        return None, f"{type(err).__name__}: {err}"
    return result.seconds_per_round, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--one-by-one-rounds", type=int, default=5)
    parser.add_argument("--tff-rounds", type=int, default=6, help="0 leaves TFF out")
    parser.add_argument("--reference", type=Path, default=None,
                        help="another checkout (with its .venv) whose XLA lock-step path is timed too")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of the XLA path (the first in this process, the others and every "
                             "reference run each in a fresh process, alternating); the figure: their median")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    data = load_dataset(args.data)
    load_start = os.getloadavg()
    xla_runs = [_lockstep_with_cpu(data, args.rounds, xla=True)]
    graph, graph_first, graph_cpu = _lockstep_with_cpu(data, args.rounds, xla=False)
    slow = _one_by_one(data, args.one_by_one_rounds)
    # A fresh process runs fast or slow as a whole on this shared machine (a run's median moved by a third
    # between processes): the figure is the median over runs, alternating with the reference's.
    reference_runs = []
    for repeat in range(args.repeats):
        if args.reference:
            reference_runs.append(_fresh_run(args.reference, args.data, args.rounds))
        if repeat:
            xla_runs.append(_fresh_run(REPO, args.data, args.rounds, python=sys.executable))
    xla = statistics.median(r[0] for r in xla_runs)
    xla_first = xla_runs[0][1]
    xla_cpu = statistics.median(r[2] for r in xla_runs if r[2] is not None)
    reference = ((_commit(args.reference), statistics.median(r[0] for r in reference_runs),
                  reference_runs[0][1]) if args.reference else None)
    tff, tff_missing = (_tff(data, args.tff_rounds) if args.tff_rounds
                        else (None, "not asked (--tff-rounds 0)"))

    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    kept = {k: v for k, v in previous.items() if k in ("ray", "population_1e6", "scale_machine")}
    result = {
        "seconds_per_round": {"fedrecon": xla, "previous_path": graph, "one_client_at_a_time": slow,
                              "tff": tff},
        "first_round_seconds": {"fedrecon": xla_first, "previous_path": graph_first},
        "cpu_seconds_per_round": {"fedrecon": xla_cpu, "previous_path": graph_cpu},
        "speedup_vs_previous_path": graph / xla,
        "speedup_vs_tff": tff / xla if tff else None,
        "reference": ({"commit": reference[0], "seconds_per_round": reference[1],
                       "first_round_seconds": reference[2]} if reference else None),
        "speedup_vs_reference": reference[1] / xla if reference else None,
        "tff_missing": tff_missing,
        "repeats": args.repeats,
        "runs_seconds_per_round": {"fedrecon": [r[0] for r in xla_runs],
                                   "reference": [r[0] for r in reference_runs] or None},
        "rounds": args.rounds, "one_by_one_rounds": args.one_by_one_rounds, "tff_rounds": args.tff_rounds,
        "clients_per_round": 100, "data": Path(args.data).name, "cpus": os.cpu_count(),
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        **kept,
    }
    print(f"lock-step, XLA (fedrecon):       {xla * 1000:.1f} ms/round, CPU {xla_cpu * 1000:.1f} ms "
          f"(first round {xla_first:.1f} s)")
    print(f"lock-step, op by op (previous):  {graph * 1000:.1f} ms/round ({graph / xla:.2f}x slower), "
          f"CPU {graph_cpu * 1000:.1f} ms")
    print(f"one client at a time:            {slow * 1000:.1f} ms/round ({slow / xla:.1f}x slower)")
    print(f"  runs: {', '.join(f'{r[0] * 1000:.1f}' for r in xla_runs)} ms/round")
    if reference:
        print(f"reference checkout ({reference[0]}):  {reference[1] * 1000:.1f} ms/round "
              f"({reference[1] / xla:.2f}x slower; runs: "
              f"{', '.join(f'{r[0] * 1000:.1f}' for r in reference_runs)})")
    if tff:
        print(f"TFF build_fed_recon:             {tff * 1000:.1f} ms/round ({tff / xla:.0f}x slower)")
    else:
        print(f"TFF: no figure ({tff_missing})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
