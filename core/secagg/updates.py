"""How a client's model update becomes the one vector it masks, and how the round's sum becomes a mean.

With secure aggregation the coordinator sees only the sum of a round's vectors, so every per-client stage
of the aggregation (``core.aggregation``) that needs to see one update must run on the client, before
masking, and the weight must travel inside the masked vector:

1. The client bounds its weight: ``w = min(weight, W)`` (the task's weight cap) or, with uniform
   weighting, ``w = 1`` (``0`` for a report with no examples).
2. It clips its update to the task's norm bound S: ``s = min(1, S / ‖Δ‖)`` over all tensors together.
3. It sends ``v = [w/W · s · Δ (flattened, model order), w/W]``: every coordinate lies in [−S, S] or
   [0, 1], so the quantiser's range is ``max(S, 1)``, and the weight is one more masked coordinate.
4. The coordinator unmasks ``Σ v`` (never one ``v``) and multiplies back by W: ``Σ w·s·Δ`` and ``Σ w``, the
   streaming weighted mean's two accumulators (``Aggregator.fold_secure_sum``).

A non-finite update (the client step already zeroes it and gives it weight 0) is sent as zeros with weight
0. The coordinator cannot check that a client clipped honestly (no range proofs: see the package
docstring); the quantiser's range still bounds every coordinate a client can contribute to [−max(S,1),
max(S,1)] times W.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .quantisation import Quantiser


@dataclass(frozen=True)
class SecureEncoding:
    """The numbers every client of a secure round encodes with: the norm bound S, the weight scale W
    (the weight cap, or 1 with uniform weighting) and whether weights are uniform."""

    max_update_norm: float
    weight_scale: float
    uniform_weights: bool

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_update_norm) and self.max_update_norm > 0):
            raise ValueError("max_update_norm must be positive and finite")
        if not (math.isfinite(self.weight_scale) and self.weight_scale > 0):
            raise ValueError("weight_scale must be positive and finite")

    @property
    def clip(self) -> float:
        """The quantiser's range: no coordinate of an honest vector lies outside [−clip, clip]."""
        return max(self.max_update_norm, 1.0)

    @staticmethod
    def vector_length(shapes: Sequence[tuple[int, ...]]) -> int:
        """The masked vector's length: every trainable value, plus the weight."""
        return sum(math.prod(s) for s in shapes) + 1

    def effective_weight(self, weight: float) -> float:
        if not math.isfinite(weight) or weight <= 0:
            return 0.0
        return 1.0 if self.uniform_weights else min(float(weight), self.weight_scale)

    def encode(self, delta: Sequence[np.ndarray], weight: float) -> np.ndarray:
        """The float vector ``[w/W · s · Δ, w/W]`` (float64) a client quantises and masks."""
        flat = np.concatenate([np.asarray(d, np.float64).ravel() for d in delta] or [np.zeros(0)])
        w = self.effective_weight(weight)
        if not np.isfinite(flat).all():
            flat, w = np.zeros_like(flat), 0.0
        norm = float(np.linalg.norm(flat))
        scale = min(1.0, self.max_update_norm / norm) if norm > 0 else 1.0
        factor = w / self.weight_scale
        return np.concatenate([flat * (scale * factor), [factor]])

    def decode_sum(self, total: np.ndarray, shapes: Sequence[tuple[int, ...]]
                   ) -> tuple[list[np.ndarray], float]:
        """From the dequantised ``Σ v``: per tensor ``Σ w·s·Δ`` (float64) and ``Σ w``."""
        total = np.asarray(total, np.float64)
        if total.shape != (self.vector_length(shapes),):
            raise ValueError(f"a secure sum has {self.vector_length(shapes)} values, not {total.shape}")
        sums, offset = [], 0
        for shape in shapes:
            size = math.prod(shape)
            sums.append(total[offset:offset + size].reshape(shape) * self.weight_scale)
            offset += size
        # Rounding can leave a sum of zero weights a hair below zero: it is zero.
        return sums, max(0.0, float(total[-1]) * self.weight_scale)


def quantised_update(encoding: SecureEncoding, quantiser: Quantiser, delta: Sequence[np.ndarray],
                     weight: float, rng: np.random.Generator) -> np.ndarray:
    """What a client masks: its encoded update, quantised with stochastic rounding from ``rng`` (the
    device's and the simulator's clients call this same function)."""
    return quantiser.quantise(encoding.encode(delta, weight), rng)
