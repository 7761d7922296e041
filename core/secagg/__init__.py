"""Secure aggregation: the coordinator learns the sum of a round's updates and nothing else.

Pairwise-masked secure aggregation after Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning" (CCS 2017), on the sparse neighbourhood graph of SecAgg+ (Bell et al.,
"Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020); with the full graph it is
the 2017 protocol. Transport-free: ``SecAggServer`` and ``SecAggClient`` exchange the dataclasses of
``messages``, and a driver (the coordinator's round state machine and the client library over gRPC, or
``local_round`` in process) carries them. No TensorFlow, grpc or database is imported here.

One round, for clients U with public parameters (round id, k neighbours each, threshold t, vector length d,
quantiser) and modulus 2^32:

0. Parameters: the coordinator announces ``RoundParameters``; every party derives the same neighbourhoods
   N(u) from the public graph seed (``graph``).
1. Advertise keys: each client draws a mask seed m_u (the X25519 mask key is derived from it), a self-mask
   seed b_u and an X25519 encryption key, and sends both public keys and a commitment to b_u. The
   coordinator answers each advertiser (U1) with its advertised neighbours' keys.
2. Share keys: each client Shamir-splits m_u and b_u (t of k) among its k neighbours and sends each
   listed neighbour its two shares, AES-GCM-encrypted under HKDF(X25519) of the encryption keys. The
   coordinator checks the addressing and forwards; the senders are U2.
3. Masked input: each client in U2 sends y_u = q_u + PRG(b_u) + Σ_{v ∈ N(u) ∩ U2} ±PRG(s_uv) mod 2^32
   (+ when u < v), q_u its quantised update, s_uv agreed from the mask keys. The coordinator adds each y_u
   into a running sum and keeps nothing else of it; the senders are the survivors U3.
4. Unmasking: if |U3| ≥ the minimum, each survivor is told which of its neighbours survived and which
   dropped; it reveals b_v's share for each surviving neighbour and m_v's share for each dropped one,
   never both for one neighbour, and answers once. With ≥ t shares for each needed secret the coordinator
   removes the survivors' self masks and the dropped clients' pairwise masks: Σ y − Σ masks = Σ_{U3} q_u,
   which ``Quantiser.dequantise_sum`` turns back into floats. With fewer, the round fails before any secret
   is reconstructed.

What the coordinator sees: public keys, commitments, ciphertexts it cannot open, masked vectors that are
uniformly distributed on their own, the sum, and for each neighbour exactly one of its two secrets. Threats
out of scope (as in the 2017 paper's semi-honest setting): a client that sends an out-of-range q_u can skew
the sum (no range proofs), and a coordinator that lies about dropouts is stopped by the majority threshold,
not by the signed consistency round of the malicious-security variant.
"""

from .client import SecAggClient
from .errors import (
    BadShareCiphertext,
    ClientAbort,
    InconsistentRequest,
    InconsistentReveal,
    MalformedMessage,
    NotANeighbour,
    RecoveryFailed,
    Refused,
    RoundFailed,
    SecAggError,
    TooFewNeighbours,
    TooFewSurvivors,
    UnknownClient,
    WrongStage,
)
from .graph import default_threshold, neighbourhoods, recommended_degree
from .messages import payload_bytes
from .parameters import RoundParameters, build_parameters
from .quantisation import MODULUS, Quantiser
from .server import SecAggServer, ServerStage

__all__ = [
    "MODULUS",
    "BadShareCiphertext",
    "ClientAbort",
    "InconsistentRequest",
    "InconsistentReveal",
    "MalformedMessage",
    "NotANeighbour",
    "Quantiser",
    "RecoveryFailed",
    "Refused",
    "RoundFailed",
    "RoundParameters",
    "SecAggClient",
    "SecAggError",
    "SecAggServer",
    "ServerStage",
    "TooFewNeighbours",
    "TooFewSurvivors",
    "UnknownClient",
    "WrongStage",
    "build_parameters",
    "default_threshold",
    "neighbourhoods",
    "payload_bytes",
    "recommended_degree",
]
