"""Simulation rounds whose clients run on Ray (one machine or a cluster), with in-process results.

Ray (the engine under the most-used open federated learning simulator) runs the clients of each round:

1. At start, each of N worker actors receives its share of the training users once: user ``u`` belongs
   to worker ``u mod N`` and the worker's partition is put in Ray's object store once (a population
   generated on demand, ``population.Population``, is a few arrays: every worker gets the generator and
   makes its own users). Nothing about the data moves per round.
2. Each round the driver selects the clients exactly as the in-process simulator does, puts the global
   variables in the object store once, and asks each worker to train the selected users it owns.
3. A worker runs the same lock-step client step on its clients (``runner.train_and_fold``, the code the
   in-process round runs) and folds their updates through the round's aggregation stages, built by the
   same function (``runner.round_aggregate``): weight cap or uniform weights, norm clip or reject, per
   client, where the updates are. It returns the partial aggregate (``Aggregator.partial``: the running
   weighted sum and the report's counts; one model's worth, whatever its number of clients).
4. The driver merges the partials in worker order (``Aggregator.merge``) and applies the server step
   (``runner.finish_round``): DP noise, the adaptive clip bound and the server optimizer run once, there.

Every client's work is seeded by (seed, round, user), so a client trains identically on any worker; the
only difference from the in-process round is the order of the float sums (float32 within a worker, float64
across workers), about 1e-7 relative. Evaluation (validation and test users) runs in the driver.

A cluster run needs: ``ray start --head`` on one machine and ``ray start --address HEAD:6379`` on the
others, this package (with the ``sim-ray`` extra) installed in the same Python version on every node, and
``--address HEAD:6379`` given to ``fedrecon simulate``. The driver reads the data and ships each worker its
partition through the object store, so only the driver's machine needs the data files (a population needs
none).
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedrecon.core.aggregation import AggregationConfig, PartialAggregate
from fedrecon.core.algorithm import FedRecon, ServerState
from fedrecon.core.batching import ClientExamples
from fedrecon.core.config import FedReconConfig
from fedrecon.core.model import ReconstructionModel
from fedrecon.core.optimizers import OptimizerState
from fedrecon.simulations.population import Population
from fedrecon.simulations.runner import (
    RoundRecord,
    ShardTraining,
    SimulationSettings,
    choose_clients,
    finish_round,
    pack_group,
    round_aggregate,
    train_and_fold,
    user_ids_of,
)

log = logging.getLogger(__name__)

MISSING_RAY = ("the ray backend needs Ray: pip install 'fedrecon[sim-ray]' (or the package 'ray' in the "
               "version pyproject.toml's sim-ray extra names)")


def import_ray() -> Any:
    """The ``ray`` module, or an error saying how to install it."""
    try:
        import ray
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(MISSING_RAY, name="ray") from err
    return ray


LOCAL_START_ATTEMPTS = 3
"""How many times `start_local_ray` tries to start a local Ray. Ray waits a fixed 30 s for the node it
starts to register (not configurable); on a loaded 2-core machine its processes (GCS, raylet, workers) can
take longer than that to start, and a second start, with their code now in the page cache, goes through."""


LOCAL_WORKER_NICENESS = 0
"""The niceness of a local Ray's workers. Ray starts its workers at niceness 15 by default, so that a
driver doing the real work keeps priority; here the workers *are* the simulation (every client trains in
one), and at 15 any other process at normal priority starves them: measured on this 2-core machine with
four busy loops beside it, the workers' actors took over 7 minutes to build their client step, and a
round did not finish in 9 minutes. At 0 they share the machine like the process that started them."""


def start_local_ray(num_cpus: int | None) -> Any:
    """Start a local Ray with ``num_cpus`` CPUs (None: the machine's), no dashboard, workers' logs not
    copied here, workers at normal priority (`LOCAL_WORKER_NICENESS`); the ``ray`` module. A start that
    times out is shut down and tried again, up to `LOCAL_START_ATTEMPTS` times, so a busy machine delays
    a simulation rather than failing it."""
    ray = import_ray()
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     _system_config={"worker_niceness": LOCAL_WORKER_NICENESS})
            return ray
        except Exception as err:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(err) or attempt == LOCAL_START_ATTEMPTS:
                raise
            log.warning("a local Ray did not start within Ray's 30 s (attempt %d of %d, busy machine?): "
                        "trying again", attempt, LOCAL_START_ATTEMPTS)
            ray.shutdown()
    raise AssertionError("unreachable")


def owner(user_id: int, workers: int) -> int:
    """The worker that holds user ``user_id``'s data."""
    return int(user_id) % workers


def partition(train: Mapping[int, ClientExamples], worker: int, workers: int
              ) -> Mapping[int, ClientExamples]:
    """Worker ``worker``'s users: its share of a dict, or the whole generator of a population."""
    if isinstance(train, Population):
        return train
    return {u: e for u, e in train.items() if owner(u, workers) == worker}


class ShardWorker:
    """A Ray actor: one share of the training users and the compiled client step, kept for the whole run."""

    def __init__(self, model: ReconstructionModel, config: FedReconConfig, aggregation: AggregationConfig,
                 settings: SimulationSettings, clients: Mapping[int, ClientExamples], threads: int) -> None:
        import tensorflow as tf

        # One actor per CPU Ray gave it: TensorFlow's own pools would otherwise take every core of the
        # machine in each actor and the workers would fight over them.
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        self.algorithm = FedRecon(model, config, aggregation=aggregation)
        self.settings = settings
        self.clients = clients

    def train(self, globals_: list[np.ndarray], clip_bound: float | None, round_num: int,
              users: Sequence[int]) -> tuple[PartialAggregate, ShardTraining]:
        """Train ``users`` (all held here) on ``globals_`` and fold them through the round's stages."""
        state = ServerState(globals_, OptimizerState(), round_num - 1, clip_bound)
        aggregate = round_aggregate(self.algorithm, state, self.settings, round_num, len(users))
        packed = pack_group(self.algorithm, [self.clients[u] for u in users], users, settings=self.settings,
                            round_num=round_num)
        trained = train_and_fold(self.algorithm, globals_, packed, users, aggregate,
                                 settings=self.settings, round_num=round_num)
        return aggregate.partial(), trained

    def peak_rss_mb(self) -> float:
        """This worker's peak resident memory (what a population's round costs a worker)."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


class RayRounds:
    """A ``RoundRunner`` for ``Simulation`` whose rounds' clients run on ``workers`` Ray actors.

    Connects to the cluster at ``address`` (``ray.init(address=...)``), or, without one, starts a local Ray
    with ``workers`` CPUs; a Ray this process had already started is used as it is. Use as a context
    manager: leaving it ends the actors, and the local Ray it started."""

    def __init__(self, algorithm: FedRecon, train: Mapping[int, ClientExamples], settings: SimulationSettings,
                 *, workers: int | None = None, address: str | None = None, threads_per_worker: int = 1
                 ) -> None:
        ray = import_ray()
        self._ray = ray
        self._started_ray = False
        if workers is not None and workers < 1:
            raise ValueError("--ray-workers must be at least 1")
        if not ray.is_initialized():
            if address is None:
                start_local_ray((workers or 1) * threads_per_worker if workers else None)
            else:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            self._started_ray = True
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // threads_per_worker)
        self.workers = workers
        self.algorithm = algorithm
        self.settings = settings
        self.user_ids = user_ids_of(train)
        actor = ray.remote(num_cpus=threads_per_worker)(ShardWorker)
        # Each share is put in the object store once; an ObjectRef passed to the constructor reaches the
        # actor as its value.
        self._actors = [actor.remote(algorithm.model, algorithm.config, algorithm.aggregation, settings,
                                     ray.put(partition(train, k, workers)), threads_per_worker)
                        for k in range(workers)]

    def __call__(self, state: ServerState) -> tuple[ServerState, RoundRecord]:
        t0 = time.perf_counter()
        round_num = state.round_num + 1
        chosen = choose_clients(self.user_ids, self.settings, round_num)
        aggregate = round_aggregate(self.algorithm, state, self.settings, round_num, len(chosen))
        shares: list[list[int]] = [[] for _ in range(self.workers)]
        for u in chosen:
            shares[owner(u, self.workers)].append(u)
        globals_ref = self._ray.put(state.globals)  # the model goes to the object store once per round
        pending = [actor.train.remote(globals_ref, state.clip_bound, round_num, users)
                   for actor, users in zip(self._actors, shares, strict=True) if users]
        trained = ShardTraining()
        for partial, shard in self._ray.get(pending):  # in worker order: a deterministic sum
            aggregate.merge(partial)
            trained = trained + shard
        return finish_round(self.algorithm, state, aggregate, trained, num_clients=len(chosen), started=t0)

    def worker_peak_rss_mb(self) -> list[float]:
        """Each worker's peak resident memory so far, in MB."""
        return list(self._ray.get([actor.peak_rss_mb.remote() for actor in self._actors]))

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
        if self._started_ray:
            self._ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> RayRounds:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
