"""The cryptographic primitives of secure aggregation, all from well-kept libraries.

- Key agreement: X25519 (``cryptography``). A client has two key pairs per round: one whose agreed secrets
  seed the pairwise masks, one whose agreed secrets encrypt the shares it sends. The mask key pair is
  derived from a 16-byte *mask seed* (HKDF-SHA256 → X25519 private key), so that the seed, not the 32-byte
  key, is what gets secret-shared, and a reconstructed seed can be checked against the advertised public key.
- Key derivation: HKDF-SHA256 with the round id as salt and a distinct ``info`` per use, so a secret agreed
  for one purpose or one round is never reused for another.
- Share encryption: AES-256-GCM with a random 96-bit nonce; the associated data binds the round, the owner
  and the recipient, so a coordinator that reroutes or replays a ciphertext makes it fail to decrypt.
- Masks: the keystream of AES-128-CTR under a derived key, read as little-endian uint32 (a cryptographic PRG;
  numpy's generators are not, and are never used for masks).
- Secret sharing: Shamir's scheme from pycryptodome (``Crypto.Protocol.SecretSharing.Shamir``), over
  GF(2^128) on 16-byte secrets, which is exactly the size of both secrets a client shares (the mask seed
  and the self-mask seed). Share x-coordinates are 1..k, a recipient's position in the owner's neighbour list.
  It fits in every respect but speed: its field arithmetic is pure Python, and splitting (k·t products per
  secret) and combining (t inverses) are about 90% of both the client's and the coordinator's CPU in
  ``benchmarks/secagg_cost.py``. A prime-field Shamir on Python integers would be roughly ten times faster,
  but it would be hand-written cryptography; the library stays until that cost matters.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import BadShareCiphertext

SEED_BYTES = 16  # both shared secrets: the size pycryptodome's Shamir works on, and an AES-128 key
PUBLIC_KEY_BYTES = 32
COMMITMENT_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_SHARE_PLAINTEXT = struct.Struct(">IIH16s16s")  # owner, recipient, x, mask-seed share, self-seed share
CIPHERTEXT_BYTES = NONCE_BYTES + _SHARE_PLAINTEXT.size + TAG_BYTES  # 70


def _hkdf(secret: bytes, *, length: int, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def mask_private_key(mask_seed: bytes) -> X25519PrivateKey:
    """The X25519 key whose agreed secrets seed a client's pairwise masks, derived from its mask seed."""
    raw = _hkdf(mask_seed, length=32, salt=b"", info=b"fedrecon secagg mask key")
    return X25519PrivateKey.from_private_bytes(raw)


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def load_public_key(raw: bytes) -> X25519PublicKey:
    """Raises ValueError for anything that is not a 32-byte X25519 public key."""
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(f"a public key has {PUBLIC_KEY_BYTES} bytes, not {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


def check_agreeable(raw: bytes) -> None:
    """Raises ValueError for a public key no agreement can use: a low-order point makes every shared secret
    zero (``cryptography`` refuses it), so a client advertising one would break its neighbours' rounds
    instead of only its own. One throwaway agreement tells, whatever the private key."""
    X25519PrivateKey.generate().exchange(load_public_key(raw))


def seed_commitment(round_id: bytes, owner: int, self_seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed, advertised with the keys, so the coordinator can tell a
    correctly reconstructed seed from one made of a corrupted share (the seed has 128 bits of entropy, so
    the hash reveals nothing useful about it)."""
    material = b"fedrecon secagg self seed" + round_id + owner.to_bytes(4, "big") + self_seed
    return hashlib.sha256(material).digest()


def _prg(key: bytes, length: int) -> np.ndarray:
    """``length`` uint32 words of AES-128-CTR keystream under ``key`` (16 bytes)."""
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(4 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32, copy=False)


def pairwise_mask(own: X25519PrivateKey, other_public: bytes, round_id: bytes, length: int) -> np.ndarray:
    """The mask two neighbours share (the same array from either side): PRG(HKDF(X25519(own, other)))."""
    agreed = own.exchange(load_public_key(other_public))
    return _prg(_hkdf(agreed, length=16, salt=round_id, info=b"fedrecon secagg pairwise mask"), length)


def self_mask(self_seed: bytes, round_id: bytes, length: int) -> np.ndarray:
    """The mask only its owner (or a threshold of its neighbours, if it survives) can remove."""
    return _prg(_hkdf(self_seed, length=16, salt=round_id, info=b"fedrecon secagg self mask"), length)


def _share_key(own: X25519PrivateKey, other_public: bytes, round_id: bytes) -> AESGCM:
    agreed = own.exchange(load_public_key(other_public))
    return AESGCM(_hkdf(agreed, length=32, salt=round_id, info=b"fedrecon secagg share encryption"))


def _associated_data(round_id: bytes, owner: int, recipient: int) -> bytes:
    return round_id + owner.to_bytes(4, "big") + recipient.to_bytes(4, "big")


def encrypt_share(own: X25519PrivateKey, recipient_public: bytes, round_id: bytes, *, owner: int,
                  recipient: int, x: int, mask_seed_share: bytes, self_seed_share: bytes) -> bytes:
    """nonce ‖ AES-GCM(owner, recipient, x, both shares), bound to (round, owner, recipient)."""
    plaintext = _SHARE_PLAINTEXT.pack(owner, recipient, x, mask_seed_share, self_seed_share)
    nonce = os.urandom(NONCE_BYTES)
    aead = _share_key(own, recipient_public, round_id)
    return nonce + aead.encrypt(nonce, plaintext, _associated_data(round_id, owner, recipient))


def decrypt_share(own: X25519PrivateKey, owner_public: bytes, round_id: bytes, *, owner: int,
                  recipient: int, x: int, ciphertext: bytes) -> tuple[bytes, bytes]:
    """(mask-seed share, self-seed share) from ``owner`` to ``recipient``; BadShareCiphertext otherwise."""
    if len(ciphertext) != CIPHERTEXT_BYTES:
        raise BadShareCiphertext(owner, f"{len(ciphertext)} bytes, expected {CIPHERTEXT_BYTES}")
    try:
        aead = _share_key(own, owner_public, round_id)
        plaintext = aead.decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:],
                                 _associated_data(round_id, owner, recipient))
    except (InvalidTag, ValueError) as error:
        raise BadShareCiphertext(owner, "authentication failed") from error
    got_owner, got_recipient, got_x, mask_share, self_share = _SHARE_PLAINTEXT.unpack(plaintext)
    if (got_owner, got_recipient, got_x) != (owner, recipient, x):
        raise BadShareCiphertext(owner, "addressed to another share slot")
    return mask_share, self_share


def split_secret(secret: bytes, *, threshold: int, count: int) -> list[tuple[int, bytes]]:
    """``count`` Shamir shares (x = 1..count) of a 16-byte secret, any ``threshold`` of which recover it."""
    return Shamir.split(threshold, count, secret)


def combine_shares(shares: Sequence[tuple[int, bytes]]) -> bytes:
    """The secret from exactly a threshold of shares (pycryptodome wants exactly that many)."""
    return Shamir.combine(list(shares))
