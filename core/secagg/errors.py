"""Typed errors of the secure-aggregation protocol.

Two families, so that a driver can map them without reading messages: ``Refused`` is what the coordinator
answers one client whose message it will not take (the round goes on without that message, as the protocol
allows: the sender counts as dropped from that stage on); ``RoundFailed`` ends the round for everyone and
is raised *before* anything that could unmask an individual is reconstructed.
"""

from __future__ import annotations


class SecAggError(Exception):
    """Base of every error this package raises on purpose."""


class Refused(SecAggError):
    """The coordinator refuses one client's message; the round continues without it."""


class WrongStage(Refused):
    """The message belongs to another stage than the one the round is in (late, early or repeated)."""


class UnknownClient(Refused):
    """The sender is not in the round, or dropped out of it at an earlier stage."""


class MalformedMessage(Refused):
    """Wrong vector length or dtype, wrong key or ciphertext size, duplicate entries."""


class NotANeighbour(Refused):
    """Shares addressed to a client outside the sender's neighbourhood (or missing for one inside it)."""


class InconsistentReveal(Refused):
    """An unmasking answer that reveals both secrets of one neighbour, or secrets the request did not ask
    for: the coordinator takes none of it."""


class ClientAbort(SecAggError):
    """Raised on the client: it will not go on with this round (too few neighbours left, or the
    coordinator asked for something that would unmask an individual)."""


class TooFewNeighbours(ClientAbort):
    """Fewer than the threshold of a client's neighbours are still in the round."""


class InconsistentRequest(ClientAbort):
    """The coordinator's unmasking request is contradictory (a neighbour both alive and dropped, a
    neighbour left out, a second request in the same round) and answering could unmask someone."""


class BadShareCiphertext(SecAggError):
    """A share addressed to this client does not decrypt (wrong key, tampered or misrouted). The client
    drops that one share and goes on; the sender is named so the coordinator can be told."""

    def __init__(self, sender: int, reason: str) -> None:
        super().__init__(f"share from client {sender} does not decrypt: {reason}")
        self.sender = sender


class RoundFailed(SecAggError):
    """The round cannot produce a sum; nothing about any individual has been reconstructed."""


class RecoveryFailed(RoundFailed):
    """Too many clients dropped: some survivor's self mask or some dropped client's pairwise masks
    cannot be recovered from the shares revealed (fewer than the threshold)."""


class TooFewSurvivors(RoundFailed):
    """Fewer masked inputs than the minimum a sum may contain (a sum of one is that one's update)."""
