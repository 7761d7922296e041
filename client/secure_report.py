"""A client's side of a secure round over gRPC: what ``FederatedClient.participate`` does instead of a plain
report when the assignment says the round uses secure aggregation.

The coordinator answers every ``SecureAggregation`` call with what to do next, so the client is a loop:

1. Poll until the round's roster is fixed; the answer is the round's public parameters. The client encodes
   its update as the task says (clip to the norm bound, weight as one more coordinate:
   ``core.secagg.updates``), quantises it, and advertises its keys (``SecAggClient``, the same code the
   in-process simulation runs).
2. Given its neighbours' keys, it sends its encrypted shares; given the shares addressed to it, its masked
   input; given who survived, its revealed shares. Between stages it waits as told.
3. It stops when told the round is over (or that it dropped out), or when the client-side protocol
   refuses to go on (``ClientAbort``: too few neighbours left, or a request that could unmask someone).

The update leaves the device only masked; nothing about the round is kept afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from fedrecon.client.transport import CoordinatorChannel
from fedrecon.core.secagg import ClientAbort, SecAggClient
from fedrecon.core.secagg.messages import KeyRoster, ShareDelivery, UnmaskRequest
from fedrecon.core.secagg.updates import SecureEncoding, quantised_update
from fedrecon.protocol import Assignment, ReportOutcome, RoundState
from fedrecon.secagg_wire import ClientMessage, SecureDone, SecureParameters, SecureWait


class SecureReporter:
    """One client's part in one secure round. ``run`` drives it to the end; each ``on_*`` method answers
    one instruction (a test can stop a client at any stage by overriding one)."""

    def __init__(self, transport: CoordinatorChannel, assignment: Assignment, client_id: str,
                 delta: Sequence[np.ndarray], weight: float, metrics: dict[str, float] | None = None, *,
                 rng: np.random.Generator | None = None, sleep: Callable[[float], None] = time.sleep,
                 max_wait_s: float = 600.0) -> None:
        """``rng`` draws the stochastic rounding of the quantised update (default: fresh entropy);
        ``max_wait_s`` bounds the whole protocol (waiting included)."""
        self.transport = transport
        self.assignment = assignment
        self.client_id = client_id
        self.delta = [np.asarray(d) for d in delta]
        self.weight = float(weight)
        self.metrics = dict(metrics or {})
        self.rng = rng if rng is not None else np.random.default_rng()
        self.sleep = sleep
        self.max_wait_s = max_wait_s
        self.client: SecAggClient | None = None
        self._quantised: np.ndarray | None = None

    def run(self) -> ReportOutcome:
        give_up = time.monotonic() + self.max_wait_s
        message: ClientMessage | None = None
        while True:
            _, instruction = self.transport.secure_aggregation(self.assignment, self.client_id, message)
            message = None
            try:
                match instruction:
                    case SecureWait():
                        if time.monotonic() > give_up:
                            return self._outcome(False, f"gave up after {self.max_wait_s:g} s of secure "
                                                        "aggregation", "DEADLINE_EXCEEDED")
                        self.sleep(instruction.retry_after_ms / 1000.0)
                    case SecureParameters():
                        message = self.on_parameters(instruction)
                    case KeyRoster():
                        message = self.on_roster(instruction)
                    case ShareDelivery():
                        message = self.on_delivery(instruction)
                    case UnmaskRequest():
                        message = self.on_unmask_request(instruction)
                    case SecureDone():
                        return self.on_done(instruction)
            except ClientAbort as err:  # the protocol says stop: the round treats this client as dropped
                return self._outcome(False, f"secure aggregation stopped on this client: {err}", "ABORTED")

    # ----- one method per instruction --------------------------------------------------------------------
    def on_parameters(self, instruction: SecureParameters) -> ClientMessage:
        """Encode and quantise the update as the round says, then advertise this client's keys."""
        p, encoding = instruction.parameters, instruction.encoding
        expected = SecureEncoding.vector_length([d.shape for d in self.delta])
        if p.vector_length != expected:
            raise ClientAbort(f"the round masks vectors of {p.vector_length} values; this update makes "
                              f"{expected}")
        self.client = SecAggClient(instruction.client, p)
        self._quantised = quantised_update(encoding, p.quantiser, self.delta, self.weight, self.rng)
        return self.client.advertise_keys()

    def on_roster(self, roster: KeyRoster) -> ClientMessage:
        client = self._client()
        return client.share_keys(replace(roster, recipient=client.id))

    def on_delivery(self, delivery: ShareDelivery) -> ClientMessage:
        client = self._client()
        assert self._quantised is not None
        masked = client.mask(replace(delivery, recipient=client.id), self._quantised)
        self._quantised = None  # only the masked vector leaves; the plain one is not kept
        return masked

    def on_unmask_request(self, request: UnmaskRequest) -> ClientMessage:
        client = self._client()
        return client.unmask(replace(request, recipient=client.id))

    def on_done(self, done: SecureDone) -> ReportOutcome:
        a = self.assignment
        if not done.in_sum:
            return self._outcome(False, done.reason or "this client's input is not in the round's sum",
                                 "ABORTED")
        if done.state == RoundState.COMMITTED:
            return replace(self._outcome(True, f"in the secure sum of round {a.round_num}, committed as "
                                               f"version {done.new_version}"),
                           committed_version=done.new_version)
        return self._outcome(False, f"round {a.round_num} failed ({done.reason}); its sum is in no version",
                             "ABORTED")

    # ----- helpers -------------------------------------------------------------------------------------
    def _client(self) -> SecAggClient:
        if self.client is None:
            raise ClientAbort("the coordinator skipped the round's parameters")
        return self.client

    def _outcome(self, accepted: bool, message: str, status: str = "OK") -> ReportOutcome:
        a = self.assignment
        return ReportOutcome(accepted, message, status, a.round_id, a.round_num, a.model_version, self.weight,
                             self.metrics)
