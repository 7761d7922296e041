"""The protocol's messages, one frozen dataclass per message, in stage order.

Client → coordinator: ``KeyAdvertisement``, ``EncryptedShares``, ``MaskedInput``, ``UnmaskResponse``.
Coordinator → client: ``KeyRoster``, ``ShareDelivery``, ``UnmaskRequest``. Every field is bytes, ints or
one uint32 vector, so a gRPC mapping is mechanical. ``payload_bytes`` counts what a message carries (ids
4 bytes, keys, ciphertexts, 4 bytes per vector value), without the framing of any particular transport.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ID_BYTES = 4


@dataclass(frozen=True)
class KeyAdvertisement:
    """Stage 1, client → coordinator: the two public keys and the commitment to the self-mask seed."""

    sender: int
    mask_public_key: bytes
    encryption_public_key: bytes
    self_seed_commitment: bytes


@dataclass(frozen=True)
class NeighbourKeys:
    mask_public_key: bytes
    encryption_public_key: bytes


@dataclass(frozen=True)
class KeyRoster:
    """Stage 1 → 2, coordinator → client: the keys of the recipient's neighbours that advertised."""

    recipient: int
    keys: dict[int, NeighbourKeys]


@dataclass(frozen=True)
class EncryptedShare:
    """One owner's shares (of its mask seed and of its self-mask seed) for one neighbour, encrypted to it."""

    owner: int
    recipient: int
    ciphertext: bytes


@dataclass(frozen=True)
class EncryptedShares:
    """Stage 2, client → coordinator: one ``EncryptedShare`` for every neighbour in the sender's roster."""

    sender: int
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class ShareDelivery:
    """Stage 2 → 3, coordinator → client: the shares neighbours that completed stage 2 addressed to it. Its
    owners are exactly the neighbours the recipient must mask against."""

    recipient: int
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class MaskedInput:
    """Stage 3, client → coordinator: quantised update + self mask + Σ ± pairwise masks, mod 2^32."""

    sender: int
    values: np.ndarray


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 3 → 4, coordinator → client: which of the recipient's share-holding neighbours sent a masked
    input (``survivors``, the recipient included) and which did not (``dropped``); ``survivor_count`` is
    the size of the whole sum."""

    recipient: int
    survivors: frozenset[int]
    dropped: frozenset[int]
    survivor_count: int


@dataclass(frozen=True)
class RevealedShare:
    owner: int
    x: int
    share: bytes


@dataclass(frozen=True)
class UnmaskResponse:
    """Stage 4, client → coordinator: self-seed shares of surviving neighbours, mask-seed shares of dropped
    ones, never both for one owner; ``complaints``: owners whose share to the sender did not decrypt."""

    sender: int
    self_seed_shares: tuple[RevealedShare, ...]
    mask_seed_shares: tuple[RevealedShare, ...]
    complaints: tuple[int, ...] = ()


@dataclass(frozen=True)
class SumResult:
    """What the coordinator learns: the sum of the survivors' quantised updates (uint32, no wrap by the
    quantiser's headroom) and who is in it."""

    total: np.ndarray
    survivors: frozenset[int]
    dropped: frozenset[int]
    complaints: dict[int, tuple[int, ...]]

    @property
    def count(self) -> int:
        return len(self.survivors)


Message = (KeyAdvertisement | KeyRoster | EncryptedShares | ShareDelivery | MaskedInput | UnmaskRequest
           | UnmaskResponse)


def payload_bytes(message: Message) -> int:
    """Bytes of content a message carries (see the module docstring)."""
    match message:
        case KeyAdvertisement():
            return (ID_BYTES + len(message.mask_public_key) + len(message.encryption_public_key)
                    + len(message.self_seed_commitment))
        case KeyRoster():
            return ID_BYTES + sum(ID_BYTES + len(k.mask_public_key) + len(k.encryption_public_key)
                                  for k in message.keys.values())
        case EncryptedShares() | ShareDelivery():
            return ID_BYTES + sum(2 * ID_BYTES + len(s.ciphertext) for s in message.shares)
        case MaskedInput():
            return ID_BYTES + int(message.values.nbytes)
        case UnmaskRequest():
            return 2 * ID_BYTES + ID_BYTES * (len(message.survivors) + len(message.dropped))
        case UnmaskResponse():
            revealed = (*message.self_seed_shares, *message.mask_seed_shares)
            return ID_BYTES + sum(ID_BYTES + 2 + len(r.share) for r in revealed) + ID_BYTES * len(
                message.complaints)
