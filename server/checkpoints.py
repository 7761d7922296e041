"""Model versions as bytes for the store: global variables by name, and the server optimizer's state.

Both go through ``fedrecon.tensors`` (``.npz`` without pickle), the same module that puts tensors on the
wire, so what the store holds, what ``fedrecon export`` writes and what clients download agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedrecon.core.optimizers import OptimizerState
from fedrecon.tensors import arrays_from_bytes, arrays_to_bytes


def globals_to_bytes(names: Sequence[str], arrays: Sequence[np.ndarray]) -> bytes:
    return arrays_to_bytes(dict(zip(names, arrays, strict=True)))


def globals_from_bytes(data: bytes, names: Sequence[str]) -> list[np.ndarray]:
    """The arrays in ``names`` order; a stored version missing one of them is an error."""
    named, _ = arrays_from_bytes(data)
    missing = [n for n in names if n not in named]
    if missing:
        raise ValueError(f"stored model lacks variables {missing}")
    return [named[n] for n in names]


def optimizer_state_to_bytes(state: OptimizerState, *, clip_bound: float | None = None) -> bytes:
    """The server's state besides the model: the optimizer's slots and step, and where adaptive clipping
    moved the norm bound (``clip_bound``; absent for a fixed bound, and in versions written before it)."""
    named = {f"{slot}/{i}": a for slot, arrays in state.slots.items() for i, a in enumerate(arrays)}
    counts = {k: len(v) for k, v in state.slots.items()}
    meta: dict[str, object] = {"step": state.step, "slots": counts}
    if clip_bound is not None:
        meta["clip_bound"] = float(clip_bound)
    return arrays_to_bytes(named, meta=meta)


def optimizer_state_from_bytes(data: bytes) -> OptimizerState:
    named, meta = arrays_from_bytes(data)
    slots = {slot: [named[f"{slot}/{i}"] for i in range(count)] for slot, count in meta["slots"].items()}
    return OptimizerState(step=int(meta["step"]), slots=slots)


def clip_bound_from_bytes(data: bytes) -> float | None:
    """The adaptive clip bound stored with a version's optimizer state (None: a fixed bound)."""
    _, meta = arrays_from_bytes(data)
    bound = meta.get("clip_bound")
    return float(bound) if bound is not None else None
