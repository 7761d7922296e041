"""Simulation rounds carried out through a real coordinator on loopback, by the real client library.

Each round selects the same users with the same seeds as the in-process simulator; each selected user is a
``FederatedClient`` that checks in, downloads, runs the shared client step with the same local initialisation
(``local_rng(seed, round, user)``) and, when the task shuffles each round, the same order of its examples
(``shuffle_rng(seed, round, user)``), then reports over gRPC. The coordinator folds the reports, applies the
same server step and commits to its store, and the simulation continues from the downloaded new version.
So with the same seeds the model after N rounds equals the in-process one up to float summation order.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from fedrecon.client import FederatedClient
from fedrecon.client.transport import CoordinatorChannel
from fedrecon.core.aggregation import AggregationConfig
from fedrecon.core.algorithm import ServerState
from fedrecon.core.batching import ClientExamples
from fedrecon.core.config import FedReconConfig
from fedrecon.core.model import ReconstructionModel
from fedrecon.simulations.runner import (
    RoundRecord,
    SimulationSettings,
    local_rng,
    select_clients,
    shuffle_rng,
    upload_rng,
)


def simulation_task(name: str, model: ReconstructionModel, config: FedReconConfig,
                    settings: SimulationSettings, num_users: int,
                    aggregation: AggregationConfig | None = None):  # type: ignore[no-untyped-def]
    """A coordinator task that runs rounds exactly as the simulator does: every selected user reports."""
    from fedrecon.server.task import RoundSettings, TaskSpec

    per_round = min(settings.clients_per_round, num_users)
    rounds = RoundSettings(clients_per_round=per_round, over_selection=1.0, min_reports=per_round,
                           selection_timeout_s=600.0, reporting_timeout_s=600.0, retry_delay_s=(0.05, 0.2),
                           max_rounds=settings.rounds,
                           # simulated clients check in back to back, all from this one host
                           max_check_ins_per_minute=1e6, max_check_ins_per_minute_per_peer=1e9)
    return TaskSpec(name=name, model=model.config(), training=config,  # type: ignore[attr-defined]
                    rounds=rounds, aggregation=aggregation or AggregationConfig(),
                    batch_size=settings.batch_size, seed=settings.seed)


class GrpcRounds:
    """A ``RoundRunner`` for ``Simulation``: starts a coordinator (store in ``store_url``, default a fresh
    SQLite file), then plays each round through it."""

    def __init__(self, model: ReconstructionModel, config: FedReconConfig,
                 train: Mapping[int, ClientExamples], settings: SimulationSettings, *,
                 store_url: str | None = None, task_name: str = "simulation", workers: int = 8,
                 aggregation: AggregationConfig | None = None) -> None:
        from fedrecon.server.app import start_server
        from fedrecon.server.coordinator import Coordinator
        from fedrecon.server.store import SqlStore

        self.train = train
        self.settings = settings
        self.user_ids = sorted(train)
        self._tmp = tempfile.TemporaryDirectory(prefix="fedrecon-grpc-") if store_url is None else None
        url = store_url or f"sqlite:///{Path(self._tmp.name) / 'coordinator.db'}"  # type: ignore[union-attr]
        self.store = SqlStore(url)
        self.task = simulation_task(task_name, model, config, settings, len(self.user_ids), aggregation)
        # Version 0 is the simulation's own start (for a Keras model built by the app: its weights).
        self.coordinator = Coordinator(self.store, self.task,
                                       initial_globals=model.initial_globals(settings.seed))
        self.server = start_server(self.coordinator, host="127.0.0.1", port=0)
        self.channel = grpc.insecure_channel(self.server.address)
        if self.task.aggregation.secure_aggregation:  # every client of a secure round waits for the others
            workers = max(workers, self.task.rounds.clients_per_round)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="simulated-client")
        self._observer = CoordinatorChannel(channel=self.channel)

    def close(self) -> None:
        self._pool.shutdown()
        self.channel.close()
        self.server.stop()
        self.store.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> GrpcRounds:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _play(self, user: int, round_num: int) -> tuple[float, float, float]:
        client = FederatedClient(None, self.task.name, f"user-{user}", self.train[user], channel=self.channel)
        report = client.participate(rng_for=lambda _a: local_rng(self.settings.seed, round_num, user),
                                    upload_rng_for=lambda _a: upload_rng(self.settings.seed, round_num, user),
                                    order_rng_for=lambda _a: shuffle_rng(self.settings.seed, round_num, user),
                                    max_wait_s=60.0)
        if not report.in_round:
            raise RuntimeError(f"user {user}: report refused in round {round_num}: {report.status} "
                               f"{report.message}")
        seen = report.metrics["post_recon_examples"]
        return report.metrics["loss"] * seen, seen, report.weight

    def __call__(self, state: ServerState) -> tuple[ServerState, RoundRecord]:
        t0 = time.perf_counter()
        round_num = state.round_num + 1
        s = self.settings
        chosen = select_clients(self.user_ids, s.clients_per_round, seed=s.seed, round_num=round_num)
        results = list(self._pool.map(lambda u: self._play(u, round_num), chosen))
        if not self.coordinator.wait_for_version(round_num, timeout=60.0):
            raise RuntimeError(f"the coordinator did not commit round {round_num}")
        _, globals_ = self._observer.download(self.task.name, round_num)
        loss = sum(r[0] for r in results)
        seen = sum(r[1] for r in results)
        record = RoundRecord(round_num=round_num, seconds=time.perf_counter() - t0,
                             train_loss=loss / max(seen, 1.0), num_clients=len(chosen),
                             total_weight=sum(r[2] for r in results))
        # The server optimizer's state lives in the coordinator; the simulator only needs the globals.
        return ServerState(globals_, state.optimizer_state, round_num), record
