"""Secure aggregation on the wire: what a ``SecureAggregation`` call carries, as domain types both sides use.

The protocol's messages are ``fedrecon.core.secagg``'s dataclasses; this module translates them to and from
the ``fedrecon.v1`` messages (and nothing else does), adds the few types that only exist because of a
transport (wait, done, the parameters a client is handed), and decodes strictly: a field of the wrong size
is a ``SecAggWireError`` naming it, which the coordinator answers INVALID_ARGUMENT. Sender ids are never
read from the wire: the coordinator fills them in from the caller's credentials (``sender=0`` here).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from fedrecon.core.secagg.messages import (
    EncryptedShare,
    EncryptedShares,
    KeyAdvertisement,
    KeyRoster,
    MaskedInput,
    NeighbourKeys,
    RevealedShare,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
)
from fedrecon.core.secagg.parameters import RoundParameters
from fedrecon.core.secagg.quantisation import Quantiser
from fedrecon.core.secagg.updates import SecureEncoding
from fedrecon.protocol import RoundState
from fedrecon.v1 import coordinator_pb2 as pb

#: How long a client waits before asking again when there is nothing to do yet.
POLL_MS = 100
MAX_IDS = 1 << 20  # more ids than a round can have (the quantiser's headroom)


class SecAggWireError(ValueError):
    """A secure-aggregation request that does not decode (wrong sizes, too many entries)."""


class SecurePhase(StrEnum):
    SELECTING = "selecting"
    ADVERTISE = "advertise"
    SHARE = "share"
    MASK = "mask"
    UNMASK = "unmask"
    CLOSED = "closed"


@dataclass(frozen=True)
class SecureWait:
    """Nothing to do yet: ask again after ``retry_after_ms``."""

    reason: str
    retry_after_ms: int = POLL_MS


@dataclass(frozen=True)
class SecureParameters:
    """Stage 0: the round's public parameters, the recipient's id in it, and how to encode the update."""

    client: int
    parameters: RoundParameters
    encoding: SecureEncoding


@dataclass(frozen=True)
class SecureDone:
    """Nothing more to do: whether the client's input is in the sum, and where the round is."""

    in_sum: bool
    state: RoundState
    new_version: int | None = None
    reason: str = ""


Instruction = SecureWait | SecureParameters | KeyRoster | ShareDelivery | UnmaskRequest | SecureDone
ClientMessage = KeyAdvertisement | EncryptedShares | MaskedInput | UnmaskResponse

_PHASES = {SecurePhase.SELECTING: pb.SEC_AGG_PHASE_SELECTING,
           SecurePhase.ADVERTISE: pb.SEC_AGG_PHASE_ADVERTISE, SecurePhase.SHARE: pb.SEC_AGG_PHASE_SHARE,
           SecurePhase.MASK: pb.SEC_AGG_PHASE_MASK,
           SecurePhase.UNMASK: pb.SEC_AGG_PHASE_UNMASK, SecurePhase.CLOSED: pb.SEC_AGG_PHASE_CLOSED}
_ROUND_STATES = {RoundState.OPEN: pb.ROUND_STATE_OPEN, RoundState.COMMITTED: pb.ROUND_STATE_COMMITTED,
                 RoundState.FAILED: pb.ROUND_STATE_FAILED}


# ----- client -> coordinator ------------------------------------------------------------------------------
def request_fields(message: ClientMessage | None) -> dict[str, object]:
    """The ``SecureAggregationRequest`` oneof for ``message`` (None: a poll)."""
    match message:
        case None:
            return {"poll": pb.SecAggPoll()}
        case KeyAdvertisement():
            return {"keys": pb.SecAggKeys(mask_public_key=message.mask_public_key,
                                          encryption_public_key=message.encryption_public_key,
                                          self_seed_commitment=message.self_seed_commitment)}
        case EncryptedShares():
            return {"shares": pb.SecAggShares(shares=[_share(s) for s in message.shares])}
        case MaskedInput():
            return {"masked_input": pb.SecAggMaskedInput(
                values=np.ascontiguousarray(message.values, dtype="<u4").tobytes())}
        case UnmaskResponse():
            return {"unmasking": pb.SecAggUnmasking(
                self_seed_shares=[_revealed(r) for r in message.self_seed_shares],
                mask_seed_shares=[_revealed(r) for r in message.mask_seed_shares],
                complaints=list(message.complaints))}
    raise TypeError(f"not a client message: {type(message).__name__}")


def client_message(request: pb.SecureAggregationRequest) -> ClientMessage | None:
    """The request's message with ``sender=0`` (the coordinator sets it), or None for a poll."""
    kind = request.WhichOneof("message")
    if kind in (None, "poll"):
        return None
    if kind == "keys":
        k = request.keys
        return KeyAdvertisement(0, k.mask_public_key, k.encryption_public_key, k.self_seed_commitment)
    if kind == "shares":
        _bounded("shares", len(request.shares.shares))
        return EncryptedShares(0, tuple(EncryptedShare(s.owner, s.recipient, s.ciphertext)
                                        for s in request.shares.shares))
    if kind == "masked_input":
        raw = request.masked_input.values
        if len(raw) % 4:
            raise SecAggWireError(f"a masked input is uint32 values: {len(raw)} bytes is not a multiple of 4")
        return MaskedInput(0, np.frombuffer(raw, dtype="<u4").astype(np.uint32))
    u = request.unmasking
    _bounded("revealed shares", len(u.self_seed_shares) + len(u.mask_seed_shares))
    _bounded("complaints", len(u.complaints))
    return UnmaskResponse(0, tuple(_revealed_from(r) for r in u.self_seed_shares),
                          tuple(_revealed_from(r) for r in u.mask_seed_shares),
                          tuple(int(c) for c in u.complaints))


# ----- coordinator -> client ------------------------------------------------------------------------------
def response(phase: SecurePhase, instruction: Instruction) -> pb.SecureAggregationResponse:
    out = pb.SecureAggregationResponse(phase=_PHASES[phase])
    match instruction:
        case SecureWait():
            out.wait.CopyFrom(pb.SecAggWait(retry_after_ms=instruction.retry_after_ms,
                                            reason=instruction.reason))
        case SecureParameters():
            p, e = instruction.parameters, instruction.encoding
            out.parameters.CopyFrom(pb.SecAggParameters(
                client=instruction.client, clients=list(p.clients), round_binding=p.round_id,
                vector_length=p.vector_length, degree=p.degree, threshold=p.threshold,
                min_survivors=p.min_survivors, graph_seed=p.graph_seed, quantiser_clip=p.quantiser.clip,
                quantiser_max_clients=p.quantiser.max_clients, max_update_norm=e.max_update_norm,
                weight_scale=e.weight_scale, uniform_weights=e.uniform_weights))
        case KeyRoster():
            out.roster.CopyFrom(pb.SecAggRoster(keys=[
                pb.SecAggNeighbourKeys(client=c, mask_public_key=k.mask_public_key,
                                       encryption_public_key=k.encryption_public_key)
                for c, k in sorted(instruction.keys.items())]))
        case ShareDelivery():
            out.delivery.CopyFrom(pb.SecAggDelivery(shares=[_share(s) for s in instruction.shares]))
        case UnmaskRequest():
            out.unmask_request.CopyFrom(pb.SecAggUnmaskRequest(
                survivors=sorted(instruction.survivors), dropped=sorted(instruction.dropped),
                survivor_count=instruction.survivor_count))
        case SecureDone():
            out.done.CopyFrom(pb.SecAggDone(
                in_sum=instruction.in_sum, round_state=_ROUND_STATES[instruction.state],
                new_version=instruction.new_version or 0, reason=instruction.reason))
    return out


def instruction_from(message: pb.SecureAggregationResponse) -> Instruction:
    """What the client must do next, from the coordinator's answer (the recipient fields are the
    client's own id, filled in by the caller that knows it: ``with_recipient``)."""
    kind = message.WhichOneof("next")
    if kind == "parameters":
        p = message.parameters
        parameters = RoundParameters(
            round_id=p.round_binding, clients=tuple(int(c) for c in p.clients), vector_length=p.vector_length,
            degree=p.degree, threshold=p.threshold, min_survivors=p.min_survivors, graph_seed=p.graph_seed,
            quantiser=Quantiser(clip=p.quantiser_clip, max_clients=p.quantiser_max_clients))
        return SecureParameters(p.client, parameters, SecureEncoding(p.max_update_norm, p.weight_scale,
                                                                     p.uniform_weights))
    if kind == "roster":
        return KeyRoster(0, {int(k.client): NeighbourKeys(k.mask_public_key, k.encryption_public_key)
                             for k in message.roster.keys})
    if kind == "delivery":
        return ShareDelivery(0, tuple(EncryptedShare(s.owner, s.recipient, s.ciphertext)
                                      for s in message.delivery.shares))
    if kind == "unmask_request":
        r = message.unmask_request
        return UnmaskRequest(0, frozenset(int(c) for c in r.survivors), frozenset(int(c) for c in r.dropped),
                             r.survivor_count)
    if kind == "done":
        d = message.done
        state = {v: k for k, v in _ROUND_STATES.items()}.get(d.round_state, RoundState.OPEN)
        return SecureDone(d.in_sum, state, d.new_version if state == RoundState.COMMITTED else None, d.reason)
    w = message.wait
    return SecureWait(w.reason, w.retry_after_ms or POLL_MS)


# ----- helpers --------------------------------------------------------------------------------------------
def _share(s: EncryptedShare) -> pb.SecAggShare:
    return pb.SecAggShare(owner=s.owner, recipient=s.recipient, ciphertext=s.ciphertext)


def _revealed(r: RevealedShare) -> pb.SecAggRevealedShare:
    return pb.SecAggRevealedShare(owner=r.owner, x=r.x, share=r.share)


def _revealed_from(r: pb.SecAggRevealedShare) -> RevealedShare:
    if r.x >= 1 << 16:
        raise SecAggWireError(f"a share's x-coordinate is below 2^16, not {r.x}")
    return RevealedShare(int(r.owner), int(r.x), bytes(r.share))


def _bounded(what: str, count: int) -> None:
    if count > MAX_IDS:
        raise SecAggWireError(f"{count} {what} is more than a round can have")
