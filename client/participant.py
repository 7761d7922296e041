"""What an app embeds: take part in FedRecon rounds and personalize, against a coordinator.

``FederatedClient.participate()`` is one round, end to end:

1. Check in; when told to come back later, wait a random delay inside the coordinator's retry window
   (so refused devices spread out) and check in again.
2. Download the assignment's global variables (cached per model version).
3. Run the FedRecon client step (``core.client_work.client_update``, the very code the simulator runs):
   reconstruct fresh local variables with the globals frozen, then update the globals with the locals
   frozen.
4. Report the delta of the global trainable variables, its weight and metrics. ``ClientUpdate`` has no
   field for local variables, so they cannot be sent; they are dropped when the round ends. When the
   round uses secure aggregation the delta is clipped, weighted, quantised and masked instead, and sent
   through the round's secure stages (``secure_report``); the app sees the same ``ReportOutcome``.

Nothing about a round is kept afterwards (clients are stateless between rounds).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from fedrecon.client.personalization import Personalization
from fedrecon.client.transport import TRANSIENT, CoordinatorChannel, RetryEvent, RetryPolicy
from fedrecon.client.vocabulary import ItemVocabulary
from fedrecon.core.batching import ClientExamples
from fedrecon.core.config import FedReconConfig
from fedrecon.core.model import ReconstructionModel
from fedrecon.core.model_spec import model_from_config
from fedrecon.protocol import Assignment, LatestModel, ReportOutcome, RetryLater, RoundOutcome
from fedrecon.text_encoding import Vocabulary, device_examples, encoding_of

if TYPE_CHECKING:  # TensorFlow: imported when a client step first runs, not with the library
    from fedrecon.core.client_work import ClientStep, ClientUpdate, EvaluationSums

RngFor = Callable[[Assignment], np.random.Generator]
#: What a device holds: examples, or for a next-word task the user's own texts (strings).
DeviceData = ClientExamples | Sequence[str]


class NoAssignment(Exception):
    """The coordinator kept asking this client to come back later until the wait ran out."""


_steps: dict[tuple[str, str], ClientStep] = {}
_steps_lock = threading.Lock()


def client_step_for(model_spec_json: str, training_json: str) -> ClientStep:
    """One ``ClientStep`` per (model, configuration) in a process, so many simulated clients share one
    traced TensorFlow graph."""
    from fedrecon.core.client_work import ClientStep

    key = (model_spec_json, training_json)
    with _steps_lock:
        if key not in _steps:
            _steps[key] = ClientStep(model_from_config(json.loads(model_spec_json)),
                                     FedReconConfig.from_dict(json.loads(training_json)))
        return _steps[key]


class FederatedClient:
    """One device's handle on a task served by a coordinator.

    ``data`` holds the device's examples with items as the dataset's own ids when the task has an item
    vocabulary (the coordinator serves it with the model), as the model's item indices otherwise. For a
    next-word task it may be the user's texts instead (a list of strings, or a function returning the
    current ones): they are encoded with the task's own vocabulary (``fedrecon.text_encoding``), never one
    built from the device's text. ``on_retry`` is told about every automatic retry (see ``transport``)."""

    def __init__(self, target: str | None, task: str, client_id: str,
                 data: DeviceData | Callable[[], DeviceData], *,
                 channel: grpc.Channel | None = None, retry: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep, token: str | None = None,
                 tls: grpc.ChannelCredentials | None = None,
                 on_retry: Callable[[RetryEvent], None] | None = None,
                 model: ReconstructionModel | None = None,
                 custom_objects: Mapping[str, Any] | None = None) -> None:
        """``model``: the app's own model (e.g. a ``KerasReconstructionModel`` of a Keras model it ships),
        used instead of building the task's description; it must have the task's variables (names, shapes,
        global or local), else the step raises ``ValueError`` naming each difference. ``custom_objects``:
        the classes and functions the app registers for building a Keras description (anything else
        outside Keras, and any Lambda layer, is refused: ``core.keras_spec``)."""
        self.task = task
        self._model = model
        self._custom_objects = dict(custom_objects) if custom_objects else None
        self._own_steps: dict[tuple[str, str], ClientStep] = {}
        self.client_id = client_id
        self._data = data
        self.transport = CoordinatorChannel(target, channel=channel, retry=retry, token=token, tls=tls,
                                            on_retry=on_retry)
        self._sleep = sleep
        self._cache: tuple[int, list[str], list[np.ndarray]] | None = None
        self._vocabulary: ItemVocabulary | None = None
        self._text: tuple[Vocabulary, int] | None = None  # the task's text encoding (with _vocabulary)
        self.dropped_examples = 0  # examples of the last step whose item the task's vocabulary lacks

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> FederatedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def examples(self) -> DeviceData:
        """The device's data as the app gave it (the dataset's item ids, or texts)."""
        data = self._data() if callable(self._data) else self._data
        return [data] if isinstance(data, str) else data

    def vocabulary(self) -> ItemVocabulary:
        """The task's item vocabulary (fetched once: a task never changes it)."""
        if self._vocabulary is None:
            self._learn_task(self.transport.latest_model(self.task))
        assert self._vocabulary is not None
        return self._vocabulary

    def _learn_task(self, latest: LatestModel) -> None:
        """Keep what a task never changes: its item vocabulary and its text encoding."""
        self._vocabulary = ItemVocabulary.of(latest.item_ids)
        self._text = encoding_of(json.loads(latest.model_spec_json)) if latest.model_spec_json else None

    def model_examples(self) -> ClientExamples:
        """The device's examples as the model takes them: item indices (unknown items dropped and counted),
        or texts encoded with the task's vocabulary (at most ``MAX_SEQUENCES_PER_USER`` sequences)."""
        vocabulary, data = self.vocabulary(), self.examples()
        if not isinstance(data, ClientExamples):
            self.dropped_examples = 0
            return device_examples(data, self._text, model=f"task {self.task!r}'s model")
        examples, self.dropped_examples = vocabulary.examples(data)
        return examples

    # ----- rounds --------------------------------------------------------------------------------------
    def check_in(self, *, max_wait_s: float = 600.0) -> Assignment:
        """Check in until assigned, honouring each retry window; ``NoAssignment`` after ``max_wait_s``."""
        give_up = time.monotonic() + max_wait_s
        data = self.examples()
        count = len(data) if isinstance(data, ClientExamples) else len(self.model_examples())
        capabilities = {"num_examples": str(count)}
        while True:
            answer = self.transport.check_in(self.task, self.client_id, capabilities)
            if not isinstance(answer, RetryLater):
                return answer
            delay = random.uniform(answer.delay_min_s, answer.delay_max_s)
            if time.monotonic() + delay > give_up:
                raise NoAssignment(f"no assignment within {max_wait_s:g} s (last answer: {answer.reason})")
            self._sleep(delay)

    def globals_for(self, version: int) -> tuple[list[str], list[np.ndarray]]:
        if self._cache is None or self._cache[0] != version:
            names, arrays = self.transport.download(self.task, version, self.client_id)
            self._cache = (version, names, arrays)
        return self._cache[1], self._cache[2]

    def train(self, assignment: Assignment, rng: np.random.Generator | None = None, *,
              order_rng: np.random.Generator | None = None) -> tuple[list[str], ClientUpdate]:
        """Download and run the FedRecon client step for ``assignment``; nothing is sent. ``rng`` draws the
        fresh local variables and, when the task shuffles each round, ``order_rng`` the order of this
        device's examples (both fresh entropy when absent: a new order every round)."""
        from fedrecon.core.client_work import client_update

        step = self.step_for(assignment.model_spec_json, assignment.training_config_json)
        names, globals_ = self.globals_for(assignment.model_version)
        expected = [v.name for v in step.model.global_variables]
        if names != expected:
            raise ValueError(f"coordinator sent variables {names}, the task's model has {expected}")
        update = client_update(step, globals_, self.model_examples(), batch_size=assignment.batch_size,
                               rng=rng if rng is not None else np.random.default_rng(), order_rng=order_rng)
        trainable = [names[i] for i in step.model.global_trainable]
        return trainable, update

    def step_for(self, model_spec_json: str, training_json: str) -> ClientStep:
        """The client step for a task's model and configuration: the process-wide shared one, or one for
        the app's own model (checked against the task's variables) or its registered custom objects."""
        if self._model is None and self._custom_objects is None:
            return client_step_for(model_spec_json, training_json)
        key = (model_spec_json, training_json)
        if key not in self._own_steps:
            from fedrecon.core.client_work import ClientStep
            from fedrecon.core.keras_spec import check_model_fits

            description = json.loads(model_spec_json)
            if self._model is not None:
                check_model_fits(description, self._model, "the app's model")
                model = self._model
            else:
                model = model_from_config(description, custom_objects=self._custom_objects)
            self._own_steps[key] = ClientStep(model, FedReconConfig.from_dict(json.loads(training_json)))
        return self._own_steps[key]

    def participate(self, *, rng_for: RngFor | None = None, upload_rng_for: RngFor | None = None,
                    order_rng_for: RngFor | None = None, max_wait_s: float = 600.0) -> ReportOutcome:
        """Take part in one round: check in, download, reconstruct and train, report. A refused report is
        an outcome with its ``status`` (the round's answer), not an exception; an unreachable coordinator
        (retries spent) raises ``grpc.RpcError``. ``rng_for`` seeds the fresh local variables and
        ``upload_rng_for`` the stochastic rounding of a quantised upload (simulations reproduce a round
        with them; a device leaves both to fresh entropy). ``order_rng_for`` likewise draws the order of the
        device's examples when the task shuffles them each round (``FedReconConfig.shuffle_each_round``)."""
        assignment = self.check_in(max_wait_s=max_wait_s)
        names, update = self.train(assignment, rng_for(assignment) if rng_for else None,
                                   order_rng=order_rng_for(assignment) if order_rng_for else None)
        try:
            if assignment.secure_aggregation:  # masked, through the round's secure stages (secure_report)
                try:
                    from fedrecon.client.secure_report import SecureReporter
                except ImportError as err:  # the secagg extra (cryptography) is not installed
                    raise ImportError(f"round {assignment.round_num} of task {assignment.task_name!r} uses "
                                      "secure aggregation, which needs the secagg extra: pip install "
                                      f"'fedrecon[secagg]' ({err})") from err

                return SecureReporter(self.transport, assignment, self.client_id, update.delta, update.weight,
                                      dict(update.metrics), sleep=self._sleep, max_wait_s=max_wait_s,
                                      rng=upload_rng_for(assignment) if upload_rng_for else None).run()
            return self.transport.report(assignment, self.client_id, names, update.delta, update.weight,
                                         update.metrics,
                                         rng=upload_rng_for(assignment) if upload_rng_for else None)
        except grpc.RpcError as err:
            if err.code() in TRANSIENT:  # type: ignore[attr-defined]
                raise  # retries ran out: the coordinator is unreachable, not refusing
            # A refusal (round already over, late, ...) is the round's answer, not a failure of the app.
            return ReportOutcome(False, err.details() or "", err.code().name,  # type: ignore[attr-defined]
                                 assignment.round_id, assignment.round_num, assignment.model_version,
                                 float(update.weight), dict(update.metrics))

    def run(self, rounds: int, *, stop: threading.Event | None = None, max_wait_s: float = 600.0
            ) -> list[ReportOutcome]:
        """Take part in up to ``rounds`` rounds; a refused report is an outcome with its status."""
        reports = []
        for _ in range(rounds):
            if stop is not None and stop.is_set():
                break
            reports.append(self.participate(max_wait_s=max_wait_s))
        return reports

    def round_outcome(self, round_id: int) -> RoundOutcome:
        """Where a round is now: open, committed (into which version) or failed."""
        return self.transport.round_outcome(self.task, round_id)

    def settle(self, report: ReportOutcome) -> ReportOutcome:
        """``report`` with ``committed_version`` filled in once its round committed (unchanged while the
        round is open, failed, or the report was refused)."""
        if not report.in_round or report.committed_version is not None:
            return report
        outcome = self.round_outcome(report.round_id)
        return replace(report, committed_version=outcome.new_version)

    # ----- evaluation and personalization --------------------------------------------------------------
    def _latest(self) -> tuple[LatestModel, list[np.ndarray]]:
        latest = self.transport.latest_model(self.task)
        self._learn_task(latest)
        _, arrays = self.globals_for(latest.model_version)
        return latest, arrays

    def evaluate(self, *, rng: np.random.Generator | None = None, report: bool = True) -> EvaluationSums:
        """Reconstruct-then-evaluate on this device's data against the latest model (and report the sums)."""
        from fedrecon.core.batching import pack_clients

        latest, globals_ = self._latest()
        step = self.step_for(latest.model_spec_json, latest.training_config_json)
        packed = pack_clients(step.model, [self.model_examples()], step.config, batch_size=latest.batch_size,
                              local_rngs=[rng if rng is not None else np.random.default_rng()],
                              evaluation=True)
        sums = step.evaluate(globals_, packed)
        if report:
            self.transport.report_evaluation(self.task, self.client_id, latest.model_version,
                                             sums.squared_error, sums.num_correct, sums.num_examples)
        return sums

    def personalize(self, *, rng: np.random.Generator | None = None) -> Personalization:
        """Reconstruct this user's local variables against the latest model, for on-device predictions;
        its recommendations are in the dataset's item ids, and a next-word task's ``next_words`` completes
        this user's sentences."""
        latest, globals_ = self._latest()
        step = self.step_for(latest.model_spec_json, latest.training_config_json)
        assert self._vocabulary is not None  # set by _latest
        return Personalization.fit(step.model, step.config, globals_, self.examples(),
                                   batch_size=latest.batch_size, version=latest.model_version, rng=rng,
                                   vocabulary=self._vocabulary, text=self._text)
