"""The client's side of one secure-aggregation round: a small state machine, one method per stage.

A client object lives for one round and holds the only copies of its secrets (the mask seed, the self-mask
seed, the encryption key). Each method takes the coordinator's previous message and returns the next one
to send; a client that raises ``ClientAbort`` simply stops (the protocol treats it as dropped).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from enum import Enum

import numpy as np

from . import crypto
from .errors import BadShareCiphertext, InconsistentRequest, TooFewNeighbours
from .messages import (
    EncryptedShare,
    EncryptedShares,
    KeyAdvertisement,
    KeyRoster,
    MaskedInput,
    RevealedShare,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
)
from .parameters import RoundParameters


class ClientStage(Enum):
    ADVERTISE = 1
    SHARE = 2
    MASK = 3
    UNMASK = 4
    DONE = 5


class SecAggClient:
    """One client in one round. Call ``advertise_keys``, ``share_keys``, ``mask``, ``unmask`` in order."""

    def __init__(self, client_id: int, parameters: RoundParameters, *,
                 entropy: Callable[[int], bytes] = os.urandom) -> None:
        """``entropy(n)`` gives n random bytes for the client's seeds: the operating system's CSPRNG,
        unless a test or a reproducible simulation passes a seeded source."""
        if client_id not in parameters.neighbours:
            raise ValueError(f"client {client_id} is not in this round")
        self.id = client_id
        self.parameters = parameters
        self._mask_seed = entropy(crypto.SEED_BYTES)
        self._self_seed = entropy(crypto.SEED_BYTES)
        self._mask_key = crypto.mask_private_key(self._mask_seed)
        # Any X25519 key would do; deriving it the same way keeps every secret under ``entropy``.
        self._encryption_key = crypto.mask_private_key(entropy(crypto.SEED_BYTES))
        self._stage = ClientStage.ADVERTISE
        self._roster: dict[int, bytes] = {}  # neighbour → mask public key, for the pairwise masks
        self._encryption_public: dict[int, bytes] = {}  # neighbour → encryption public key
        self._held: dict[int, tuple[int, bytes, bytes]] = {}  # owner → (x, mask-seed share, self-seed share)
        self._partners: tuple[int, ...] = ()  # the neighbours masked against (owners of the delivery)
        self.rejected: dict[int, BadShareCiphertext] = {}  # owners whose share to us did not decrypt

    def _expect(self, stage: ClientStage) -> None:
        if self._stage is not stage:
            raise InconsistentRequest(f"client {self.id} is at stage {self._stage.name}, not {stage.name}")

    def advertise_keys(self) -> KeyAdvertisement:
        self._expect(ClientStage.ADVERTISE)
        self._stage = ClientStage.SHARE
        p = self.parameters
        return KeyAdvertisement(self.id, crypto.public_bytes(self._mask_key),
                                crypto.public_bytes(self._encryption_key),
                                crypto.seed_commitment(p.round_id, self.id, self._self_seed))

    def share_keys(self, roster: KeyRoster) -> EncryptedShares:
        """Split both seeds among all k neighbours (x = position in the neighbour list) and encrypt each
        listed neighbour's pair of shares to it."""
        self._expect(ClientStage.SHARE)
        p = self.parameters
        mine = p.neighbours[self.id]
        if roster.recipient != self.id or not set(roster.keys) <= set(mine):
            raise InconsistentRequest("the key roster lists clients outside this client's neighbourhood")
        if len(roster.keys) < p.threshold:
            raise TooFewNeighbours(f"{len(roster.keys)} neighbours advertised keys; the threshold is "
                                   f"{p.threshold}")
        mask_shares = crypto.split_secret(self._mask_seed, threshold=p.threshold, count=len(mine))
        self_shares = crypto.split_secret(self._self_seed, threshold=p.threshold, count=len(mine))
        out = []
        for neighbour, keys in sorted(roster.keys.items()):
            x = p.share_index(self.id, neighbour)
            ciphertext = crypto.encrypt_share(
                self._encryption_key, keys.encryption_public_key, p.round_id, owner=self.id,
                recipient=neighbour, x=x, mask_seed_share=mask_shares[x - 1][1],
                self_seed_share=self_shares[x - 1][1])
            out.append(EncryptedShare(self.id, neighbour, ciphertext))
            self._roster[neighbour] = keys.mask_public_key
            self._encryption_public[neighbour] = keys.encryption_public_key
        self._stage = ClientStage.MASK
        return EncryptedShares(self.id, tuple(out))

    def mask(self, delivery: ShareDelivery, quantised: np.ndarray) -> MaskedInput:
        """Keep the shares addressed to us (a share that does not decrypt is set aside in ``rejected``:
        its owner still masked against us, so we still mask against it) and return
        quantised + self mask + Σ_{v in delivery} ±mask(v), with + when our id is the smaller."""
        self._expect(ClientStage.MASK)
        p = self.parameters
        owners = [s.owner for s in delivery.shares]
        if (delivery.recipient != self.id or len(set(owners)) != len(owners)
                or not set(owners) <= set(self._roster)
                or any(s.recipient != self.id for s in delivery.shares)):
            raise InconsistentRequest("the share delivery holds shares from outside this client's roster")
        if len(owners) < p.threshold:
            raise TooFewNeighbours(f"{len(owners)} neighbours are left; the threshold is {p.threshold}")
        q = np.asarray(quantised)
        if q.dtype != np.uint32 or q.shape != (p.vector_length,):
            raise ValueError(f"the quantised update must be uint32 of shape ({p.vector_length},)")
        if int(q.max(initial=0)) > p.quantiser.levels:
            raise ValueError("the quantised update exceeds the quantiser's range (the sum could wrap)")
        for share in delivery.shares:
            try:
                mask_share, self_share = crypto.decrypt_share(
                    self._encryption_key, self._encryption_public[share.owner], p.round_id,
                    owner=share.owner, recipient=self.id, x=p.share_index(share.owner, self.id),
                    ciphertext=share.ciphertext)
            except BadShareCiphertext as error:
                self.rejected[share.owner] = error
                continue
            self._held[share.owner] = (p.share_index(share.owner, self.id), mask_share, self_share)
        masked = q + crypto.self_mask(self._self_seed, p.round_id, p.vector_length)
        for owner in owners:
            pair = crypto.pairwise_mask(self._mask_key, self._roster[owner], p.round_id, p.vector_length)
            if self.id < owner:
                masked += pair
            else:
                masked -= pair
        self._partners = tuple(owners)
        self._stage = ClientStage.UNMASK
        return MaskedInput(self.id, masked)

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Answer once: for each partner, its self-seed share if it survived, its mask-seed share if it
        dropped. Refuse a request that names a partner both ways, leaves one out, leaves us out, or makes
        the sum smaller than the round's minimum: any of those could unmask an individual."""
        self._expect(ClientStage.UNMASK)
        self._stage = ClientStage.DONE  # whatever happens, never a second answer in this round
        p = self.parameters
        partners = set(self._partners)
        if request.recipient != self.id or self.id not in request.survivors:
            raise InconsistentRequest("an unmasking request for another client, or one that says we dropped")
        if request.survivors & request.dropped:
            raise InconsistentRequest("the request names a client both surviving and dropped")
        if not partners <= (request.survivors | request.dropped):
            raise InconsistentRequest("the request leaves out a neighbour we masked against")
        if request.survivor_count < p.min_survivors or len(request.survivors) > request.survivor_count:
            raise InconsistentRequest(f"a sum of {request.survivor_count} is below the minimum "
                                      f"{p.min_survivors}")
        self_shares, mask_shares = [], []
        for owner in sorted(partners & set(self._held)):
            x, mask_share, self_share = self._held[owner]
            if owner in request.survivors:
                self_shares.append(RevealedShare(owner, x, self_share))
            else:
                mask_shares.append(RevealedShare(owner, x, mask_share))
        return UnmaskResponse(self.id, tuple(self_shares), tuple(mask_shares), tuple(sorted(self.rejected)))
