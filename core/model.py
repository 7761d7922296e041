"""The reconstruction model: a forward pass over four disjoint variable groups.

A FedRecon model owns the split of its parameters into *global* variables (held by the server, sent to
clients, averaged) and *local* variables (created fresh on the device each round, never sent anywhere),
each either trainable or not. That gives four disjoint groups, as in TensorFlow Federated's
``ReconstructionModel``.

The engine runs many clients at once, so every method works on a leading *client axis*: a round with C
clients passes local variables of shape ``[C, *shape]`` and batches of shape ``[C, B, ...]``. A client on a
device is simply C = 1. Global variables reach the forward pass through a per-client *view*: by default the
global tensor tiled C times (each client trains its own copy); models with large sparse tables (the item
embeddings of matrix factorization) override the view to hold only the rows a client touches, which is what
makes the simulator fast without a second implementation of the client step.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedrecon.core.lazy_tensorflow import tf
from fedrecon.core.objectives import MSE, Objective


@dataclass(frozen=True)
class VariableSpec:
    """Name, shape and role of one model variable (the wire and the store use the name)."""

    name: str
    shape: tuple[int, ...]
    trainable: bool = True
    dtype: str = "float32"


@dataclass(frozen=True)
class ClientViews:
    """What a round's clients need to map between global variables and their per-client views.

    ``index`` is model-specific (for matrix factorization: the global item rows of each client's view);
    ``x`` holds each client's examples with features remapped into view coordinates.
    """

    num_clients: int
    index: Any
    x: list[np.ndarray]


class ReconstructionModel(abc.ABC):
    """Base class: declares the variable groups, initialisers and a client-batched forward pass."""

    #: Global variables in wire order (trainable and non-trainable).
    global_variables: tuple[VariableSpec, ...] = ()
    #: Local variables (never leave the device, never appear in an upload).
    local_variables: tuple[VariableSpec, ...] = ()
    #: What the client step minimises and how evaluation scores (``objectives``); rating models: MSE.
    objective: Objective = MSE

    # ----- variable groups -------------------------------------------------------------------------
    @property
    def global_trainable(self) -> tuple[int, ...]:
        return tuple(i for i, v in enumerate(self.global_variables) if v.trainable)

    @property
    def global_non_trainable(self) -> tuple[int, ...]:
        return tuple(i for i, v in enumerate(self.global_variables) if not v.trainable)

    @property
    def local_trainable(self) -> tuple[int, ...]:
        return tuple(i for i, v in enumerate(self.local_variables) if v.trainable)

    @property
    def local_non_trainable(self) -> tuple[int, ...]:
        return tuple(i for i, v in enumerate(self.local_variables) if not v.trainable)

    def check_globals(self, arrays: Sequence[np.ndarray], owner: str) -> None:
        """Refuse given global variables (an exported or TFF-trained model) ``owner`` cannot use."""
        want = [tuple(v.shape) for v in self.global_variables]
        got = [tuple(np.shape(a)) for a in arrays]
        if got != want:
            raise ValueError(f"the initial model has shapes {got}; {owner} needs {want}")

    # ----- initialisation --------------------------------------------------------------------------
    @abc.abstractmethod
    def initial_globals(self, seed: int) -> list[np.ndarray]:
        """Fresh global variables (the server's round-0 model)."""

    @abc.abstractmethod
    def initial_locals(self, rng: np.random.Generator) -> list[np.ndarray]:
        """Fresh local variables for one client (no leading client axis)."""

    # ----- per-client views of the globals ---------------------------------------------------------
    def build_views(self, client_x: Sequence[np.ndarray], *, bucket_rows: bool = False) -> ClientViews:
        """Default: every client sees the whole global model; features are used as they are.

        ``bucket_rows``: a model whose views have a data-dependent number of rows pads it up to one of a
        bounded set of sizes with rows no example reads (for a compiler that specialises on shapes)."""
        return ClientViews(num_clients=len(client_x), index=None, x=list(client_x))

    def view_owners(self, views_index: Any) -> list[tf.Tensor | None]:
        """For each global variable's view, the client that owns each of its leading rows, or None where
        the view is client-major (``[C, *shape]``, the default). The client step needs it for what it
        does per client on a view (the non-finite guard, update norms)."""
        return [None] * len(self.global_variables)

    def gather_views(self, globals_: Sequence[tf.Tensor], views_index: Any, num_clients: tf.Tensor
                     ) -> list[tf.Tensor]:
        """Per-client copies of the global variables (leading client axis)."""
        return [tf.repeat(g[None], num_clients, axis=0) for g in globals_]

    def reduce_views(self, view_deltas: Sequence[tf.Tensor], weights: tf.Tensor, views_index: Any,
                     ) -> list[tf.Tensor]:
        """Weighted sum over clients of per-client deltas, mapped back to global shapes."""
        return [tf.tensordot(weights, d, axes=1) for d in view_deltas]

    def expand_views(self, view_deltas: Sequence[tf.Tensor], views_index: Any, num_clients: tf.Tensor
                     ) -> list[tf.Tensor]:
        """Per-client deltas in the global shapes, ``[C, *shape]`` (default views already are)."""
        return list(view_deltas)

    # ----- forward pass ----------------------------------------------------------------------------
    @abc.abstractmethod
    def predict(self, global_views: Sequence[tf.Tensor], locals_: Sequence[tf.Tensor], x: tf.Tensor
                ) -> tf.Tensor:
        """Predictions ``[C, B, ...]`` (``[C, B]`` for ratings, logits ``[C, B, T, V]`` for next-word
        prediction) for a client-batched input ``x`` of shape ``[C, B, ...]``."""


def masked_squared_error(y: tf.Tensor, pred: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Per-client mean squared error over the valid examples of a padded batch, shape ``[C]``.

    A batch padded to a common size must give the same loss (and gradient) as the unpadded batch, so the
    mean divides by the number of real examples, not by the padded batch size.
    """
    se = tf.square(pred - y) * mask
    count = tf.reduce_sum(mask, axis=1)
    return tf.reduce_sum(se, axis=1) / tf.maximum(count, 1.0)


def uniform_init(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """Uniform(-scale, scale) float32 draw (the reference initialiser for embeddings)."""
    return rng.uniform(-scale, scale, size=shape).astype(np.float32)
