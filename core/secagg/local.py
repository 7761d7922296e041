"""An in-process driver: the round of ``__init__``'s docstring with every message passed by a function
call, and clients dropping out at chosen stages. Used by the tests, the cost benchmark and simulations; the
gRPC driver makes the same calls in the same order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .client import SecAggClient
from .errors import ClientAbort
from .messages import Message, SumResult, payload_bytes
from .parameters import RoundParameters, build_parameters
from .server import SecAggServer
from .updates import SecureEncoding, quantised_update


@dataclass
class RoundCosts:
    """CPU seconds (process time) and payload bytes, summed over clients, of one local round."""

    client_seconds: dict[int, float] = field(default_factory=dict)
    coordinator_seconds: float = 0.0
    upload_bytes: dict[int, int] = field(default_factory=dict)
    download_bytes: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DropoutPlan:
    """Clients that stop answering *before* sending the named stage's message."""

    before_keys: Collection[int] = ()
    before_shares: Collection[int] = ()
    before_masked_input: Collection[int] = ()
    before_unmasking: Collection[int] = ()


def local_round(parameters: RoundParameters, quantised: Callable[[int], np.ndarray], *,
                dropouts: DropoutPlan = DropoutPlan(), server: SecAggServer | None = None,
                clients: Mapping[int, SecAggClient] | None = None,
                costs: RoundCosts | None = None) -> SumResult:
    """Run one round; raises the server's ``RoundFailed`` if it fails. ``quantised(c)`` gives client c's
    quantised update when it is needed (so a large round never holds every update at once)."""
    server = server or SecAggServer(parameters)
    clients = dict(clients) if clients is not None else {c: SecAggClient(c, parameters)
                                                         for c in parameters.clients}
    costs = costs if costs is not None else RoundCosts()

    def on_client(c: int, work: Callable[..., Message], *args: Any) -> Message | None:
        start = time.process_time()
        try:
            return work(*args)
        except ClientAbort:
            return None
        finally:
            costs.client_seconds[c] = costs.client_seconds.get(c, 0.0) + time.process_time() - start

    def on_server(work: Callable[..., object], *args: Any) -> object:
        start = time.process_time()
        try:
            return work(*args)
        finally:
            costs.coordinator_seconds += time.process_time() - start

    def sent(c: int, message: Message | None) -> bool:
        if message is not None:
            costs.upload_bytes[c] = costs.upload_bytes.get(c, 0) + payload_bytes(message)
        return message is not None

    def received(c: int, message: Message) -> None:
        costs.download_bytes[c] = costs.download_bytes.get(c, 0) + payload_bytes(message)

    for c in sorted(set(clients) - set(dropouts.before_keys)):
        advert = on_client(c, clients[c].advertise_keys)
        if sent(c, advert):
            on_server(server.receive_keys, advert)
    rosters = on_server(server.close_advertising)
    assert isinstance(rosters, dict)
    for c, roster in rosters.items():
        received(c, roster)
        if c in dropouts.before_shares:
            continue
        shares = on_client(c, clients[c].share_keys, roster)
        if sent(c, shares):
            on_server(server.receive_shares, shares)
    deliveries = on_server(server.close_sharing)
    assert isinstance(deliveries, dict)
    for c, delivery in deliveries.items():
        received(c, delivery)
        if c in dropouts.before_masked_input:
            continue
        update = quantised(c)
        masked = on_client(c, clients[c].mask, delivery, update)
        if sent(c, masked):
            on_server(server.receive_masked_input, masked)
    requests = on_server(server.close_masking)
    assert isinstance(requests, dict)
    for c, request in requests.items():
        received(c, request)
        if c in dropouts.before_unmasking:
            continue
        answer = on_client(c, clients[c].unmask, request)
        if sent(c, answer):
            on_server(server.receive_unmasking, answer)
    result = on_server(server.finish)
    assert isinstance(result, SumResult)
    return result


def secure_sum(updates: Mapping[int, np.ndarray], parameters: RoundParameters, rng: np.random.Generator, *,
               dropouts: DropoutPlan = DropoutPlan()) -> tuple[np.ndarray, SumResult]:
    """The float sum of the survivors' updates as a simulation would get it through a secure round:
    quantised (stochastic rounding from ``rng``), masked, summed and unmasked; and the round's result
    (who is in the sum). Within ``parameters.quantiser.error_bound(result.count)`` of the plain sum of the
    survivors' clipped updates."""
    quantiser = parameters.quantiser
    result = local_round(parameters, lambda c: quantiser.quantise(updates[c], rng), dropouts=dropouts)
    return quantiser.dequantise_sum(result.total, result.count), result


def secure_round_sum(encoding: SecureEncoding, deltas: Sequence[Sequence[np.ndarray]],
                     weights: Sequence[float], shapes: Sequence[tuple[int, ...]], *, round_id: bytes,
                     rng: np.random.Generator, degree: int | None = None, threshold: int | None = None,
                     dropouts: DropoutPlan = DropoutPlan()) -> tuple[list[np.ndarray], float, SumResult]:
    """A simulated round's secure aggregation, as a coordinator and its clients would run it: each client
    encodes (clip, weight) and quantises its update, the round is masked and unmasked in process, and the
    sum is decoded into ``Σ w·s·Δ`` per tensor and ``Σ w`` (``Aggregator.fold_secure_sum`` takes them).
    Client ids are 1..C in the order given; ``rng`` draws the graph seed and the stochastic rounding."""
    parameters = build_parameters(
        round_id=round_id, clients=range(1, len(deltas) + 1),
        vector_length=SecureEncoding.vector_length(shapes), clip=encoding.clip, degree=degree,
        threshold=threshold, graph_seed=rng.bytes(16))
    result = local_round(parameters, lambda c: quantised_update(
        encoding, parameters.quantiser, deltas[c - 1], weights[c - 1], rng), dropouts=dropouts)
    total = parameters.quantiser.dequantise_sum(result.total, result.count)
    sums, total_weight = encoding.decode_sum(total, shapes)
    return sums, total_weight, result
