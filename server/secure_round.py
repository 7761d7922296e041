"""The secure-aggregation stages of one round on the coordinator: pure, like the round machine that owns it.

A task with ``[aggregation] secure_aggregation = true`` runs every round as follows (the round machine,
``server.round_machine``, does the selection and the commit exactly as for plain rounds):

1. Selection closes (the goal was reached, or the selection window ended with at least the minimum). The
   assigned clients become the roster, with ids 1..n in assignment order, and ``SecureRoundFactory``
   builds the round's public ``RoundParameters`` (a fresh graph seed, SecAgg+ neighbours and threshold
   from the task, a masked vector of every trainable value plus the weight).
2. Each client, once it has trained, polls ``SecureAggregation`` and is handed what to do next; the
   stages of ``fedrecon.core.secagg`` follow: advertise keys, share keys, send the masked input, reveal
   shares. A stage closes as soon as every client expected in it has answered, or at its deadline: the
   reporting deadline for key advertisement (clients train first), then ``secure_phase_timeout_s`` for
   each later stage.
3. Masked inputs fold into ``SecAggServer``'s running sum modulo 2^32 as they arrive; no individual
   vector is kept. If too few clients are left at any stage (fewer than the round's minimum of reports,
   or than the threshold needs), the round fails before any secret is reconstructed.
4. Unmasking yields ``Σ v``, which is dequantised and decoded (``SecureEncoding.decode_sum``) into the
   weighted sum and the total weight that ``Aggregator.fold_secure_sum`` takes; the round machine then
   commits as usual (DP noise, if configured, is added there to the unmasked sum).

A client's message that the protocol refuses (wrong stage, wrong sizes, shares for a non-neighbour, a
reveal it was not asked for) is answered with a status and changes nothing: the round goes on, and the
client may still send a correct message before the stage closes. A repeated identical message (a retry whose
answer was lost, even after its stage closed) is answered as the first was, with what to do now; a
different second message for a stage is ALREADY_EXISTS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import NoReturn

import numpy as np

from fedrecon.core.aggregation import AggregationConfig
from fedrecon.core.secagg import (
    InconsistentReveal,
    MalformedMessage,
    NotANeighbour,
    RoundFailed,
    SecAggServer,
    UnknownClient,
    WrongStage,
    build_parameters,
)
from fedrecon.core.secagg.messages import (
    EncryptedShares,
    KeyAdvertisement,
    KeyRoster,
    MaskedInput,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
)
from fedrecon.core.secagg.updates import SecureEncoding
from fedrecon.protocol import RoundState
from fedrecon.secagg_wire import (
    ClientMessage,
    Instruction,
    SecureDone,
    SecureParameters,
    SecurePhase,
    SecureWait,
)
from fedrecon.server.refusals import Refusal, Status

_STAGE_OF = {KeyAdvertisement: SecurePhase.ADVERTISE, EncryptedShares: SecurePhase.SHARE,
             MaskedInput: SecurePhase.MASK, UnmaskResponse: SecurePhase.UNMASK}


@dataclass(frozen=True)
class SumReady:
    """The round's unmasked sum, decoded: ``Σ w·s·Δ`` per tensor, ``Σ w``, and whose inputs are in it."""

    sums: list[np.ndarray]
    total_weight: float
    survivors: tuple[str, ...]


@dataclass(frozen=True)
class SecureFailed:
    reason: str


@dataclass
class SecureRound:
    """The stages of one secure round (see the module docstring). Not thread-safe: the round machine's
    caller holds the lock."""

    parameters_: SecureParameters
    keys: tuple[str, ...]  # client key of secure-aggregation id i + 1
    shapes: tuple[tuple[int, ...], ...]
    phase_ends: float
    phase_timeout_s: float
    phase: SecurePhase = SecurePhase.ADVERTISE
    server: SecAggServer = field(init=False)
    _ids: dict[str, int] = field(init=False)
    _sent: dict[SecurePhase, dict[int, str]] = field(default_factory=dict)  # stage -> id -> message digest
    _rosters: dict[int, KeyRoster] = field(default_factory=dict)
    _deliveries: dict[int, ShareDelivery] = field(default_factory=dict)
    _requests: dict[int, UnmaskRequest] = field(default_factory=dict)
    _dropped_at: dict[int, SecurePhase] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.server = SecAggServer(self.parameters_.parameters)
        self._ids = {key: i + 1 for i, key in enumerate(self.keys)}

    @property
    def parameters(self) -> SecureParameters:
        return self.parameters_

    def _expected(self) -> set[int]:
        """Who is expected to answer in the current stage."""
        match self.phase:
            case SecurePhase.ADVERTISE:
                return set(self._ids.values())
            case SecurePhase.SHARE:
                return set(self._rosters)
            case SecurePhase.MASK:
                return set(self._deliveries)
            case SecurePhase.UNMASK:
                return set(self._requests)
        return set()

    # ----- what a client is told ---------------------------------------------------------------------
    def instruction(self, key: str) -> Instruction:
        """What ``key`` must do now: the message the current stage expects from it (again, if it asks
        again), wait for the others, or stop (it dropped out of the round at an earlier stage)."""
        me = self._ids[key]
        if me in self._sent.get(self.phase, {}):
            return SecureWait(f"waiting for the other clients' {self.phase.value} messages")
        if me not in self._expected():
            return SecureDone(False, RoundState.OPEN, reason=f"this client's input is not in the round's sum "
                                                             f"(it sent no {self._dropped_stage(me)} message "
                                                             "in time)")
        match self.phase:
            case SecurePhase.ADVERTISE:
                p = self.parameters_
                return SecureParameters(me, p.parameters, p.encoding)
            case SecurePhase.SHARE:
                return self._rosters[me]
            case SecurePhase.MASK:
                return self._deliveries[me]
            case _:
                return self._requests[me]

    def _dropped_stage(self, me: int) -> str:
        for stage, ids in ((SecurePhase.ADVERTISE, set(self._ids.values())),
                           (SecurePhase.SHARE, self._rosters), (SecurePhase.MASK, self._deliveries),
                           (SecurePhase.UNMASK, self._requests)):
            if me not in self._sent.get(stage, {}) and (stage == SecurePhase.ADVERTISE or me in ids):
                return stage.value
        return self.phase.value

    # ----- a client's message ------------------------------------------------------------------------
    def receive(self, key: str, message: ClientMessage, digest: str) -> bool:
        """Take ``key``'s message for the current stage; True if it was taken now, False if it repeats the
        one already taken. Raises ``Refusal`` (the round goes on without the message)."""
        me = self._ids[key]
        stage = _STAGE_OF[type(message)]
        sent = self._sent.setdefault(stage, {})
        if sent.get(me) == digest:  # a retry (its answer was lost), perhaps after its stage closed
            return False
        if stage != self.phase:
            _refuse(Status.FAILED_PRECONDITION, "secagg_wrong_stage",
                    f"the round is at its {self.phase.value} stage; a {stage.value} message is not taken now")
        if me in sent:
            _refuse(Status.ALREADY_EXISTS, "secagg_duplicate",
                    f"this client already sent a different {stage.value} message in this round")
        if me not in self._expected():
            _refuse(Status.FAILED_PRECONDITION, "secagg_dropped",
                    f"this client is no longer in the round (it sent no {self._dropped_stage(me)} message in "
                    "time)")
        own = replace(message, sender=me)
        try:
            match own:
                case KeyAdvertisement():
                    self.server.receive_keys(own)
                case EncryptedShares():
                    self.server.receive_shares(own)
                case MaskedInput():
                    self.server.receive_masked_input(own)
                case UnmaskResponse():
                    self.server.receive_unmasking(own)
        except WrongStage as err:
            _refuse(Status.FAILED_PRECONDITION, "secagg_wrong_stage", str(err))
        except UnknownClient as err:
            _refuse(Status.FAILED_PRECONDITION, "secagg_dropped", str(err))
        except (MalformedMessage, NotANeighbour, InconsistentReveal) as err:
            _refuse(Status.INVALID_ARGUMENT, "secagg_bad_message", str(err))
        sent[me] = digest
        return True

    # ----- time and completeness ---------------------------------------------------------------------
    def advance(self, now: float) -> SumReady | SecureFailed | None:
        """Close every stage that is complete or past its deadline; the round's end when it comes."""
        p = self.parameters_.parameters
        closing = self.phase
        try:
            while self.phase not in (SecurePhase.CLOSED,):
                expected = self._expected()
                complete = expected <= set(self._sent.get(self.phase, {}))
                if not complete and now < self.phase_ends:
                    return None
                closing = self.phase
                for me in expected - set(self._sent.get(closing, {})):
                    self._dropped_at[me] = closing
                self.phase_ends = now + self.phase_timeout_s
                if closing == SecurePhase.ADVERTISE:
                    self._rosters = self.server.close_advertising()
                    self.phase = SecurePhase.SHARE
                    left = len(self._rosters)
                elif closing == SecurePhase.SHARE:
                    self._deliveries = self.server.close_sharing()
                    self.phase = SecurePhase.MASK
                    left = len(self._deliveries)
                elif closing == SecurePhase.MASK:
                    self.phase = SecurePhase.UNMASK
                    self._requests = self.server.close_masking()  # raises TooFewSurvivors below the minimum
                    left = len(self._requests)
                else:
                    self.phase = SecurePhase.CLOSED
                    result = self.server.finish()  # raises RecoveryFailed before reconstructing anything
                    total = p.quantiser.dequantise_sum(result.total, result.count)
                    sums, total_weight = self.parameters_.encoding.decode_sum(total, self.shapes)
                    return SumReady(sums, total_weight,
                                    tuple(self.keys[i - 1] for i in sorted(result.survivors)))
                if left < p.min_survivors:
                    self.phase = SecurePhase.CLOSED
                    return SecureFailed(f"secure aggregation: {left} clients completed the {closing.value} "
                                        f"stage; a sum needs at least {p.min_survivors} (nothing was "
                                        "unmasked)")
        except RoundFailed as err:
            self.phase = SecurePhase.CLOSED
            return SecureFailed(f"secure aggregation failed at the {closing.value} stage: {err}")
        return None


@dataclass(frozen=True)
class SecureRoundFactory:
    """Builds a round's ``SecureRound`` once its roster is fixed, from the task's settings."""

    task_name: str
    config: AggregationConfig
    shapes: tuple[tuple[int, ...], ...]
    weight_cap: float
    min_reports: int

    def check(self, clients: int) -> None:
        """Refuse (``ValueError``, at the coordinator's start) settings with which a round of ``clients``
        clients could not run, e.g. a threshold above the neighbourhood a round of that size has."""
        made = self(0, [str(i) for i in range(clients)], 0.0, 0.0)
        if isinstance(made, str):
            raise ValueError(f"task {self.task_name!r}: {made} (the selection goal)")

    def __call__(self, round_id: int, keys: Sequence[str], now: float, reporting_deadline: float
                 ) -> SecureRound | str:
        """The round's stages, or why it cannot run (too few clients, settings that do not fit them)."""
        n = len(keys)
        if n < 2:
            return f"secure aggregation needs at least 2 clients; {n} were selected"
        encoding = self.config.secure_encoding(self.weight_cap)
        try:
            parameters = build_parameters(
                round_id=f"fedrecon/{self.task_name}/{round_id}".encode(), clients=range(1, n + 1),
                vector_length=SecureEncoding.vector_length(self.shapes), clip=encoding.clip,
                degree=self.config.secure_neighbours, threshold=self.config.secure_threshold)
            floor = max(parameters.min_survivors, self.min_reports)
            if floor > parameters.min_survivors:
                parameters = build_parameters(
                    round_id=parameters.round_id, clients=parameters.clients,
                    vector_length=parameters.vector_length, clip=encoding.clip, degree=parameters.degree,
                    threshold=parameters.threshold, min_survivors=min(floor, n),
                    graph_seed=parameters.graph_seed)
        except ValueError as err:
            return f"secure aggregation cannot run with {n} clients: {err}"
        return SecureRound(SecureParameters(0, parameters, encoding), tuple(keys), self.shapes,
                           phase_ends=max(reporting_deadline, now + self.config.secure_phase_timeout_s),
                           phase_timeout_s=self.config.secure_phase_timeout_s)


def _refuse(status: Status, reason: str, message: str) -> NoReturn:
    raise Refusal(status, reason, message)
