"""Which of a client's batches reconstruct, which train, and in what order.

FedRecon's client step reads a client's (already batched) data twice: once to reconstruct the local
variables and once to update the global ones. The reference split (``split_dataset=True``) gives even-indexed
batches to reconstruction and odd-indexed batches to the global update or to evaluation, so the two phases
never see the same example; without the split both phases read every batch. Each phase repeats its batches
for a number of epochs and stops at a step cap. This module is that rule, written once as plain integers so
the simulator, the device and the tests agree on it exactly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchSchedule:
    """Batch indices (into the client's batch list) that each phase visits, in order."""

    reconstruction: tuple[int, ...]
    post_reconstruction: tuple[int, ...]


def _repeat_capped(batches: list[int], epochs: int, steps_max: int | None) -> tuple[int, ...]:
    steps = batches * epochs
    if steps_max is not None:
        steps = steps[:steps_max]
    return tuple(steps)


# A round packs a hundred clients and most share a batch count with a client seen before: the schedule
# (immutable) is computed once per (batch count, settings).
@functools.lru_cache(maxsize=4096)
def build_batch_schedule(
    num_batches: int,
    *,
    split_dataset: bool,
    recon_epochs: int,
    recon_steps_max: int | None,
    post_recon_epochs: int,
    post_recon_steps_max: int | None,
) -> BatchSchedule:
    """The reconstruction and post-reconstruction batch order of a client with ``num_batches`` batches."""
    if num_batches < 0:
        raise ValueError("num_batches must be non-negative")
    all_batches = list(range(num_batches))
    if split_dataset:
        recon_batches, post_batches = all_batches[0::2], all_batches[1::2]
    else:
        recon_batches = post_batches = all_batches
    return BatchSchedule(
        reconstruction=_repeat_capped(recon_batches, recon_epochs, recon_steps_max),
        post_reconstruction=_repeat_capped(post_batches, post_recon_epochs, post_recon_steps_max),
    )


def has_held_out_batch(num_examples: int, *, batch_size: int, split_dataset: bool) -> bool:
    """Whether a user with ``num_examples`` examples has a batch to train on or be scored on after
    reconstruction: with the split, a user needs a second batch (more than ``batch_size`` examples)."""
    num_batches = -(-num_examples // batch_size)
    return num_batches >= (2 if split_dataset else 1)
