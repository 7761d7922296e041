"""One experiment = one algorithm trained on a federated dataset, selected on validation users and scored
once on unseen test users. Shared by ``fedrecon simulate`` and the benchmarks.

The model is matrix factorization (sized by the spec and the dataset) unless the spec carries a model
description (a task's ``[model]``, e.g. the Keras next-word model of ``deploy/tasks/nextword.toml``): then
the very model a coordinator serves is simulated, in process or through a coordinator (``--transport
grpc``), so a task can be tried before it is deployed."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedrecon.core.aggregation import UNBOUNDED_MEAN, AggregationConfig
from fedrecon.core.algorithm import FedRecon, ServerState
from fedrecon.core.batching import ClientExamples
from fedrecon.core.client_work import selection_value
from fedrecon.core.config import FedReconConfig
from fedrecon.core.data_split import has_held_out_batch
from fedrecon.core.matrix_factorization import MatrixFactorization
from fedrecon.core.model import ReconstructionModel
from fedrecon.core.privacy import DpOptions, PrivacyLedger
from fedrecon.simulations.algorithms import Algorithm, Backend, Transport
from fedrecon.simulations.baselines import (
    CentralizedSettings,
    fedavg_configs,
    train_centralized,
)
from fedrecon.simulations.grpc_transport import GrpcRounds
from fedrecon.simulations.population import Population
from fedrecon.simulations.ratings import FederatedRatings
from fedrecon.simulations.runner import Evaluator, RoundRecord, RoundRunner, Simulation, SimulationSettings
from fedrecon.simulations.text import FederatedText

ALGORITHMS = tuple(a.value for a in Algorithm)


BACKENDS = tuple(b.value for b in Backend)
TRANSPORTS = tuple(t.value for t in Transport)


@dataclass(frozen=True)
class ExperimentSpec:
    algorithm: str = "fedrecon"
    num_factors: int = 50
    use_biases: bool = False
    local_init: str = "uniform"  # how a client's user factors start ("zeros": deterministic rounds)
    config: FedReconConfig = field(default_factory=FedReconConfig)
    settings: SimulationSettings = field(default_factory=SimulationSettings)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    centralized: CentralizedSettings = field(default_factory=CentralizedSettings)
    # User-level DP on the global deltas (``core.privacy``): uniform weights, clipped to
    # aggregation.max_update_norm, Gaussian noise, ε accounted per round. None: no DP.
    privacy: DpOptions | None = None
    # A described model (``core.model_spec``: a task's Keras model) instead of matrix factorization; the
    # factor and bias settings above then do not apply.
    model_description: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; choose from {ALGORITHMS}")
        if self.model_description is not None and self.algorithm != "fedrecon":
            raise ValueError(f"a task's described model trains with fedrecon (its local layers say what is "
                             f"reconstructed), not {self.algorithm}")

    def to_dict(self) -> dict[str, Any]:
        return {"algorithm": self.algorithm, "num_factors": self.num_factors,
                "use_biases": self.use_biases, "local_init": self.local_init, "config": self.config.to_dict(),
                "settings": dataclasses.asdict(self.settings), "aggregation": self.aggregation.to_dict(),
                "centralized": dataclasses.asdict(self.centralized),
                "privacy": self.privacy.to_dict() if self.privacy is not None else None,
                **({"model": {k: v for k, v in self.model_description.items()
                              if k in ("kind", "local_layers", "objective")}}
                   if self.model_description is not None else {})}


@dataclass
class ExperimentResult:
    algorithm: str
    test: dict[str, float]
    validation: list[dict[str, float]]
    train_loss: list[float]
    selected: dict[str, float]  # the round/epoch picked on validation users, with its validation metrics
    seconds_per_round: float | None
    globals: list[np.ndarray]
    model: ReconstructionModel
    # DP runs: the accounting parameters, ε after each round, ε of the selected round, and why the run
    # stopped early (the budget), if it did.
    privacy: dict[str, Any] | None = None
    # The test users' scores per class (``ClassSums.rows``): per rating value, or per word for the words
    # most often targeted or predicted; None when another engine scored them (TFF).
    test_per_class: list[dict[str, Any]] | None = None

    def summary(self) -> dict[str, Any]:
        out = {"algorithm": self.algorithm, "test": self.test, "selected": self.selected,
               "seconds_per_round": self.seconds_per_round, "validation": self.validation,
               "train_loss": self.train_loss}
        if self.privacy is not None:
            out["privacy"] = self.privacy
        if self.test_per_class is not None:
            out["test_per_class"] = self.test_per_class
        return out


class ExperimentInterrupted(Exception):
    """The run was interrupted (Ctrl-C); ``partial`` holds what was done: the rounds and validation so far
    and, as ``globals``, the validation-best round so far (``selected``; the latest round before any
    evaluation). Its ``test`` is empty: unseen test users are scored only at the end of a run."""

    def __init__(self, partial: ExperimentResult, rounds_done: int) -> None:
        super().__init__(f"interrupted after {rounds_done} rounds")
        self.partial = partial
        self.rounds_done = rounds_done


def check_scorable(data: FederatedRatings | FederatedText, spec: ExperimentSpec) -> None:
    """Refuse data on which validation or test would score no example (an RMSE of 0 on nothing)."""
    size = spec.settings.batch_size
    for part, users in (("validation", data.validation), ("test", data.test)):
        if not any(has_held_out_batch(len(e), batch_size=size, split_dataset=True) for e in users.values()):
            raise ValueError(f"no {part} user has more than --batch-size {size} ratings: nothing would be "
                             f"held out to score (the dataset is too small)")


def selection_key(metrics: dict[str, float]) -> float:
    """Selection key: a diverged (NaN) evaluation must never be selected."""
    return selection_value(metrics)


def build_model(spec: ExperimentSpec, data: FederatedRatings | FederatedText, *, shared_user: bool
                ) -> ReconstructionModel:
    """The spec's described model, or matrix factorization sized by the spec and ``data``."""
    if spec.model_description is not None:
        from fedrecon.core.model_spec import model_from_config

        return model_from_config(spec.model_description)
    assert isinstance(data, FederatedRatings), "matrix factorization needs ratings"
    offset = data.mean_rating if spec.use_biases else 0.0
    return MatrixFactorization(data.num_items, spec.num_factors, use_biases=spec.use_biases,
                               shared_user=shared_user, initial_offset=offset, local_init=spec.local_init)


def run_experiment(spec: ExperimentSpec, data: FederatedRatings | FederatedText, *,
                   on_round: Callable[[RoundRecord, dict[str, float] | None], None] | None = None,
                   on_epoch: Callable[[int, float], None] | None = None,
                   transport: str = "inprocess", store_url: str | None = None,
                   initial_globals: list[np.ndarray] | None = None, backend: str = "fedrecon",
                   ray_address: str | None = None, ray_workers: int | None = None) -> ExperimentResult:
    """Train ``spec.algorithm``; keep the validation-best round/epoch; evaluate it on all test users.

    ``transport="grpc"`` plays every training round through a real coordinator on loopback (store at
    ``store_url``, default a temporary SQLite file) with the client library; evaluation is unchanged.
    ``initial_globals`` starts from given global variables (an exported model) instead of a fresh init.
    ``backend="tff"`` computes every round and evaluation with TensorFlow Federated's ``build_fed_recon``
    (``simulations.tff_backend``); selection, model selection and scoring rules are unchanged, but TFF
    aggregates with its own weighted mean, so ``spec.aggregation`` (weight cap, norm clip, robust reducers)
    applies to the fedrecon backend only (in process or over gRPC). ``backend="ray"`` runs each round's
    clients on ``ray_workers`` Ray actors (``simulations.ray_backend``; at ``ray_address``, else a local
    Ray), with the in-process results.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; choose from {TRANSPORTS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    if backend == "tff" and (spec.algorithm != "fedrecon" or transport != "inprocess"):
        raise ValueError("the tff backend runs the fedrecon algorithm in process (no --transport grpc)")
    if backend == "tff":  # TFF aggregates with its plain weighted mean: say so rather than ignore options
        if spec.aggregation not in (AggregationConfig(), UNBOUNDED_MEAN):
            raise ValueError("the tff backend aggregates with TFF's plain weighted mean (no weight cap, no "
                             "norm bound): aggregation options apply to the fedrecon backend only")
        spec = dataclasses.replace(spec, aggregation=UNBOUNDED_MEAN)
    if backend == "ray" and (spec.algorithm == "centralized" or transport != "inprocess"):
        raise ValueError("the ray backend runs federated algorithms (fedrecon, fedavg) with the in-process "
                         "client step (no --transport grpc)")
    if backend == "ray" and spec.aggregation.secure_aggregation:
        # Each worker would run its own secure round among its share of the clients: a different protocol
        # (smaller rounds, thresholds over fewer clients) from the one secure round of the other backends.
        raise ValueError("secure aggregation runs one secure round among all of a round's clients: use the "
                         "fedrecon backend (in process or --transport grpc), not ray")
    if isinstance(data.train, Population) and (spec.algorithm == "centralized" or transport != "inprocess"
                                               or backend == "tff"):
        raise ValueError("a population generated on demand trains federated algorithms on the fedrecon or "
                         "ray backend, in process: the others would materialise every user")
    if spec.model_description is not None and backend != "fedrecon":
        raise ValueError("a task's described model runs on the fedrecon backend (in process or --transport "
                         f"grpc), not {backend}")
    if transport == "grpc" and (spec.algorithm == "centralized" or initial_globals is not None):
        raise ValueError("the grpc transport runs federated algorithms from a fresh model only")
    check_scorable(data, spec)
    ledger: PrivacyLedger | None = None
    if spec.privacy is not None:
        if spec.algorithm == "centralized" or backend == "tff" or transport != "inprocess":
            raise ValueError("differential privacy runs the fedrecon engine in process (federated "
                             "algorithms, no --transport grpc, no tff backend)")
        parameters = spec.privacy.resolve(rounds=spec.settings.rounds, population=len(data.train),
                                          clients_per_round=spec.settings.clients_per_round)
        ledger = spec.privacy.ledger(parameters)
        if not ledger.next_round_fits():
            raise ValueError(f"differential privacy: one round already spends ε = "
                             f"{ledger.epsilon_if_another_round():.3f}, above the budget "
                             f"{ledger.epsilon_budget:g}; raise the noise multiplier or the budget")
        try:  # the sensitivity the accountant assumes: every update clipped, each counting 1
            aggregation = dataclasses.replace(spec.aggregation, noise_multiplier=parameters.noise_multiplier)
        except ValueError as err:
            raise ValueError(f"differential privacy: {err}") from err
        spec = dataclasses.replace(spec, aggregation=aggregation, settings=dataclasses.replace(
            spec.settings, sampling=spec.privacy.sampling))
    if spec.algorithm == "centralized":
        return _run_centralized(spec, data, on_epoch)
    if spec.algorithm == "fedavg":
        model = build_model(spec, data, shared_user=True)
        train_config, eval_config = fedavg_configs(spec.config)
    else:
        model = build_model(spec, data, shared_user=False)
        train_config = eval_config = spec.config
    if initial_globals is not None:
        model.check_globals(initial_globals, "this experiment's model")
    algorithm = FedRecon(model, train_config, aggregation=spec.aggregation)
    algorithm.check_aggregation(max_clients=spec.settings.clients_per_round)
    state = algorithm.initial_state(spec.settings.seed, initial_globals)
    with contextlib.ExitStack() as stack:
        runner: RoundRunner | None = None
        evaluator: Evaluator | None = None
        if transport == "grpc":
            runner = stack.enter_context(GrpcRounds(model, train_config, data.train, spec.settings,
                                                    store_url=store_url, aggregation=spec.aggregation))
        if backend == "ray":
            from fedrecon.simulations.ray_backend import RayRounds

            runner = stack.enter_context(RayRounds(algorithm, data.train, spec.settings, workers=ray_workers,
                                                   address=ray_address))
        if backend == "tff":
            from fedrecon.simulations.tff_backend import TffEngine, TffRounds

            assert isinstance(model, MatrixFactorization)  # described models are refused above
            engine = stack.enter_context(TffEngine(
                model, train_config, {**data.train, **data.validation, **data.test},
                batch_size=spec.settings.batch_size, initial_globals=state.globals,
                eval_clip=spec.settings.eval_clip))
            runner = TffRounds(engine, list(data.train), spec.settings)

            def evaluator(s: ServerState, users: Mapping[int, ClientExamples]) -> dict[str, float]:
                return engine.evaluate(s.globals, sorted(users))

        sim = Simulation(algorithm, data.train, spec.settings, eval_config=eval_config, round_runner=runner,
                         evaluator=evaluator, privacy=ledger)
        try:
            best_state, history = sim.run(state, validation=data.validation, on_round=on_round)
        except KeyboardInterrupt:
            raise _interrupted(spec, sim, model) from None
        selected = min(history.validation, key=selection_key) if history.validation else {}
        test, per_class = score_test(sim, best_state, data)
    times = [r.seconds for r in history.rounds[1:]] or [r.seconds for r in history.rounds]
    privacy = None
    if ledger is not None:
        epsilons = [r.epsilon for r in history.rounds]
        at = int(selected.get("round", len(epsilons)))
        privacy = {**ledger.parameters.to_dict(), "epsilon_budget": ledger.epsilon_budget,
                   "epsilon_per_round": epsilons, "epsilon_spent": ledger.epsilon,
                   "epsilon_of_selected_round": epsilons[at - 1] if 0 < at <= len(epsilons) else None,
                   "rounds_run": len(history.rounds), "stopped": history.stopped,
                   "protected": "user-level: each user's clipped global delta; local variables never leave "
                                "the device; evaluation reports are not covered"}
    return ExperimentResult(
        algorithm=spec.algorithm, test=test, validation=history.validation,
        train_loss=[r.train_loss for r in history.rounds], selected=selected,
        seconds_per_round=statistics.median(times) if times else None, globals=best_state.globals,
        model=model, privacy=privacy, test_per_class=per_class)


def score_test(sim: Simulation, state: ServerState, data: FederatedRatings | FederatedText
               ) -> tuple[dict[str, float], list[dict[str, Any]] | None]:
    """The unseen test users' metrics and, where this process scored them, their per-class rows (words
    named by the dataset's vocabulary)."""
    sums = sim.evaluate_sums(state, data.test)
    if sums is None:
        return sim.evaluate(state, data.test), None
    vocabulary = getattr(data, "vocabulary", None)
    labels = vocabulary.labels() if vocabulary is not None else None
    return sums.metrics(), sums.per_class.rows(labels) if sums.per_class is not None else None


def _interrupted(spec: ExperimentSpec, sim: Simulation, model: ReconstructionModel) -> ExperimentInterrupted:
    history = sim.history
    selected = min(history.validation, key=selection_key) if history.validation else {}
    kept = sim.best_state if history.validation else sim.latest_state
    times = [r.seconds for r in history.rounds]
    partial = ExperimentResult(
        algorithm=spec.algorithm, test={}, validation=history.validation,
        train_loss=[r.train_loss for r in history.rounds], selected=selected,
        seconds_per_round=statistics.median(times) if times else None,
        globals=kept.globals if kept is not None else [], model=model)
    return ExperimentInterrupted(partial, len(history.rounds))


def _run_centralized(spec: ExperimentSpec, data: FederatedRatings | FederatedText,
                     on_epoch: Callable[[int, float], None] | None) -> ExperimentResult:
    model = build_model(spec, data, shared_user=False)
    algorithm = FedRecon(model, spec.config)
    sim = Simulation(algorithm, data.train, spec.settings)
    validation: list[dict[str, float]] = []

    def score(epoch: int, globals_: list[np.ndarray]) -> float:
        state = ServerState(globals_, algorithm.server_optimizer.init([]), epoch)
        metrics = {"round": float(epoch), **sim.evaluate(state, data.validation)}
        validation.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics["rmse"])
        return metrics["rmse"]

    assert isinstance(model, MatrixFactorization)  # described models train with fedrecon only
    best, history = train_centralized(model, data.train, spec.centralized, on_epoch=score)
    selected = min(validation, key=selection_key) if validation else {}
    test, per_class = score_test(sim, ServerState(best, algorithm.server_optimizer.init([]), 0), data)
    return ExperimentResult(algorithm="centralized", test=test, validation=validation,
                            train_loss=[h["train_mse"] for h in history], selected=selected,
                            seconds_per_round=None, globals=best, model=model, test_per_class=per_class)
