"""Fixed-point encoding of float updates into the ring Z_{2^32}, with headroom for the whole round's sum.

A coordinate x is clipped to [-c, c] and mapped to y = (x + c) · L / (2c) ∈ [0, L], then rounded
stochastically: ⌊y⌋ + 1 with probability y − ⌊y⌋ (unbiased), with a seeded numpy generator (rounding
needs no secrecy; masks never come from numpy). L = ⌊(2^32 − 1) / N⌋ for at most N clients per round, so a
sum of up to N encoded values is at most N·L < 2^32 and never wraps: the sum modulo 2^32 *is* the integer sum.

Error bound: each client's rounding moves its value by less than one level, 2c/L in update units, so the
dequantised sum of K ≤ N clients differs from the sum of their *clipped* updates by less than K · 2c / L
per coordinate (surely), with standard deviation at most √K · c / L (stochastic rounding's variance is at
most 1/4 level² per client). With N = 1,000 and c = 1: L = 4,294,967, bound K·4.66e-7 ≤ 4.66e-4.
Clipping itself is not rounding error: choose c above the largest coordinate a clipped update can have
(e.g. the L2 norm bound S of the aggregation stages, which bounds every coordinate).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODULUS_BITS = 32
MODULUS = 1 << MODULUS_BITS


@dataclass(frozen=True)
class Quantiser:
    """Encoding with clip range [-clip, clip] for rounds of at most ``max_clients`` clients."""

    clip: float
    max_clients: int

    def __post_init__(self) -> None:
        if not self.clip > 0 or not np.isfinite(self.clip):
            raise ValueError("clip must be a positive finite number")
        if not 1 <= self.max_clients <= 1 << 20:
            raise ValueError("max_clients must be between 1 and 2^20 (at least 2^12 levels per client)")

    @property
    def levels(self) -> int:
        """L: the largest encoded value of one client."""
        return (MODULUS - 1) // self.max_clients

    @property
    def step(self) -> float:
        """One level in update units, 2c / L."""
        return 2.0 * self.clip / self.levels

    def quantise(self, update: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """uint32 values in [0, L]; non-finite coordinates are refused (the client step zeroes them)."""
        x = np.asarray(update, dtype=np.float64).ravel()
        if not np.all(np.isfinite(x)):
            raise ValueError("cannot quantise a non-finite update")
        y = (np.clip(x, -self.clip, self.clip) + self.clip) * (self.levels / (2.0 * self.clip))
        low = np.floor(y)
        q = low + (rng.random(y.shape) < (y - low))
        return np.minimum(q, self.levels).astype(np.uint32)

    def dequantise_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        """The float sum of ``count`` clients' updates from the sum of their encodings."""
        if not 0 <= count <= self.max_clients:
            raise ValueError(f"a sum of {count} clients is outside this encoding's 0..{self.max_clients}")
        return np.asarray(total, dtype=np.float64) * self.step - count * self.clip

    def error_bound(self, count: int) -> float:
        """Largest per-coordinate difference between the dequantised sum and the sum of clipped updates."""
        return count * self.step
