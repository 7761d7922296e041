"""The public parameters of one secure-aggregation round, the same on the coordinator and every client."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

from .graph import default_threshold, neighbourhoods, recommended_degree
from .quantisation import Quantiser


@dataclass(frozen=True)
class RoundParameters:
    """What the coordinator announces before the keys are advertised.

    ``clients`` are the round's participants as ids in 1..2^32 − 1 (the coordinator maps identities to
    them); ``degree`` k and ``threshold`` t as in ``graph``; ``min_survivors``: the fewest masked inputs a
    released sum may contain (a sum of one client would be that client's update); ``round_id`` binds every
    key derivation and ciphertext to this round (unique per task and round).
    """

    round_id: bytes
    clients: tuple[int, ...]
    vector_length: int
    degree: int
    threshold: int
    min_survivors: int
    graph_seed: bytes
    quantiser: Quantiser = field(compare=False)

    def __post_init__(self) -> None:
        n = len(self.clients)
        if n < 2 or len(set(self.clients)) != n or not all(0 < c < 1 << 32 for c in self.clients):
            raise ValueError("a round has at least two distinct client ids in 1..2^32-1")
        if self.vector_length < 1:
            raise ValueError("vector_length must be positive")
        if not 2 <= self.degree <= n - 1:
            raise ValueError(f"degree must be in 2..{n - 1}")
        if not 1 <= self.threshold <= min(self.degree, 1 << 16):
            raise ValueError(f"threshold must be in 1..{self.degree} (the neighbourhood size)")
        if not 2 <= self.min_survivors <= n:
            raise ValueError("min_survivors must be at least 2 (a sum of one is that one's update)")
        if n > self.quantiser.max_clients:
            raise ValueError("more clients than the quantiser has headroom for")

    @cached_property
    def neighbours(self) -> dict[int, tuple[int, ...]]:
        return neighbourhoods(self.clients, self.degree, self.graph_seed)

    def share_index(self, owner: int, holder: int) -> int:
        """The Shamir x-coordinate of ``holder``'s share of ``owner``'s secrets: 1 + its position in
        ``owner``'s neighbour list."""
        return self.neighbours[owner].index(holder) + 1


def build_parameters(*, round_id: bytes, clients: Sequence[int], vector_length: int, clip: float,
                     degree: int | None = None, threshold: int | None = None,
                     min_survivors: int | None = None, dropout: float = 0.3,
                     failure_probability: float = 1e-3, graph_seed: bytes | None = None,
                     max_clients: int | None = None) -> RoundParameters:
    """Parameters with the defaults stated in ``graph``: k from ``recommended_degree`` (the full graph
    when n is small), t = ⌊k/2⌋ + 1, at least t masked inputs in a sum, a fresh random graph seed, and
    quantisation headroom for exactly the round's clients."""
    n = len(clients)
    k = min(degree, n - 1) if degree is not None else recommended_degree(
        n, dropout=dropout, failure_probability=failure_probability)
    t = threshold if threshold is not None else default_threshold(k)
    return RoundParameters(
        round_id=round_id, clients=tuple(clients), vector_length=vector_length, degree=k, threshold=t,
        min_survivors=min_survivors if min_survivors is not None else max(t, 2),
        graph_seed=graph_seed if graph_seed is not None else os.urandom(16),
        quantiser=Quantiser(clip=clip, max_clients=max_clients or n))
