"""Streaming weighted mean of client deltas.

The server folds each accepted report into a running sum Σ w_c Δ_c and a total weight Σ w_c, so memory is
one model's worth however many clients report (FedJAX and Google's production system aggregate the same
way). The simulator folds a whole group of clients at once with ``add_sum``; the coordinator folds one report
at a time with ``add``; both end in the same ``mean``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class RunningWeightedSum:
    """Σ w·Δ and Σ w over the updates folded so far (float64 accumulators: order barely matters)."""

    def __init__(self, shapes: Sequence[tuple[int, ...]]) -> None:
        self._sums = [np.zeros(s, np.float64) for s in shapes]
        self.total_weight = 0.0
        self.num_updates = 0

    def _check_shapes(self, tensors: Sequence[np.ndarray]) -> None:
        """Refuse a mismatch before anything is folded, so a bad update never leaves a partial sum."""
        if len(tensors) != len(self._sums):
            raise ValueError(f"expected {len(self._sums)} tensors, got {len(tensors)}")
        for acc, t in zip(self._sums, tensors, strict=True):
            if acc.shape != np.shape(t):
                raise ValueError(f"shape {np.shape(t)} does not match {acc.shape}")

    def add(self, delta: Sequence[np.ndarray], weight: float) -> None:
        """Fold one client's delta with its weight (the caller has validated both)."""
        if not np.isfinite(weight) or weight < 0:
            raise ValueError(f"weight must be finite and non-negative, got {weight}")
        self._check_shapes(delta)
        w = np.float64(weight)
        for acc, d in zip(self._sums, delta, strict=True):
            acc += w * np.asarray(d)  # one float64 temporary per tensor, folded in place
        self.total_weight += float(weight)
        self.num_updates += 1

    def add_sum(self, weighted_sum: Sequence[np.ndarray], total_weight: float, *, count: int) -> None:
        """Fold an already weighted sum of ``count`` updates."""
        self._check_shapes(weighted_sum)
        for acc, s in zip(self._sums, weighted_sum, strict=True):
            acc += s
        self.total_weight += float(total_weight)
        self.num_updates += count

    def mean(self) -> list[np.ndarray] | None:
        """Σ w·Δ / Σ w as float32, or None when no weight was folded (the model must stay unchanged)."""
        if self.total_weight <= 0:
            return None
        return [(s / self.total_weight).astype(np.float32) for s in self._sums]
