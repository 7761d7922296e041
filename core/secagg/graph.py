"""Who shares masks and secrets with whom: the SecAgg+ neighbourhood graph (Bell et al., CCS 2020).

Clients are placed on a ring in an order every party can compute from a public seed (sorted by
SHA-256(seed ‖ id)); each client's neighbours are the k/2 nearest on either side (a Harary graph; k even).
The seed should be drawn after the roster is fixed, so that no one chooses whose neighbour they become.
With k = n − 1 every client neighbours every other, which is the original protocol of Bonawitz et al.
(CCS 2017). A client's cost grows with k, not n.

The threshold t is per neighbourhood: a client's secrets are split among its k neighbours and any t of
them recover a secret. The default t = ⌊k/2⌋ + 1 (a strict majority) is what makes "never both secrets of
one client" hold even against a coordinator that lies about who dropped: each honest neighbour reveals one
of the two, so t of each would need 2t > k honest answers. An honest-but-curious coordinator learns
nothing about an individual unless it colludes with at least t of that individual's neighbours.

``recommended_degree`` picks k so that, with clients dropping independently at a rate δ, every
neighbourhood keeps t survivors except with a stated probability; it grows as O(log n). It does not
account for corrupted clients: a deployment against colluding clients should take k from the SecAgg+
paper's bounds for its fraction of corrupted clients.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence


def default_threshold(degree: int) -> int:
    """t = ⌊k/2⌋ + 1."""
    return degree // 2 + 1


def _log_binomial_cdf_below(k: int, successes_below: int, p: float) -> float:
    """log P[Binomial(k, p) < successes_below]."""
    terms = [math.lgamma(k + 1) - math.lgamma(s + 1) - math.lgamma(k - s + 1)
             + s * math.log(p) + (k - s) * math.log1p(-p) for s in range(successes_below)]
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms))


def recommended_degree(clients: int, *, dropout: float = 0.3, failure_probability: float = 1e-3) -> int:
    """The smallest even k (capped at n − 1) for which, with independent dropouts at rate ``dropout``, the
    chance that some neighbourhood keeps fewer than t = ⌊k/2⌋ + 1 survivors is at most
    ``failure_probability`` (a union bound over the n neighbourhoods)."""
    if clients < 2:
        raise ValueError("secure aggregation needs at least two clients")
    if not 0 <= dropout < 0.5:
        raise ValueError("a majority threshold tolerates a dropout rate below 0.5")
    if dropout == 0:
        return min(clients - 1, 2)
    budget = math.log(failure_probability / clients)
    for k in range(2, clients - 1, 2):
        if _log_binomial_cdf_below(k, default_threshold(k), 1.0 - dropout) <= budget:
            return k
    return clients - 1


def ring_order(clients: Sequence[int], seed: bytes) -> list[int]:
    """The clients in the public pseudo-random ring order."""
    return sorted(clients, key=lambda c: hashlib.sha256(seed + c.to_bytes(4, "big")).digest())


def neighbourhoods(clients: Sequence[int], degree: int, seed: bytes) -> dict[int, tuple[int, ...]]:
    """Each client's neighbours (sorted ids, never itself); symmetric. ``degree`` ≥ n − 1 is the full
    graph; otherwise it must be even."""
    n = len(clients)
    if len(set(clients)) != n:
        raise ValueError("client ids must be distinct")
    if degree >= n - 1:
        return {c: tuple(sorted(set(clients) - {c})) for c in clients}
    if degree < 2 or degree % 2:
        raise ValueError(f"a sparse neighbourhood has an even size of at least 2, not {degree}")
    ring = ring_order(clients, seed)
    half = degree // 2
    return {c: tuple(sorted(ring[(i + j) % n] for j in range(-half, half + 1) if j))
            for i, c in enumerate(ring)}
