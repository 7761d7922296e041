"""The FedRecon client step, written once for every transport.

For each client, with the server's global variables g (Singhal et al., 2021, Algorithm 1):

1. Initialise the local variables l afresh (clients keep no state between rounds).
2. Reconstruction: freeze g; run the reconstruction optimizer on l over the reconstruction batches
   (``recon_epochs`` passes, at most ``recon_steps_max`` steps).
3. Global update: freeze l (unless ``jointly_train_variables``); run the client optimizer on a copy of g over
   the post-reconstruction batches (``post_recon_epochs`` passes, at most ``post_recon_steps_max`` steps).
4. Report Δ = g' - g for the *global trainable* variables, a weight (post-reconstruction examples, or 1) and
   metrics. An update with a non-finite value is zeroed and given weight 0. Local variables are dropped.

Evaluation of an unseen user is steps 1-2 followed by metrics on the held-out batches.

``ClientStep`` runs these steps for C clients at once inside one TensorFlow graph (a ``tf.while_loop`` per
phase, all clients advancing in lock-step), so the simulator is fast; a device runs the very same graph
with C = 1 through ``client_update``. Gradients come from ``tf.GradientTape`` on the model's forward pass;
sparse gradients (``tf.IndexedSlices``) are applied as scatter updates.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

try:
    import tensorflow as tf
except ModuleNotFoundError as _missing:  # an app brings its own TensorFlow; say how to get one
    from fedrecon.core.lazy_tensorflow import MISSING_TENSORFLOW

    raise ModuleNotFoundError(MISSING_TENSORFLOW, name="tensorflow") from _missing

from fedrecon.core.batching import ClientExamples, PackedClients, pack_clients
from fedrecon.core.config import ClientWeighting, FedReconConfig
from fedrecon.core.model import ReconstructionModel
from fedrecon.core.objectives import MeanSquaredError


@dataclass(frozen=True)
class ClientUpdate:
    """What one client uploads. There is deliberately no field that could hold a local variable."""

    delta: list[np.ndarray]  # one per global *trainable* variable, in model order
    weight: float
    metrics: dict[str, float] = field(default_factory=dict)


class ViewDeltas:
    """A round's per-client deltas as the client step left them (per-client views, in TensorFlow), for the
    aggregation stages (``aggregation.ClientDeltas``): norms come from the graph, a weighted sum is one
    reduction in the graph, and dense per-client copies are made only for a buffering reducer."""

    def __init__(self, step: ClientStep, views: list[tf.Tensor], index: tf.Tensor, norms: np.ndarray) -> None:
        self._step = step
        self._views = views
        self._index = index
        self._norms = norms

    @property
    def num_clients(self) -> int:
        return len(self._norms)

    def norms(self) -> np.ndarray:
        return self._norms

    def weighted_sum(self, coefficients: np.ndarray) -> list[np.ndarray]:
        sums = self._step._reduce_fn(self._views, tf.constant(coefficients, tf.float32), self._index)
        return [s.numpy() for s in sums]

    def stacked(self) -> list[np.ndarray]:
        dense = self._step._expand_fn(self._views, self._index, tf.constant(self.num_clients))
        return [d.numpy() for d in dense]


class StagedClients:
    """A packed group's arrays as TensorFlow tensors, ready for the client step.

    Converting a numpy array to a tensor copies it; for a round of 100 clients that is about 1.5 MB and,
    measured, most of a millisecond. The simulator stages the next round's group on its packing thread
    while the current round trains, so the round itself starts at once (``Simulation``). The one place
    a group's arrays become tensors: unstaged groups are staged by the step's entry points."""

    def __init__(self, packed: PackedClients) -> None:
        self.packed = packed
        index = packed.views.index
        self.index = tf.convert_to_tensor(index) if index is not None else tf.zeros([0], tf.int32)
        self.locals = [tf.convert_to_tensor(v, tf.float32) for v in packed.locals]
        r, p = packed.reconstruction, packed.post_reconstruction
        self.reconstruction = [tf.convert_to_tensor(a) for a in (r.x, r.y, r.mask)]
        self.post_reconstruction = [tf.convert_to_tensor(a) for a in (p.x, p.y, p.mask)]


@dataclass(frozen=True)
class ClientGroupTraining:
    """A client step over many clients, before any reduction (what the simulator aggregates)."""

    deltas: ViewDeltas
    weights: np.ndarray  # [C] after the non-finite guard
    post_examples: np.ndarray  # [C] examples seen in the global update
    loss_sum: np.ndarray  # [C] Σ loss (squared error, token cross-entropy) before each post-recon step
    finite: np.ndarray  # [C] bool: the update was finite
    # [C] what loss_sum is a sum over (examples for ratings, non-padding tokens for text): the training
    # loss is loss_sum / loss_units, per unit as the evaluation's (EvaluationSums) is
    loss_units: np.ndarray


@dataclass(frozen=True)
class ClientGroupResult:
    """A client step over many clients: their deltas already reduced to a weighted sum."""

    weighted_delta_sum: list[np.ndarray]  # Σ_c w_c Δ_c per global trainable variable
    weights: np.ndarray  # [C] after the non-finite guard
    post_examples: np.ndarray  # [C] examples seen in the global update
    loss_sum: np.ndarray  # [C] Σ loss (squared error, token cross-entropy) before each post-recon step
    finite: np.ndarray  # [C] bool: the update was finite
    # [C] what loss_sum is a sum over (examples for ratings, non-padding tokens for text): the training
    # loss is loss_sum / loss_units, per unit as the evaluation's (EvaluationSums) is
    loss_units: np.ndarray


@dataclass(frozen=True)
class ClassSums:
    """Evaluation sums per class (``Objective.class_sums``: ``[K]`` arrays by name), over the users scored.

    For next-word prediction (``targets``, ``correct``, ``predicted``): per word, recall (correct /
    targets) and precision (correct / predicted), over the targets accuracy counts. For ratings
    (``count``, ``squared_error``, ``correct``): per true rating value, RMSE and accuracy."""

    objective: str
    sums: dict[str, np.ndarray]

    def __add__(self, other: ClassSums) -> ClassSums:
        if not any(len(v) for v in other.sums.values()):  # a chunk that scored nothing
            return self
        if not any(len(v) for v in self.sums.values()):
            return other
        return ClassSums(self.objective, {k: v + other.sums[k] for k, v in self.sums.items()})

    def rows(self, labels: Sequence[str] | None = None, *, top: int = 20) -> list[dict[str, Any]]:
        """The per-class figures as table rows: every rating value that occurs, or the ``top`` words
        most often targeted or predicted (a model that predicts one word everywhere shows it at once).
        ``labels`` names the classes (a text vocabulary's ``labels()``)."""
        s = self.sums
        if "squared_error" in s:
            return [{"rating": r, "count": int(n), "rmse": float(np.sqrt(s["squared_error"][r] / n)),
                     "accuracy": float(s["correct"][r] / n)}
                    for r, n in enumerate(s["count"]) if n > 0]
        targets, correct, predicted = s["targets"], s["correct"], s["predicted"]
        # most often targeted or predicted first; ties: targeted more, then predicted more, then by id
        order = np.lexsort((-predicted, -targets, -np.maximum(targets, predicted)))[:top]
        return [{"class": int(k), **({"label": labels[k]} if labels is not None else {}),
                 "targets": int(targets[k]), "predicted": int(predicted[k]),
                 "recall": float(correct[k] / targets[k]) if targets[k] else None,
                 "precision": float(correct[k] / predicted[k]) if predicted[k] else None}
                for k in order if targets[k] or predicted[k]]


@dataclass(frozen=True)
class EvaluationSums:
    """Example-weighted evaluation sums over a group of clients.

    For rating models (the MSE objective) ``squared_error`` is the loss sum and ``num_examples`` the
    examples scored. For other objectives ``loss_sum`` / ``loss_units`` give the loss (cross-entropy per
    non-padding token) and ``num_correct`` / ``num_examples`` the accuracy over the predictions the
    objective counts (next-word prediction: not padding, out-of-vocabulary or end of sentence);
    ``squared_error`` is then 0."""

    squared_error: float
    num_correct: float
    num_examples: float
    loss_sum: float | None = None  # None: the MSE objective, whose loss is squared_error / num_examples
    loss_units: float = 0.0
    # per class (simulation-side; a device reports totals only: per-word counts would reveal its words)
    per_class: ClassSums | None = None

    def __add__(self, other: EvaluationSums) -> EvaluationSums:
        loss_sum = (None if self.loss_sum is None and other.loss_sum is None
                    else (self.loss_sum or 0.0) + (other.loss_sum or 0.0))
        per_class = (other.per_class if self.per_class is None else self.per_class
                     if other.per_class is None else self.per_class + other.per_class)
        return EvaluationSums(self.squared_error + other.squared_error,
                              self.num_correct + other.num_correct,
                              self.num_examples + other.num_examples,
                              loss_sum, self.loss_units + other.loss_units, per_class)

    def metrics(self) -> dict[str, float]:
        """MSE, RMSE and rating accuracy (|y - ŷ| ≤ 0.5), weighted by examples over all users; for other
        objectives the mean loss per unit and the accuracy over counted predictions."""
        n = max(self.num_examples, 1.0)
        if self.loss_sum is not None:
            return {"loss": self.loss_sum / max(self.loss_units, 1.0), "accuracy": self.num_correct / n,
                    "num_examples": self.num_examples, "loss_units": self.loss_units}
        mse = self.squared_error / n
        return {"mse": mse, "rmse": float(np.sqrt(mse)), "accuracy": self.num_correct / n,
                "num_examples": self.num_examples}


def selection_value(metrics: dict[str, float]) -> float:
    """The validation figure a run keeps its best round by (lower is better): RMSE for rating models, the
    loss otherwise; a diverged (NaN) evaluation is never the best."""
    value = metrics["rmse"] if "rmse" in metrics else metrics["loss"]
    return value if np.isfinite(value) else float("inf")


def _sgd(value: tf.Tensor, grad: tf.Tensor | tf.IndexedSlices | None, lr: tf.Tensor) -> tf.Tensor:
    if grad is None:
        return value
    if isinstance(grad, tf.IndexedSlices):
        return tf.tensor_scatter_nd_sub(value, grad.indices[:, None], lr * grad.values)
    return value - lr * grad


def _rows(t: tf.Tensor) -> tf.Tensor:
    """``t`` as a matrix of its leading rows (works for zero rows, unlike a reshape to ``[n, -1]``)."""
    shape = tf.shape(t)
    return tf.reshape(t, tf.stack([shape[0], tf.reduce_prod(shape[1:])]))


def _per_client_where(ok: tf.Tensor, t: tf.Tensor, owner: tf.Tensor | None) -> tf.Tensor:
    """Client c's part of view ``t`` where ``ok[c]``, zeros elsewhere."""
    keep = ok if owner is None else tf.gather(ok, owner)
    rows = _rows(t)
    return tf.reshape(tf.where(keep[:, None], rows, tf.zeros_like(rows)), tf.shape(t))


def _per_client_squares(t: tf.Tensor, owner: tf.Tensor | None, num_clients: tf.Tensor) -> tf.Tensor:
    """[C] float64: Σ of squares of client c's part of view ``t`` (float64: a huge finite update must not
    overflow to Inf, so the sum is finite exactly when client c's part is)."""
    row_squares = tf.reduce_sum(tf.square(tf.cast(_rows(t), tf.float64)), axis=1)
    if owner is None:
        return row_squares
    return tf.math.unsorted_segment_sum(row_squares, owner, num_clients)


ALL = 99  # relax every dimension


def _relaxed(value: tf.Tensor, leading: int) -> tf.TensorSpec:
    rank = value.shape.rank
    n = min(leading, rank)
    return tf.TensorSpec([None] * n + value.shape.as_list()[n:], value.dtype)


class _TraceOnce:
    """A ``tf.function`` traced once for every client group size.

    Clients differ in examples, steps, distinct items and group size, so every call brings new shapes; a
    plain ``tf.function`` retraces on them (and TensorFlow warns about it). On the first call this takes the
    call's structure as the input signature with the dimensions that vary between calls left unknown: for
    each argument, ``leading[i]`` leading dimensions (steps, clients, batch slots, view rows), the rest kept
    (a model's own dimensions: a Keras model insists on them). One trace then serves every later call.
    Every argument must be a tensor or a list of tensors.

    Threads share it (many clients in one process, a server personalizing several requests): the first
    calls race to build the function, so building is under a lock; otherwise each racing thread would make
    and trace a function of its own (ten clients, ten traces, seconds each on a busy machine).

    Calls go to the one concrete function straight away, not through ``tf.function``'s dispatch, which
    binds and checks the call's nested arguments against the signature in Python on every call: measured
    on a 100-client MovieLens round, 0.7-1.4 ms of a 4-5 ms training call and 0.15 ms of a 1 ms reduction.
    An argument that does not fit the signature is refused by the concrete function as it would have been
    by ``tf.function`` (a fixed signature never retraces).
    """

    def __init__(self, fn: Any, leading: Sequence[int], *, xla: bool = False) -> None:
        self._python = fn
        self._leading = tuple(leading)
        self._xla = xla
        self._function: Any = None
        self._concrete: Any = None
        self._building = threading.Lock()

    def __call__(self, *args: Any) -> Any:
        concrete = self._concrete
        if concrete is None:
            with self._building:
                if self._concrete is None:
                    signature = [tf.nest.map_structure(lambda t, n=n: _relaxed(t, n), a)
                                 for a, n in zip(args, self._leading, strict=True)]
                    self._function = tf.function(self._python, input_signature=signature,
                                                 jit_compile=self._xla)
                    self._concrete = self._function.get_concrete_function()
                concrete = self._concrete
        return concrete(*args)

    def tracing_count(self) -> int:
        return 0 if self._function is None else int(self._function.experimental_get_tracing_count())


# Leading dimensions that vary per call: globals (fixed), view index, locals [C, ...], step batches
# [S, C, B, ...]; then the extra arguments (fixed).
_CLIENT_ARGS = (0, ALL, 1, 3, 3, 3, 3, 3, 3)


#: Compiled graphs by (model description, configuration): a process that builds many ``ClientStep``s for
#: the same task (a client per round, a personalization per request) traces once, not once per object.
_GRAPHS: dict[str, dict[str, _TraceOnce]] = {}


def _graph_key(model: ReconstructionModel, config: FedReconConfig, xla: bool) -> str | None:
    describe = getattr(model, "config", None)
    if not callable(describe):  # e.g. a Keras model: no description, so no sharing between objects
        return None
    return json.dumps([type(model).__qualname__, describe(), config.to_dict(), xla], sort_keys=True,
                      default=str)


class ClientStep:
    """Compiled FedRecon client work and evaluation for one model and one configuration.

    With ``xla`` the training graph (both phases' loops, for all clients of a round) is compiled by XLA
    into a few fused kernels instead of running op by op: the same graph, so the same results (within
    float rounding), at a fraction of the per-step dispatch cost. XLA compiles once per input shape, so it
    pays where shapes repeat: the simulator, whose rounds have the same client count and, with the step
    count padded to a multiple (``pack_clients(step_multiple=...)``), a bounded number of shapes. A device
    runs one client of a new shape per round and so keeps the op-by-op graph (``xla=False``); evaluation,
    whose chunks all differ in shape, keeps it too.
    """

    def __init__(self, model: ReconstructionModel, config: FedReconConfig, *, xla: bool = False) -> None:
        self.model = model
        self.config = config
        self.xla = xla
        self._recon_lr = float(config.reconstruction_optimizer.learning_rate)
        self._client_lr = float(config.client_optimizer.learning_rate)
        key = _graph_key(model, config, xla)
        graphs = _GRAPHS.get(key) if key is not None else None
        if graphs is None:
            graphs = {"train": _TraceOnce(self._train, _CLIENT_ARGS, xla=xla),
                      "train_reduced": _TraceOnce(self._train_reduced, (*_CLIENT_ARGS, 0)),
                      "reduce": _TraceOnce(model.reduce_views, (1, ALL, ALL), xla=xla),  # views [rows, ...]
                      "expand": _TraceOnce(model.expand_views, (1, ALL, 0)),
                      "evaluate": _TraceOnce(self._evaluate, (*_CLIENT_ARGS, 0, 0)),
                      "reconstruct": _TraceOnce(self._reconstruct_clients, _CLIENT_ARGS[:6])}
            if key is not None:  # a thread that built the same graphs first wins: one trace per process
                graphs = _GRAPHS.setdefault(key, graphs)
        self.graphs = graphs
        self._train_fn = graphs["train"]
        self._train_reduced_fn = graphs["train_reduced"]
        self._reduce_fn = graphs["reduce"]
        self._expand_fn = graphs["expand"]
        self._eval_fn = graphs["evaluate"]
        self._reconstruct_fn = graphs["reconstruct"]

    def tracing_count(self) -> int:
        """How many times this step's graphs were traced so far (one per graph used: any client size)."""
        return sum(g.tracing_count() for g in self.graphs.values())

    # ----- graph pieces --------------------------------------------------------------------------------
    def _run_phase(self, gviews: list[tf.Tensor], locals_: list[tf.Tensor], x: tf.Tensor, y: tf.Tensor,
                   mask: tf.Tensor, lr: float, train_globals: bool, train_locals: bool,
                   local_l2: float = 0.0
                   ) -> tuple[list[tf.Tensor], list[tf.Tensor], tf.Tensor, tf.Tensor]:
        """SGD over the step-major batches; returns new views, new locals, Σ loss per client (squared
        error for ratings, token cross-entropy for next-word prediction) and the units it sums over."""
        model = self.model
        g_idx = list(model.global_trainable) if train_globals else []
        l_idx = list(model.local_trainable) if train_locals else []
        num_clients = tf.shape(y)[1]
        se0 = tf.zeros([num_clients], tf.float32)
        if not g_idx and not l_idx:
            return gviews, locals_, se0, se0

        def body(s: tf.Tensor, gv: list[tf.Tensor], lv: list[tf.Tensor], se: tf.Tensor, units: tf.Tensor):
            xb, yb, mb = x[s], y[s], mask[s]
            with tf.GradientTape() as tape:
                watched = [gv[i] for i in g_idx] + [lv[i] for i in l_idx]
                tape.watch(watched)
                pred = model.predict(gv, lv, xb)
                loss = tf.reduce_sum(model.objective.loss(yb, pred, mb))
                if local_l2:
                    # Counted once per step that has data, like a per-batch regulariser in Keras.
                    has_data = tf.cast(tf.reduce_sum(mb, axis=1) > 0, tf.float32)
                    for i in l_idx:
                        norms = tf.reduce_sum(tf.reshape(tf.square(lv[i]), [num_clients, -1]), axis=1)
                        loss += local_l2 * tf.reduce_sum(has_data * norms)
            grads = tape.gradient(loss, watched)
            gv, lv = list(gv), list(lv)
            for k, i in enumerate(g_idx):
                gv[i] = _sgd(gv[i], grads[k], lr)
            for k, i in enumerate(l_idx):
                lv[i] = _sgd(lv[i], grads[len(g_idx) + k], lr)
            sums = model.objective.sums(yb, pred, mb)
            return s + 1, gv, lv, se + sums[0], units + sums[1]

        _, gviews, locals_, se, units = tf.while_loop(
            lambda s, *_: s < tf.shape(y)[0], body, (tf.constant(0), gviews, locals_, se0, se0))
        return gviews, locals_, se, units

    def _reconstruct(self, gviews: list[tf.Tensor], locals_: list[tf.Tensor], x: tf.Tensor, y: tf.Tensor,
                     mask: tf.Tensor) -> list[tf.Tensor]:
        """Step 2: train the fresh locals with the global views frozen."""
        _, locals_, _, _ = self._run_phase(gviews, list(locals_), x, y, mask, self._recon_lr,
                                        train_globals=False, train_locals=True,
                                        local_l2=self.config.reconstruction_l2)
        return locals_

    def _reconstruct_clients(self, globals_: list[tf.Tensor], view_index: tf.Tensor, locals_: list[tf.Tensor],
                             rx: tf.Tensor, ry: tf.Tensor, rm: tf.Tensor) -> list[tf.Tensor]:
        """Personalized inference: only step 2, from the globals (no training phase to follow)."""
        gviews = self.model.gather_views(globals_, view_index, tf.shape(ry)[1])
        return self._reconstruct(gviews, locals_, rx, ry, rm)

    def _train(self, globals_: list[tf.Tensor], view_index: tf.Tensor, locals_: list[tf.Tensor],
               rx: tf.Tensor, ry: tf.Tensor, rm: tf.Tensor, px: tf.Tensor, py: tf.Tensor, pm: tf.Tensor):
        model = self.model
        num_clients = tf.shape(py)[1]
        gviews = model.gather_views(globals_, view_index, num_clients)
        locals_ = self._reconstruct(gviews, locals_, rx, ry, rm)
        # Global update: locals frozen (or trained jointly), global views trained.
        new_views, _, se, units = self._run_phase(gviews, locals_, px, py, pm, self._client_lr,
                                                  train_globals=True,
                                                  train_locals=self.config.jointly_train_variables)
        deltas = [new_views[i] - gviews[i] for i in model.global_trainable]
        all_owners = model.view_owners(view_index)
        owners = [all_owners[i] for i in model.global_trainable]
        # Per-client Σ of squares over all tensors, in float64. A view holds each of a client's rows once
        # (padding rows never move), so its square root is the norm of the client's dense delta. The same
        # sum tells which updates are finite, with no pass of its own over the views: the square of a
        # finite float32 is at most 1.2e77 in float64, so a client's sum is finite exactly when every
        # value of its update is (Inf and NaN propagate, and squares cannot cancel).
        squares = tf.zeros([num_clients], tf.float64)
        for d, owner in zip(deltas, owners, strict=True):
            squares += _per_client_squares(d, owner, num_clients)
        finite = tf.math.is_finite(squares)
        deltas = [_per_client_where(finite, d, owner) for d, owner in zip(deltas, owners, strict=True)]
        examples = tf.reduce_sum(pm, axis=[0, 2])
        if self.config.client_weighting == ClientWeighting.NUM_EXAMPLES:
            weights = examples
        else:
            weights = tf.ones([num_clients], tf.float32)
        weights = tf.where(finite, weights, 0.0)
        return (deltas, tf.sqrt(tf.where(finite, squares, 0.0)), weights, examples, tf.where(finite, se, 0.0),
                tf.where(finite, units, 0.0), finite)

    def _train_reduced(self, globals_: list[tf.Tensor], view_index: tf.Tensor, locals_: list[tf.Tensor],
                       rx: tf.Tensor, ry: tf.Tensor, rm: tf.Tensor, px: tf.Tensor, py: tf.Tensor,
                       pm: tf.Tensor, weighted: tf.Tensor):
        """``_train`` and the reduction in one graph (one call: what a device's C = 1 step needs)."""
        views, _, weights, examples, se, units, finite = self._train(globals_, view_index, locals_, rx, ry,
                                                                     rm, px, py, pm)
        reduce_with = tf.where(weighted, weights, tf.cast(finite, tf.float32))
        return self.model.reduce_views(views, reduce_with, view_index), weights, examples, se, units, finite

    def _evaluate(self, globals_: list[tf.Tensor], view_index: tf.Tensor, locals_: list[tf.Tensor],
                  rx: tf.Tensor, ry: tf.Tensor, rm: tf.Tensor, ex: tf.Tensor, ey: tf.Tensor, em: tf.Tensor,
                  clip_min: tf.Tensor, clip_max: tf.Tensor):
        num_clients = tf.shape(ey)[1]
        gviews = self.model.gather_views(globals_, view_index, num_clients)
        locals_ = self._reconstruct(gviews, locals_, rx, ry, rm)
        pred = self.model.predict(gviews, locals_, ex[0])
        if isinstance(self.model.objective, MeanSquaredError):  # ratings may be clipped to their range
            pred = tf.clip_by_value(pred, clip_min, clip_max)
        objective = self.model.objective
        return (*objective.sums(ey[0], pred, em[0]), *objective.class_sums(ey[0], pred, em[0]))

    # ----- numpy entry points --------------------------------------------------------------------------
    def _common_args(self, globals_: Sequence[np.ndarray], packed: PackedClients | StagedClients) -> list:
        g = [tf.convert_to_tensor(v, tf.float32) for v in globals_]
        staged = packed if isinstance(packed, StagedClients) else StagedClients(packed)
        return [g, staged.index, staged.locals, *staged.reconstruction]

    def train_clients(self, globals_: Sequence[np.ndarray], packed: PackedClients | StagedClients
                      ) -> ClientGroupTraining:
        """Run steps 1-4 for a packed group of clients; per-client deltas stay unreduced for aggregation.
        A group staged ahead (``StagedClients``) skips converting its arrays here."""
        staged = packed if isinstance(packed, StagedClients) else StagedClients(packed)
        args = self._common_args(globals_, staged)
        views, norms, weights, examples, se, units, finite = self._train_fn(*args,
                                                                            *staged.post_reconstruction)
        return ClientGroupTraining(deltas=ViewDeltas(self, list(views), args[1], norms.numpy()),
                                   weights=weights.numpy(), post_examples=examples.numpy(),
                                   loss_sum=se.numpy(), finite=finite.numpy(), loss_units=units.numpy())

    def train(self, globals_: Sequence[np.ndarray], packed: PackedClients, *, weighted: bool = True
              ) -> ClientGroupResult:
        """Run steps 1-4 for a packed group of clients; deltas come back as one sum, weighted by the
        clients' weights (or, ``weighted=False``, each finite update counting 1: a device's own Δ)."""
        staged = StagedClients(packed)
        sums, weights, examples, se, units, finite = self._train_reduced_fn(
            *self._common_args(globals_, staged), *staged.post_reconstruction, tf.constant(weighted))
        return ClientGroupResult(weighted_delta_sum=[s.numpy() for s in sums], weights=weights.numpy(),
                                 post_examples=examples.numpy(), loss_sum=se.numpy(), finite=finite.numpy(),
                                 loss_units=units.numpy())

    def evaluate(self, globals_: Sequence[np.ndarray], packed: PackedClients,
                 clip: tuple[float, float] | None = None) -> EvaluationSums:
        """Reconstruct each client's locals, then score its held-out batches."""
        (loss, units, correct, count), per_class = self._evaluate_sums(globals_, packed, clip)
        objective = self.model.objective
        classes = ClassSums(objective.name, dict(zip(objective.class_names, per_class, strict=True)))
        if isinstance(objective, MeanSquaredError):
            return EvaluationSums(float(loss.sum()), float(correct.sum()), float(count.sum()),
                                  per_class=classes)
        return EvaluationSums(0.0, float(correct.sum()), float(count.sum()), loss_sum=float(loss.sum()),
                              loss_units=float(units.sum()), per_class=classes)

    def evaluate_each(self, globals_: Sequence[np.ndarray], packed: PackedClients,
                      clip: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``evaluate`` per client: [C] loss sums (squared error for ratings), correct counts and counted
        predictions (who gains or pays under a change, e.g. users with few ratings against many)."""
        (loss, _, correct, count), _ = self._evaluate_sums(globals_, packed, clip)
        return loss, correct, count

    def _evaluate_sums(self, globals_: Sequence[np.ndarray], packed: PackedClients,
                       clip: tuple[float, float] | None
                       ) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
        """([C] loss sums, loss units, correct, counted), (per-class sums, ``objective.class_names``)."""
        p = packed.post_reconstruction
        if p.num_steps == 0:
            return (tuple(np.zeros(p.mask.shape[1], np.float64) for _ in range(4)),
                    tuple(np.zeros(0, np.float64) for _ in self.model.objective.class_names))
        lo, hi = clip if clip is not None else (-np.inf, np.inf)
        staged = StagedClients(packed)
        sums = self._eval_fn(*self._common_args(globals_, staged), *staged.post_reconstruction,
                             tf.constant(lo, tf.float32), tf.constant(hi, tf.float32))
        arrays = tuple(t.numpy().astype(np.float64) for t in sums)
        return arrays[:4], arrays[4:]

    def reconstruct(self, globals_: Sequence[np.ndarray], examples: ClientExamples, *, batch_size: int,
                    rng: np.random.Generator, use_all_batches: bool = True) -> list[np.ndarray]:
        """Local variables of one user reconstructed from its examples (personalized inference).

        For serving, every batch reconstructs (``use_all_batches``): there is nothing to hold out.
        """
        config = self.config.replace(split_dataset=False) if use_all_batches else self.config
        packed = pack_clients(self.model, [examples], config, batch_size=batch_size, local_rngs=[rng],
                              evaluation=True)
        # Traced once (``_TraceOnce``), like training: run eagerly, the loop body of a Keras model would be
        # re-traced at every step (seconds per user instead of milliseconds).
        locals_ = self._reconstruct_fn(*self._common_args(globals_, packed))
        return [v.numpy()[0] for v in locals_]


def client_update(step: ClientStep, globals_: Sequence[np.ndarray], examples: ClientExamples, *,
                  batch_size: int, rng: np.random.Generator,
                  order_rng: np.random.Generator | None = None) -> ClientUpdate:
    """One device's FedRecon work: the same graph as the simulator, with one client.

    ``rng`` draws the fresh local variables. When the task shuffles (``shuffle_each_round``) ``order_rng``
    draws this round's order of the examples; absent, a generator of fresh entropy does, so each round a
    device trains on a new order (a simulation passes one seeded by (seed, round, user) to match the
    in-process run)."""
    if step.config.shuffle_each_round and order_rng is None:
        order_rng = np.random.default_rng()
    packed = pack_clients(step.model, [examples], step.config, batch_size=batch_size, local_rngs=[rng],
                          order_rngs=None if order_rng is None else [order_rng])
    result = step.train(globals_, packed, weighted=False)
    examples_seen = float(result.post_examples[0])
    metrics = {"post_recon_examples": examples_seen,
               # per unit (example; token for text), as evaluation reports it
               "loss": float(result.loss_sum[0]) / max(float(result.loss_units[0]), 1.0),
               "finite": float(result.finite[0])}
    return ClientUpdate(delta=result.weighted_delta_sum, weight=float(result.weights[0]), metrics=metrics)
