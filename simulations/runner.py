"""In-process simulation: many clients per round through the shared client step.

Selection and local initialisation are seeded per (seed, round, user), never by position in a batch, so a
round gives the same result however its clients are grouped or transported.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from fedrecon.core.aggregation import Aggregator, ClientDeltas
from fedrecon.core.algorithm import FedRecon, NonFiniteUpdate, ServerState
from fedrecon.core.batching import ClientExamples, PackedClients, pack_clients
from fedrecon.core.client_work import EvaluationSums, StagedClients, selection_value
from fedrecon.core.compression import DecodedUpdates, UploadCodec, roundtrip
from fedrecon.core.config import FedReconConfig
from fedrecon.core.privacy import PrivacyLedger, Sampling
from fedrecon.core.secagg.local import secure_round_sum
from fedrecon.simulations.population import Population
from fedrecon.simulations.seeding import keyed_generators

#: With XLA, each phase's step count is padded up to a multiple of this (all-masked steps are no-ops), so a
#: run compiles at most ``ceil(max steps / 8)`` shapes per phase instead of one per distinct step count.
XLA_STEP_MULTIPLE = 8


@dataclass(frozen=True)
class SimulationSettings:
    rounds: int = 500
    clients_per_round: int = 100
    batch_size: int = 5
    eval_every: int = 25
    seed: int = 0
    eval_chunk: int = 512
    eval_clip: tuple[float, float] | None = None  # clip predictions at evaluation (e.g. to 1..5)
    # fixed: exactly clients_per_round users per round; poisson: each user with probability
    # clients_per_round / population (what the DP accountant's add-or-remove-one bound assumes).
    sampling: Sampling = Sampling.FIXED
    # Compile the training rounds' client step with XLA (``ClientStep(xla=True)``): same results within
    # float rounding, several times less CPU per round once compiled (a few seconds, once per shape).
    xla: bool = False
    # (Shuffling a client's examples each round is a training setting: ``FedReconConfig.shuffle_each_round``,
    # so a task sends it to devices and ``--transport grpc`` shuffles as this simulator does.)

@dataclass
class RoundRecord:
    round_num: int
    seconds: float
    train_loss: float
    num_clients: int
    total_weight: float
    aggregation: dict[str, float] = field(default_factory=dict)  # ``AggregationReport.metrics()``
    epsilon: float | None = None  # DP: ε spent after this round (at the ledger's δ)
    non_finite_clients: int = 0  # clients whose update was not finite (zeroed, weight 0)


class NonFiniteTraining(ValueError):
    """Training diverged: a round's loss, some client's update, the model or a validation metric is not
    finite. A simulation stops at once rather than spend its remaining rounds on a broken model."""


@dataclass
class History:
    rounds: list[RoundRecord] = field(default_factory=list)
    validation: list[dict[str, float]] = field(default_factory=list)  # each with "round"
    stopped: str | None = None  # why the run ended before its last round (e.g. the privacy budget)


def select_clients(user_ids: Sequence[int], count: int, *, seed: int, round_num: int) -> list[int]:
    """Uniform sample without replacement, seeded by (seed, round)."""
    rng = np.random.default_rng([seed, round_num])
    count = min(count, len(user_ids))
    return [int(user_ids[i]) for i in rng.choice(len(user_ids), size=count, replace=False)]


def poisson_clients(user_ids: Sequence[int], expected: int, *, seed: int, round_num: int) -> list[int]:
    """Each user independently with probability expected / len(user_ids), seeded by (seed, round): the
    sampling the DP accountant's Poisson bound assumes (the round's size varies)."""
    rng = np.random.default_rng([seed, round_num, 0x9015])
    rate = min(1.0, expected / len(user_ids))
    return [int(u) for u, take in zip(user_ids, rng.random(len(user_ids)) < rate, strict=True) if take]


def noise_rng(seed: int, round_num: int) -> np.random.Generator:
    """The generator of a simulated round's DP noise: reproducible per (seed, round). (A coordinator
    facing devices draws from the operating system's entropy instead.)"""
    return np.random.default_rng([seed, round_num, 0xD9])


_LOCAL_KEY = 0x10CA1
_SHUFFLE_KEY = 0x5F1E


def local_rng(seed: int, round_num: int, user_id: int) -> np.random.Generator:
    """The generator of a client's fresh local variables in a round (independent of transport)."""
    return np.random.default_rng([seed, round_num, user_id, _LOCAL_KEY])


def local_rngs(seed: int, round_num: int, users: Sequence[int]) -> list[np.random.Generator]:
    """``local_rng`` of each of ``users``: the same generators, built together (``keyed_generators``:
    a sixth of the cost of building them one by one)."""
    return keyed_generators([seed, round_num], users, [_LOCAL_KEY])


def shuffle_rng(seed: int, round_num: int, user_id: int) -> np.random.Generator:
    """The generator of a client's example order in a training round (``FedReconConfig.shuffle_each_round``;
    the same in process and over gRPC)."""
    return np.random.default_rng([seed, round_num, user_id, _SHUFFLE_KEY])


def shuffle_rngs(seed: int, round_num: int, users: Sequence[int]) -> list[np.random.Generator]:
    """``shuffle_rng`` of each of ``users``, built together (as ``local_rngs``)."""
    return keyed_generators([seed, round_num], users, [_SHUFFLE_KEY])


def upload_rng(seed: int, round_num: int, user_id: int) -> np.random.Generator:
    """The generator of a client's stochastic rounding when its upload is quantised (the same in process
    and over gRPC, so both transports decode the very same update)."""
    return np.random.default_rng([seed, round_num, user_id, 0xC0DEC])


def uploaded(deltas: ClientDeltas, codec: UploadCodec, users: Sequence[int], *, seed: int, round_num: int
             ) -> ClientDeltas:
    """The round's updates as the coordinator would decode them from uploads with ``codec``: each
    client's dense delta encoded and decoded by the same functions the client library and the
    coordinator use (``core.compression``)."""
    if codec == UploadCodec.NONE:
        return deltas
    stacked = deltas.stacked()
    return DecodedUpdates([roundtrip([t[c] for t in stacked], codec, upload_rng(seed, round_num, u))
                           for c, u in enumerate(users)])


def fold_securely(aggregate: Aggregator, algorithm: FedRecon, deltas: ClientDeltas, weights: np.ndarray, *,
                  batch_size: int, seed: int, round_num: int) -> None:
    """Fold a simulated round through secure aggregation (``core.secagg``, in process): every client
    clips, weights, quantises and masks its update as a device would, and only the unmasked sum reaches the
    aggregate, so a simulation shows the quantisation's effect on the model."""
    config = algorithm.aggregation
    encoding = config.secure_encoding(config.weight_cap(algorithm.config, batch_size))
    stacked = deltas.stacked()
    per_client = [[t[c] for t in stacked] for c in range(deltas.num_clients)]
    if len(per_client) < 2:  # a sum of one client is that client's update: nothing is released
        return
    sums, total_weight, result = secure_round_sum(
        encoding, per_client, [float(w) for w in weights], algorithm.delta_shapes,
        round_id=f"simulation/{seed}/{round_num}".encode(),
        rng=np.random.default_rng([seed, round_num, 0x5EC]),
        degree=config.secure_neighbours, threshold=config.secure_threshold)
    aggregate.fold_secure_sum(sums, total_weight, result.count)


DIVERGENCE_HINT = "training diverged: lower the client learning rate (--client-lr)"


def check_finite(record: RoundRecord, metrics: dict[str, float] | None) -> None:
    """Raise ``NonFiniteTraining`` naming the round and what went non-finite, with a hint."""
    what = None
    if not np.isfinite(record.train_loss):
        what = f"the training loss is not finite ({record.train_loss})"
    elif record.non_finite_clients:
        what = f"{record.non_finite_clients} of {record.num_clients} client updates are not finite"
    elif metrics is not None and not np.isfinite(selection_value(metrics)):
        name = "RMSE" if "rmse" in metrics else "loss"
        what = f"the validation {name} is not finite ({metrics.get('rmse', metrics.get('loss'))})"
    if what is not None:
        raise NonFiniteTraining(f"round {record.round_num}: {what}; {DIVERGENCE_HINT}")


def user_ids_of(train: Mapping[int, ClientExamples]) -> Sequence[int]:
    """The training users in id order: a population generated on demand lists them as a ``range`` (no
    list of a million ids), a dict of users is sorted."""
    return train.user_ids if isinstance(train, Population) else sorted(train)


def choose_clients(user_ids: Sequence[int], settings: SimulationSettings, round_num: int) -> list[int]:
    """The clients of round ``round_num``, by ``settings.sampling``, seeded by (seed, round)."""
    if settings.sampling == Sampling.POISSON:
        return poisson_clients(user_ids, settings.clients_per_round, seed=settings.seed, round_num=round_num)
    return select_clients(user_ids, settings.clients_per_round, seed=settings.seed, round_num=round_num)


@dataclass(frozen=True)
class ShardTraining:
    """What a group of a round's clients reported besides their updates (summed over the group)."""

    loss_sum: float = 0.0  # Σ loss (squared error; token cross-entropy) over the post-reconstruction steps
    examples: float = 0.0  # post-reconstruction examples
    non_finite: int = 0  # clients whose update was not finite
    loss_units: float = 0.0  # what loss_sum sums over: examples, or non-padding tokens for text

    def __add__(self, other: ShardTraining) -> ShardTraining:
        return ShardTraining(self.loss_sum + other.loss_sum, self.examples + other.examples,
                             self.non_finite + other.non_finite, self.loss_units + other.loss_units)


def round_aggregate(algorithm: FedRecon, state: ServerState, settings: SimulationSettings, round_num: int,
                    num_clients: int) -> Aggregator:
    """The aggregation stages of a simulated round of ``num_clients`` clients (the driver's, and each
    shard's when the round is folded in shards: they must be the same stages)."""
    return algorithm.new_aggregate(max_clients=max(num_clients, 1), batch_size=settings.batch_size,
                                   expected_clients=settings.clients_per_round,
                                   noise_rng=noise_rng(settings.seed, round_num), state=state)


def pack_group(algorithm: FedRecon, examples: Sequence[ClientExamples], users: Sequence[int], *,
               settings: SimulationSettings, round_num: int) -> PackedClients:
    """A group of a round's clients packed for the lock-step client step, with their fresh locals seeded
    by (seed, round, user): it depends on nothing but the data and the round, never on the model, so a
    round can be packed while the one before it trains. With ``config.shuffle_each_round`` each client's
    examples are first put in an order drawn by (seed, round, user) (``shuffle_rng``: a device over
    ``--transport grpc`` is given the same one)."""
    return pack_clients(algorithm.model, examples, algorithm.config, batch_size=settings.batch_size,
                        local_rngs=local_rngs(settings.seed, round_num, users),
                        order_rngs=(shuffle_rngs(settings.seed, round_num, users)
                                    if algorithm.config.shuffle_each_round else None),
                        step_multiple=XLA_STEP_MULTIPLE if settings.xla else 1, bucket_rows=settings.xla)


def train_and_fold(algorithm: FedRecon, globals_: Sequence[np.ndarray],
                   packed: PackedClients | StagedClients, users: Sequence[int], aggregate: Aggregator, *,
                   settings: SimulationSettings, round_num: int) -> ShardTraining:
    """Run the client step for ``users`` (lock-step, one call) and fold their updates into ``aggregate``.

    The one implementation of a simulated group of clients: the whole round in process, or one shard of it
    on a Ray worker. Everything a client does is seeded by (seed, round, user), so a client's update does
    not depend on which group it ran in."""
    result = algorithm.client_step_for(xla=settings.xla).train_clients(globals_, packed)
    if algorithm.aggregation.secure_aggregation:
        fold_securely(aggregate, algorithm, result.deltas, result.weights, batch_size=settings.batch_size,
                      seed=settings.seed, round_num=round_num)
    else:
        deltas = uploaded(result.deltas, algorithm.aggregation.upload_codec, users, seed=settings.seed,
                          round_num=round_num)
        aggregate.fold(deltas, result.weights)
    return ShardTraining(float(result.loss_sum.sum()), float(result.post_examples.sum()),
                         int((~result.finite).sum()), float(result.loss_units.sum()))


def finish_round(algorithm: FedRecon, state: ServerState, aggregate: Aggregator, trained: ShardTraining, *,
                 num_clients: int, started: float) -> tuple[ServerState, RoundRecord]:
    """The server step on the round's folded aggregate, and the round's record."""
    try:
        new_state = algorithm.server_update(state, aggregate)
    except NonFiniteUpdate as err:
        raise NonFiniteTraining(f"{err}; {DIVERGENCE_HINT}") from err
    record = RoundRecord(round_num=new_state.round_num, seconds=time.perf_counter() - started,
                         train_loss=trained.loss_sum / max(trained.loss_units, 1.0),
                         num_clients=num_clients, total_weight=aggregate.report.total_weight,
                         aggregation=aggregate.report.metrics(), non_finite_clients=trained.non_finite)
    return new_state, record


RoundRunner = Callable[[ServerState], tuple[ServerState, RoundRecord]]
Evaluator = Callable[[ServerState, Mapping[int, ClientExamples]], dict[str, float]]


class Simulation:
    """Runs ``algorithm`` over ``train`` users and evaluates on held-out users."""

    def __init__(self, algorithm: FedRecon, train: Mapping[int, ClientExamples],
                 settings: SimulationSettings, *, eval_config: FedReconConfig | None = None,
                 round_runner: RoundRunner | None = None, evaluator: Evaluator | None = None,
                 privacy: PrivacyLedger | None = None) -> None:
        self.algorithm = algorithm
        self.train = train
        self.settings = settings
        self.user_ids = user_ids_of(train)
        # Evaluation may split data differently from training (the FedAvg baseline trains on every batch
        # but is scored on the same held-out batches as FedRecon).
        self.eval_config = eval_config or algorithm.config
        # How a training round is carried out: in this process by default, or through a real coordinator
        # (``simulations.grpc_transport``); evaluation and model selection are the same either way.
        self.round_runner: RoundRunner = round_runner or self.run_round
        # How users are scored: by the shared client step here, or by another engine (the TFF backend).
        self._evaluator = evaluator
        # DP: ε per round, and the budget that stops the run before a round that would exceed it.
        self.privacy = privacy
        # Progress of ``run`` (kept on the object so an interrupted run can still report it).
        self.history = History()
        self.best_state: ServerState | None = None
        self.latest_state: ServerState | None = None
        # The next round's clients, chosen and packed on a background thread while this round trains
        # (selection and packing are numpy on the host; training is TensorFlow, which leaves the
        # interpreter free meanwhile).
        self._packer: ThreadPoolExecutor | None = None
        self._next: tuple[int, Future[tuple[list[int], StagedClients | None]]] | None = None

    def run_round(self, state: ServerState) -> tuple[ServerState, RoundRecord]:
        s = self.settings
        t0 = time.perf_counter()
        round_num = state.round_num + 1
        chosen, packed = self._chosen_and_packed(round_num)
        self._pack_ahead(round_num + 1)
        aggregate = round_aggregate(self.algorithm, state, s, round_num, len(chosen))
        trained = ShardTraining()
        if packed is not None:  # a Poisson round may select nobody: the DP sum is then noise alone
            trained = train_and_fold(self.algorithm, state.globals, packed, chosen, aggregate, settings=s,
                                     round_num=round_num)
        return finish_round(self.algorithm, state, aggregate, trained, num_clients=len(chosen), started=t0)

    def _choose_and_pack(self, round_num: int) -> tuple[list[int], StagedClients | None]:
        """Round ``round_num``'s clients (seeded by seed and round), packed and staged as tensors (on the
        packing thread when ahead); None for a round that selected nobody."""
        chosen = choose_clients(self.user_ids, self.settings, round_num)
        if not chosen:
            return chosen, None
        return chosen, StagedClients(pack_group(self.algorithm, [self.train[u] for u in chosen], chosen,
                                                settings=self.settings, round_num=round_num))

    def _chosen_and_packed(self, round_num: int) -> tuple[list[int], StagedClients | None]:
        """Round ``round_num``'s clients and their pack: chosen and packed ahead if they were, else now."""
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] == round_num:
            return ahead[1].result()
        return self._choose_and_pack(round_num)

    def _pack_ahead(self, round_num: int) -> None:
        if self._packer is None:
            self._packer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedrecon-pack")
        self._next = (round_num, self._packer.submit(self._choose_and_pack, round_num))

    def close(self) -> None:
        """Stop the packing thread (a finished ``run`` does this; call it after driving ``run_round``)."""
        self._next = None
        if self._packer is not None:
            self._packer.shutdown(wait=True, cancel_futures=True)
            self._packer = None

    def evaluate(self, state: ServerState, users: Mapping[int, ClientExamples], *, eval_seed: int = 7
                 ) -> dict[str, float]:
        """Reconstruct-then-evaluate every user in ``users``; example-weighted metrics."""
        if self._evaluator is not None:
            return self._evaluator(state, users)
        sums = self.evaluate_sums(state, users, eval_seed=eval_seed)
        assert sums is not None
        return sums.metrics()

    def evaluate_sums(self, state: ServerState, users: Mapping[int, ClientExamples], *, eval_seed: int = 7
                      ) -> EvaluationSums | None:
        """``evaluate``'s sums, per class too (``EvaluationSums.per_class``); None when another engine
        scores the users (the TFF backend reports metrics only)."""
        if self._evaluator is not None:
            return None
        s = self.settings
        ids = sorted(users)
        total = EvaluationSums(0.0, 0.0, 0.0)
        for start in range(0, len(ids), s.eval_chunk):
            chunk = ids[start:start + s.eval_chunk]
            packed = pack_clients(self.algorithm.model, [users[u] for u in chunk], self.eval_config,
                                  batch_size=s.batch_size,
                                  local_rngs=local_rngs(eval_seed, 0, chunk), evaluation=True)
            total = total + self.algorithm.client_step.evaluate(state.globals, packed, clip=s.eval_clip)
        return total

    def run(self, state: ServerState, *, validation: Mapping[int, ClientExamples] | None = None,
            on_round: Callable[[RoundRecord, dict[str, float] | None], None] | None = None,
            keep_best: bool = True) -> tuple[ServerState, History]:
        """Train for ``settings.rounds`` rounds; evaluate on ``validation`` every ``eval_every`` rounds.

        With ``keep_best`` the state returned is the one with the lowest validation RMSE seen (model
        selection on validation users only; test users are never looked at here). A round whose loss,
        updates or validation metrics are not finite stops the run (``NonFiniteTraining``). What was done
        so far stays readable while it runs and after an interruption: ``history``, ``best_state`` (the
        validation-best round so far; the start before any evaluation) and ``latest_state``.
        """
        history = self.history = History()
        self.latest_state = self.best_state = state
        best_rmse = float("inf")
        try:
            for _ in range(self.settings.rounds):
                ledger = self.privacy
                if ledger is not None and not ledger.next_round_fits():
                    history.stopped = (f"privacy budget: another round would spend ε = "
                                       f"{ledger.epsilon_if_another_round():.3f} > {ledger.epsilon_budget:g} "
                                       f"(δ = {ledger.parameters.delta:g}); stopped after "
                                       f"{len(history.rounds)} rounds")
                    break
                state, record = self.round_runner(state)
                if self.privacy is not None:
                    record.epsilon = self.privacy.record_round()
                metrics = None
                last = (len(history.rounds) + 1 == self.settings.rounds
                        or (self.privacy is not None and not self.privacy.next_round_fits()))
                if validation and (record.round_num % self.settings.eval_every == 0 or last):
                    metrics = {"round": record.round_num, **self.evaluate(state, validation)}
                check_finite(record, metrics)
                history.rounds.append(record)
                self.latest_state = state
                if metrics is not None:
                    history.validation.append(metrics)
                    if selection_value(metrics) < best_rmse:
                        self.best_state, best_rmse = state, selection_value(metrics)
                if on_round is not None:
                    on_round(record, metrics)
        finally:
            self.close()
        if keep_best and validation and best_rmse < float("inf"):
            return self.best_state, history
        return state, history
