"""The coordinator's side of one secure-aggregation round.

``SecAggServer`` takes the clients' messages stage by stage (``receive_*``, each validating and either
accepting or raising a ``Refused`` for that one client) and is moved on by its driver (``close_*``, at a
deadline or when everyone has answered), which hands back the messages to send. It has no transport, no
clock and no I/O, so the coordinator's round state machine can own it and a simulation can drive it
directly.

What it holds, structurally: public keys, commitments, ciphertexts it cannot read (dropped once
forwarded), the *running sum* of masked inputs (each masked input is added the moment it arrives and not
kept), and the shares revealed in stage 4. It never holds an individual's quantised update: before the
last stage it has only masked vectors, and in the last stage it removes masks from the sum of at least
``min_survivors`` inputs only. Whether a round can finish is decided from share *counts* before any
secret is reconstructed, so a failed round reconstructs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum

import numpy as np

from . import crypto
from .errors import (
    InconsistentReveal,
    MalformedMessage,
    NotANeighbour,
    RecoveryFailed,
    RoundFailed,
    TooFewSurvivors,
    UnknownClient,
    WrongStage,
)
from .messages import (
    EncryptedShare,
    EncryptedShares,
    KeyAdvertisement,
    KeyRoster,
    MaskedInput,
    NeighbourKeys,
    RevealedShare,
    ShareDelivery,
    SumResult,
    UnmaskRequest,
    UnmaskResponse,
)
from .parameters import RoundParameters


class ServerStage(Enum):
    ADVERTISE = 1
    SHARE = 2
    MASK = 3
    UNMASK = 4
    DONE = 5
    FAILED = 6


class SecAggServer:
    """One round on the coordinator. Stage sets: U1 advertised keys, U2 ⊆ U1 sent shares, U3 ⊆ U2 sent a
    masked input (the survivors, whose updates are in the sum), U2 \\ U3 dropped after sharing."""

    def __init__(self, parameters: RoundParameters) -> None:
        self.parameters = parameters
        self.stage = ServerStage.ADVERTISE
        self._keys: dict[int, KeyAdvertisement] = {}
        self._advertised: frozenset[int] = frozenset()  # U1
        self._outbox: dict[int, list[EncryptedShare]] = {}  # recipient → ciphertexts, until delivered
        self._sent_shares: set[int] = set()  # U2 while it grows
        self._shared: frozenset[int] = frozenset()  # U2
        self._masked_sum = np.zeros(parameters.vector_length, dtype=np.uint32)
        self._masked: set[int] = set()  # U3 while it grows
        self._survivors: frozenset[int] = frozenset()
        self._requests: dict[int, UnmaskRequest] = {}
        self._self_seed_shares: dict[int, list[RevealedShare]] = {}  # surviving owner → shares
        self._mask_seed_shares: dict[int, list[RevealedShare]] = {}  # dropped owner → shares
        self._answered: set[int] = set()
        self._complaints: dict[int, tuple[int, ...]] = {}

    # -- stage 1: keys ----------------------------------------------------------------------------------
    def _expect(self, stage: ServerStage, sender: int, allowed: Sequence[int] | frozenset[int]) -> None:
        if self.stage is not stage:
            raise WrongStage(f"the round is at {self.stage.name}; a {stage.name} message is not taken")
        if sender not in allowed:
            raise UnknownClient(f"client {sender} is not (or no longer) in this round")

    def receive_keys(self, message: KeyAdvertisement) -> None:
        self._expect(ServerStage.ADVERTISE, message.sender, self.parameters.clients)
        if message.sender in self._keys:
            raise MalformedMessage(f"client {message.sender} already advertised its keys")
        try:
            crypto.check_agreeable(message.mask_public_key)
            crypto.check_agreeable(message.encryption_public_key)
        except ValueError as error:
            raise MalformedMessage(f"client {message.sender}: unusable public key ({error})") from error
        if len(message.self_seed_commitment) != crypto.COMMITMENT_BYTES:
            raise MalformedMessage(f"client {message.sender}: the commitment has "
                                   f"{len(message.self_seed_commitment)} bytes")
        self._keys[message.sender] = message

    def close_advertising(self) -> dict[int, KeyRoster]:
        """Each advertiser gets its advertised neighbours' keys."""
        self._advance(ServerStage.ADVERTISE, ServerStage.SHARE)
        self._advertised = frozenset(self._keys)
        rosters = {}
        for client in sorted(self._advertised):
            keys = {v: NeighbourKeys(self._keys[v].mask_public_key, self._keys[v].encryption_public_key)
                    for v in self.parameters.neighbours[client] if v in self._advertised}
            rosters[client] = KeyRoster(client, keys)
        return rosters

    # -- stage 2: encrypted shares ----------------------------------------------------------------------
    def receive_shares(self, message: EncryptedShares) -> None:
        """Exactly one ciphertext of the right size for each advertised neighbour, and nothing else."""
        u = message.sender
        self._expect(ServerStage.SHARE, u, self._advertised)
        if u in self._sent_shares:
            raise MalformedMessage(f"client {u} already sent its shares")
        expected = {v for v in self.parameters.neighbours[u] if v in self._advertised}
        recipients = [s.recipient for s in message.shares]
        if any(s.owner != u for s in message.shares):
            raise MalformedMessage(f"client {u} sent shares in another client's name")
        outside = set(recipients) - expected
        if outside:
            raise NotANeighbour(f"client {u} addressed shares to {sorted(outside)}, which are not its "
                                f"advertised neighbours")
        if len(recipients) != len(set(recipients)) or set(recipients) != expected:
            raise MalformedMessage(f"client {u} must send exactly one share to each of its "
                                   f"{len(expected)} advertised neighbours")
        if any(len(s.ciphertext) != crypto.CIPHERTEXT_BYTES for s in message.shares):
            raise MalformedMessage(f"client {u}: a share ciphertext has {crypto.CIPHERTEXT_BYTES} bytes")
        self._sent_shares.add(u)
        for share in message.shares:
            self._outbox.setdefault(share.recipient, []).append(share)

    def close_sharing(self) -> dict[int, ShareDelivery]:
        """Each client that shared gets the shares its sharing neighbours addressed to it."""
        self._advance(ServerStage.SHARE, ServerStage.MASK)
        self._shared = frozenset(self._sent_shares)
        deliveries = {v: ShareDelivery(
            v, tuple(s for s in self._outbox.get(v, []) if s.owner in self._shared))
                      for v in sorted(self._shared)}
        self._outbox.clear()
        return deliveries

    # -- stage 3: masked inputs -------------------------------------------------------------------------
    def receive_masked_input(self, message: MaskedInput) -> None:
        """Added into the running sum at once; the vector itself is not kept."""
        self._expect(ServerStage.MASK, message.sender, self._shared)
        values = message.values
        if not isinstance(values, np.ndarray) or values.dtype != np.uint32 or values.shape != (
                self.parameters.vector_length,):
            shape = getattr(values, "shape", None)
            dtype = getattr(values, "dtype", type(values).__name__)
            raise MalformedMessage(f"client {message.sender}: a masked input is uint32 of shape "
                                   f"({self.parameters.vector_length},), not {dtype} of shape {shape}")
        if message.sender in self._masked:
            raise MalformedMessage(f"client {message.sender} already sent its masked input")
        self._masked.add(message.sender)
        self._masked_sum += values  # wraps mod 2^32, as the masks do

    def close_masking(self) -> dict[int, UnmaskRequest]:
        """Fail (reconstructing nothing) if the sum would hold fewer than ``min_survivors`` inputs; else
        tell each survivor which of its neighbours survived and which dropped."""
        self._advance(ServerStage.MASK, ServerStage.UNMASK)
        self._survivors = frozenset(self._masked)
        if len(self._survivors) < self.parameters.min_survivors:
            self._fail()
            raise TooFewSurvivors(f"{len(self._survivors)} masked inputs arrived; a sum needs at least "
                                  f"{self.parameters.min_survivors}")
        neighbours = self.parameters.neighbours
        for u in sorted(self._survivors):
            partners = {v for v in neighbours[u] if v in self._shared}
            self._requests[u] = UnmaskRequest(u, frozenset({u} | (partners & self._survivors)),
                                              frozenset(partners - self._survivors), len(self._survivors))
        return dict(self._requests)

    # -- stage 4: unmasking -----------------------------------------------------------------------------
    def receive_unmasking(self, message: UnmaskResponse) -> None:
        """Take an answer only if it reveals what its request asked (self-seed shares of survivors,
        mask-seed shares of the dropped, never both for one owner) with the right share slots."""
        v = message.sender
        self._expect(ServerStage.UNMASK, v, self._survivors)
        if v in self._answered:
            raise MalformedMessage(f"client {v} already answered the unmasking request")
        request = self._requests[v]
        self_owners = [r.owner for r in message.self_seed_shares]
        mask_owners = [r.owner for r in message.mask_seed_shares]
        if set(self_owners) & set(mask_owners):
            both = sorted(set(self_owners) & set(mask_owners))
            raise InconsistentReveal(f"client {v} revealed both secrets of clients {both}")
        duplicates = len(set(self_owners)) != len(self_owners) or len(set(mask_owners)) != len(mask_owners)
        if (duplicates or not set(self_owners) <= request.survivors - {v}
                or not set(mask_owners) <= request.dropped):
            raise InconsistentReveal(f"client {v} revealed shares its request did not ask for")
        p = self.parameters
        for r in (*message.self_seed_shares, *message.mask_seed_shares):
            if len(r.share) != crypto.SEED_BYTES or r.x != p.share_index(r.owner, v):
                raise MalformedMessage(f"client {v}: a share of client {r.owner} is malformed")
        self._answered.add(v)
        for r in message.self_seed_shares:
            self._self_seed_shares.setdefault(r.owner, []).append(r)
        for r in message.mask_seed_shares:
            self._mask_seed_shares.setdefault(r.owner, []).append(r)
        if message.complaints:
            self._complaints[v] = tuple(message.complaints)

    def finish(self) -> SumResult:
        """Check every needed secret has at least t shares (else ``RecoveryFailed``, nothing
        reconstructed), then remove the survivors' self masks and the dropped clients' pairwise masks."""
        self._advance(ServerStage.UNMASK, ServerStage.DONE)
        p = self.parameters
        dropped = self._shared - self._survivors
        short = sorted([u for u in self._survivors if len(self._self_seed_shares.get(u, [])) < p.threshold]
                       + [u for u in dropped if len(self._mask_seed_shares.get(u, [])) < p.threshold])
        if short:
            self._fail()
            raise RecoveryFailed(f"fewer than {p.threshold} shares were revealed for clients {short}; "
                                 "the round fails and no secret was reconstructed")
        total = self._masked_sum
        def commits(u: int, seed: bytes) -> bool:
            return crypto.seed_commitment(p.round_id, u, seed) == self._keys[u].self_seed_commitment

        def derives_key(u: int, seed: bytes) -> bool:
            return crypto.public_bytes(crypto.mask_private_key(seed)) == self._keys[u].mask_public_key

        for u in sorted(self._survivors):
            seed = self._recover(u, self._self_seed_shares[u], commits)
            total -= crypto.self_mask(seed, p.round_id, p.vector_length)
        for u in sorted(dropped):
            seed = self._recover(u, self._mask_seed_shares[u], derives_key)
            key = crypto.mask_private_key(seed)
            for v in p.neighbours[u]:
                if v in self._survivors:  # v masked with +mask if v < u, so remove it with the opposite sign
                    pair = crypto.pairwise_mask(key, self._keys[v].mask_public_key, p.round_id,
                                                p.vector_length)
                    if v < u:
                        total -= pair
                    else:
                        total += pair
        self._masked_sum = np.zeros(0, dtype=np.uint32)  # the result is handed over, not kept
        return SumResult(total, self._survivors, frozenset(dropped), dict(self._complaints))

    def _recover(self, owner: int, shares: list[RevealedShare], check: Callable[[int, bytes], bool]
                 ) -> bytes:
        """The secret from t shares, checked against what the owner advertised; if a share was corrupted
        and one more is at hand, each leave-one-out subset of the first t + 1 is tried."""
        t = self.parameters.threshold
        points = [(r.x, r.share) for r in shares]
        candidates = [points[:t]] + ([points[:i] + points[i + 1:t + 1] for i in range(t + 1)]
                                     if len(points) > t else [])
        for subset in candidates:
            secret = crypto.combine_shares(subset)
            if check(owner, secret):
                return secret
        self._fail()
        raise RecoveryFailed(f"the shares revealed for client {owner} do not reconstruct what it advertised")

    # -- plumbing ---------------------------------------------------------------------------------------
    def _advance(self, current: ServerStage, following: ServerStage) -> None:
        if self.stage is not current:
            raise RoundFailed(f"cannot close {current.name}: the round is at {self.stage.name}")
        self.stage = following

    def _fail(self) -> None:
        self.stage = ServerStage.FAILED
        self._masked_sum = np.zeros(0, dtype=np.uint32)
