"""What an app embeds: take part in FedRecon rounds and personalize, against a coordinator.

``FederatedClient.participate()`` is one round, end to end:

1. Check in; when told to come back later, wait a random delay inside the coordinator's retry window
   (so refused devices spread out) and check in again.
2. Download the assignment's global variables (cached per model version).
3. Run the FedRecon client step (``core.client_work.client_update``, the very code the simulator runs):
   reconstruct fresh local variables with the globals frozen, then update the globals with the locals
   frozen.
4. Report the delta of the global trainable variables, its weight and metrics. ``ClientUpdate`` has no
   field for local variables, so they cannot be sent; they are dropped when the round ends.

Nothing about a round is kept afterwards (clients are stateless between rounds).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import grpc
import numpy as np

from fedrecon.client.personalization import Personalization
from fedrecon.client.transport import TRANSIENT, CoordinatorChannel, RetryPolicy
from fedrecon.core.batching import ClientExamples, pack_clients
from fedrecon.core.client_work import ClientStep, ClientUpdate, EvaluationSums, client_update
from fedrecon.core.config import FedReconConfig
from fedrecon.core.model_spec import model_from_config
from fedrecon.v1 import coordinator_pb2 as pb

RngFor = Callable[[pb.Assignment], np.random.Generator]


@dataclass(frozen=True)
class RoundReport:
    """What happened to this client's round (as the coordinator answered it)."""

    round_id: int
    round_num: int
    model_version: int
    accepted: bool  # this call folded the update into the round
    weight: float
    metrics: dict[str, float]
    message: str
    status: str = "OK"  # the gRPC status of the report: OK, or why it was refused (ABORTED, ...)

    @property
    def in_round(self) -> bool:
        """The update is in the round's aggregate (now, or by an earlier identical attempt)."""
        return self.status == "OK"


class NoAssignment(Exception):
    """The coordinator kept asking this client to come back later until the wait ran out."""


_steps: dict[tuple[str, str], ClientStep] = {}
_steps_lock = threading.Lock()


def client_step_for(model_spec_json: str, training_json: str) -> ClientStep:
    """One ``ClientStep`` per (model, configuration) in a process, so many simulated clients share one
    traced TensorFlow graph."""
    key = (model_spec_json, training_json)
    with _steps_lock:
        if key not in _steps:
            _steps[key] = ClientStep(model_from_config(json.loads(model_spec_json)),
                                     FedReconConfig.from_dict(json.loads(training_json)))
        return _steps[key]


class FederatedClient:
    """One device's handle on a task served by a coordinator."""

    def __init__(self, target: str | None, task: str, client_id: str,
                 data: ClientExamples | Callable[[], ClientExamples], *,
                 channel: grpc.Channel | None = None, retry: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep, token: str | None = None,
                 tls: grpc.ChannelCredentials | None = None) -> None:
        self.task = task
        self.client_id = client_id
        self._data = data
        self.transport = CoordinatorChannel(target, channel=channel, retry=retry, token=token, tls=tls)
        self._sleep = sleep
        self._cache: tuple[int, list[str], list[np.ndarray]] | None = None

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> FederatedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def examples(self) -> ClientExamples:
        return self._data() if callable(self._data) else self._data

    # ----- rounds --------------------------------------------------------------------------------------
    def check_in(self, *, max_wait_s: float = 600.0) -> pb.Assignment:
        """Check in until assigned, honouring each retry window; ``NoAssignment`` after ``max_wait_s``."""
        give_up = time.monotonic() + max_wait_s
        capabilities = {"num_examples": str(len(self.examples()))}
        while True:
            response = self.transport.check_in(self.task, self.client_id, capabilities)
            if response.WhichOneof("outcome") == "assignment":
                return response.assignment
            window = response.retry
            lo = window.delay_min.ToNanoseconds() / 1e9
            hi = max(lo, window.delay_max.ToNanoseconds() / 1e9)
            delay = random.uniform(lo, hi)
            if time.monotonic() + delay > give_up:
                raise NoAssignment(f"no assignment within {max_wait_s:g} s (last answer: {window.reason})")
            self._sleep(delay)

    def globals_for(self, version: int) -> tuple[list[str], list[np.ndarray]]:
        if self._cache is None or self._cache[0] != version:
            names, arrays = self.transport.download(self.task, version, self.client_id)
            self._cache = (version, names, arrays)
        return self._cache[1], self._cache[2]

    def train(self, assignment: pb.Assignment, rng: np.random.Generator | None = None
              ) -> tuple[list[str], ClientUpdate]:
        """Download and run the FedRecon client step for ``assignment``; nothing is sent."""
        step = client_step_for(assignment.model_spec_json, assignment.training_config_json)
        names, globals_ = self.globals_for(assignment.model_version)
        expected = [v.name for v in step.model.global_variables]
        if names != expected:
            raise ValueError(f"coordinator sent variables {names}, the task's model has {expected}")
        update = client_update(step, globals_, self.examples(), batch_size=assignment.batch_size,
                               rng=rng if rng is not None else np.random.default_rng())
        trainable = [names[i] for i in step.model.global_trainable]
        return trainable, update

    def participate(self, *, rng_for: RngFor | None = None, max_wait_s: float = 600.0) -> RoundReport:
        """Take part in one round: check in, download, reconstruct and train, report."""
        assignment = self.check_in(max_wait_s=max_wait_s)
        names, update = self.train(assignment, rng_for(assignment) if rng_for else None)
        result = partial(RoundReport, assignment.round_id, assignment.round_num, assignment.model_version)
        try:
            response = self.transport.report(assignment, self.client_id, names, update.delta, update.weight,
                                             update.metrics)
        except grpc.RpcError as err:
            if err.code() in TRANSIENT:  # type: ignore[attr-defined]
                raise  # retries ran out: the coordinator is unreachable, not refusing
            # A refusal (round already over, late, ...) is the round's answer, not a failure of the app.
            return result(False, update.weight, dict(update.metrics), err.details(),  # type: ignore[attr-defined]
                          err.code().name)  # type: ignore[attr-defined]
        return result(response.accepted, update.weight, dict(update.metrics), response.message)

    def run(self, rounds: int, *, stop: threading.Event | None = None, max_wait_s: float = 600.0
            ) -> list[RoundReport]:
        """Take part in up to ``rounds`` rounds; a refused report is a ``RoundReport`` with its status."""
        reports = []
        for _ in range(rounds):
            if stop is not None and stop.is_set():
                break
            reports.append(self.participate(max_wait_s=max_wait_s))
        return reports

    # ----- evaluation and personalization --------------------------------------------------------------
    def _latest(self) -> tuple[pb.GetLatestModelResponse, list[np.ndarray]]:
        latest = self.transport.latest_model(self.task)
        _, arrays = self.globals_for(latest.model_version)
        return latest, arrays

    def evaluate(self, *, rng: np.random.Generator | None = None, report: bool = True) -> EvaluationSums:
        """Reconstruct-then-evaluate on this device's data against the latest model (and report the sums)."""
        latest, globals_ = self._latest()
        step = client_step_for(latest.model_spec_json, latest.training_config_json)
        packed = pack_clients(step.model, [self.examples()], step.config, batch_size=latest.batch_size,
                              local_rngs=[rng if rng is not None else np.random.default_rng()],
                              evaluation=True)
        sums = step.evaluate(globals_, packed)
        if report:
            self.transport.report_evaluation(self.task, self.client_id, latest.model_version,
                                             sums.squared_error, sums.num_correct, sums.num_examples)
        return sums

    def personalize(self, *, rng: np.random.Generator | None = None) -> Personalization:
        """Reconstruct this user's local variables against the latest model, for on-device predictions."""
        latest, globals_ = self._latest()
        step = client_step_for(latest.model_spec_json, latest.training_config_json)
        return Personalization.fit(step.model, step.config, globals_, self.examples(),
                                   batch_size=latest.batch_size, version=latest.model_version, rng=rng)
