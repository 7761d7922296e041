"""Packing the examples of a group of clients into step-major, padded arrays.

The client step runs many clients in lock-step: at step ``s`` every client processes the ``s``-th batch of
its own schedule. Clients differ in how many examples and steps they have, so batches are padded to a
common size and carry a mask; a padded example has mask 0 and contributes neither loss nor gradient, and a
client that has run out of steps sees an all-zero mask (an exact no-op under SGD).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedrecon.core.config import FedReconConfig
from fedrecon.core.data_split import build_batch_schedule
from fedrecon.core.model import ClientViews, ReconstructionModel


@dataclass(frozen=True)
class ClientExamples:
    """One client's examples in a fixed order: features ``x`` (``[n, ...]``) and targets ``y`` (``[n]``, or
    ``[n, T]`` for sequences: e.g. the next token at every position, padding marked by the objective's pad
    id)."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} examples but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)


def shuffled(examples: ClientExamples, rng: np.random.Generator) -> ClientExamples:
    """``examples`` in an order drawn from ``rng`` (``FedReconConfig.shuffle_each_round``)."""
    order = rng.permutation(len(examples))
    return ClientExamples(x=examples.x[order], y=examples.y[order])


@dataclass(frozen=True)
class StepBatches:
    """Padded batches, step-major: ``x`` ``[S, C, B, ...]``, ``y`` ``[S, C, B, ...]`` and ``mask``
    ``[S, C, B]`` (one flag per example; padding *inside* a sequence is the objective's business)."""

    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class PackedClients:
    """Everything a client step needs for a group of clients, as numpy arrays."""

    views: ClientViews
    locals: list[np.ndarray]  # each [C, *shape]: freshly initialised local variables
    reconstruction: StepBatches
    post_reconstruction: StepBatches


def _pack_steps(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], schedules: Sequence[Sequence[int]],
                batch_size: int, step_multiple: int = 1, step_cap: int | None = None) -> StepBatches:
    """Step-major padded batches: client c's step s holds batch ``schedules[c][s]`` of its examples.

    ``step_multiple`` pads the step count up to a multiple (all-masked steps are exact no-ops), but never
    past ``step_cap`` (the most steps any schedule can have): at most one more shape, no wasted steps."""
    return _pack_joined(_Joined.of(xs, ys), schedules, batch_size, step_multiple, step_cap)


@dataclass(frozen=True)
class _Joined:
    """A group's examples end to end: every client's features in one array, targets in another, and how
    many each client has (so both phases of a pack gather from one copy)."""

    x: np.ndarray
    y: np.ndarray
    sizes: np.ndarray  # [C] examples per client

    @classmethod
    def of(cls, xs: Sequence[np.ndarray], ys: Sequence[np.ndarray]) -> _Joined:
        if not len(xs):
            return cls(np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.int64))
        dtype = xs[0].dtype
        return cls(np.concatenate([np.asarray(cx, dtype) for cx in xs]),
                   np.concatenate([np.asarray(cy, np.float32) for cy in ys]),
                   np.fromiter(map(len, ys), np.int64, len(ys)))


def _pack_joined(joined: _Joined, schedules: Sequence[Sequence[int]], batch_size: int,
                 step_multiple: int = 1, step_cap: int | None = None) -> StepBatches:
    """``_pack_steps`` from examples already joined: all clients are packed with one gather over their
    concatenated examples (no loop per client)."""
    num_clients = len(joined.sizes)
    steps_per_client = np.fromiter(map(len, schedules), np.int64, len(schedules))
    num_steps = int(steps_per_client.max(initial=0))
    padded = -(-num_steps // step_multiple) * step_multiple
    if step_cap is not None:
        padded = max(min(padded, step_cap), num_steps)
    feature_shape, target_shape = joined.x.shape[1:], joined.y.shape[1:]
    sizes = joined.sizes
    starts = np.cumsum(sizes) - sizes
    # Padding repeats one of the client's own features: a padded slot then reads only this client's view,
    # so a client whose values went non-finite cannot leak NaN (NaN·0) into another's rows.
    has_data = sizes > 0
    first = np.zeros((num_clients, *feature_shape), joined.x.dtype)
    first[has_data] = joined.x[starts[has_data]]
    x = np.empty((padded, num_clients, batch_size, *feature_shape), joined.x.dtype)
    x[...] = first[None, :, None]
    y = np.zeros((padded, num_clients, batch_size, *target_shape), np.float32)
    mask = np.zeros((padded, num_clients, batch_size), np.float32)
    total = int(steps_per_client.sum())
    if not total:
        return StepBatches(x=x, y=y, mask=mask)
    client = np.repeat(np.arange(num_clients), steps_per_client)  # one entry per (client, step)
    step = np.arange(total) - np.repeat(np.cumsum(steps_per_client) - steps_per_client, steps_per_client)
    batch = np.fromiter(itertools.chain.from_iterable(schedules), np.int64, total)
    within = batch[:, None] * batch_size + np.arange(batch_size)  # [P, B] positions in the client's data
    client_size = sizes[client][:, None]
    valid = within < client_size
    flat = starts[client][:, None] + np.minimum(within, client_size - 1)
    slot = step * num_clients + client  # the (step, client) entry, with steps and clients flattened
    x.reshape(padded * num_clients, batch_size, *feature_shape)[slot] = joined.x[flat]
    y.reshape(padded * num_clients, batch_size, *target_shape)[slot] = np.where(
        valid.reshape(valid.shape + (1,) * len(target_shape)), joined.y[flat], 0.0)
    mask.reshape(padded * num_clients, batch_size)[slot] = valid
    return StepBatches(x=x, y=y, mask=mask)


def pack_clients(
    model: ReconstructionModel,
    clients: Sequence[ClientExamples],
    config: FedReconConfig,
    *,
    batch_size: int,
    local_rngs: Sequence[np.random.Generator],
    order_rngs: Sequence[np.random.Generator] | None = None,
    evaluation: bool = False,
    step_multiple: int = 1,
    bucket_rows: bool = False,
) -> PackedClients:
    """Views, fresh locals and padded step batches for ``clients`` under ``config``'s batch schedule.

    With ``evaluation=True`` the reconstruction phase uses the evaluation reconstruction settings and the
    second phase visits the evaluation batches once, in one padded batch per client (nothing is trained
    there, so the step order does not matter).

    ``step_multiple`` pads each phase's step count up to a multiple with all-masked steps (exact no-ops):
    fewer distinct shapes for a compiler that specialises on them (``ClientStep(xla=True)``);
    ``bucket_rows`` does the same for the model's views (``ReconstructionModel.build_views``).

    With ``config.shuffle_each_round`` a training pack first puts each client's examples in an order drawn
    from its ``order_rngs`` generator: the one place data order is decided, for the simulator (generators
    seeded by seed, round and user) and a device (fresh entropy, ``client_update``). They must be given
    then, so that no caller shuffles from an unseeded generator by accident. An evaluation pack never
    shuffles (held-out batches stay fixed).
    """
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    if len(local_rngs) != len(clients):
        raise ValueError("one random generator per client is required")
    if config.shuffle_each_round and not evaluation:
        if order_rngs is None or len(order_rngs) != len(clients):
            raise ValueError("shuffle_each_round: one order generator per client is required (order_rngs)")
        clients = [shuffled(c, rng) for c, rng in zip(clients, order_rngs, strict=True)]
    views = model.build_views([c.x for c in clients], bucket_rows=bucket_rows)
    ys = [np.asarray(c.y, np.float32) for c in clients]
    recon_epochs = config.recon_epochs
    recon_cap = config.recon_steps_max
    if evaluation:
        recon_epochs = config.eval_recon_epochs if config.eval_recon_epochs is not None else recon_epochs
        recon_cap = config.eval_recon_steps_max if config.eval_recon_steps_max is not None else recon_cap
    recon_schedules, post_schedules = [], []
    for client in clients:
        schedule = build_batch_schedule(
            -(-len(client) // batch_size),
            split_dataset=config.split_dataset,
            recon_epochs=recon_epochs if model.local_variables else 0,
            recon_steps_max=recon_cap,
            post_recon_epochs=1 if evaluation else config.post_recon_epochs,
            post_recon_steps_max=None if evaluation else config.post_recon_steps_max,
        )
        recon_schedules.append(schedule.reconstruction)
        post_schedules.append(schedule.post_reconstruction)
    joined = _Joined.of(views.x, ys)
    reconstruction = _pack_joined(joined, recon_schedules, batch_size, step_multiple, recon_cap)
    if evaluation:
        # One wide batch per client holding all its evaluation batches.
        widths = [len(s) * batch_size for s in post_schedules]
        wide = max(widths, default=0) or batch_size
        flat = [tuple(range(len(s))) for s in post_schedules]
        eval_x, eval_y = [], []
        for cx, cy, steps in zip(views.x, ys, post_schedules, strict=True):
            idx = (np.asarray(steps, np.int64)[:, None] * batch_size + np.arange(batch_size)).reshape(-1)
            idx = idx[idx < len(cy)]
            eval_x.append(cx[idx])
            eval_y.append(cy[idx])
        post = _pack_steps(eval_x, eval_y, [(0,) if len(f) else () for f in flat], wide)
    else:
        post = _pack_joined(joined, post_schedules, batch_size, step_multiple, config.post_recon_steps_max)
    per_client = [model.initial_locals(rng) for rng in local_rngs]
    locals_ = [
        np.stack([p[i] for p in per_client]) if per_client else np.zeros((0, *spec.shape), np.float32)
        for i, spec in enumerate(model.local_variables)
    ]
    return PackedClients(views=views, locals=locals_, reconstruction=reconstruction,
                         post_reconstruction=post)
