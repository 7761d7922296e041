"""fedrecon tasks in TensorFlow Federated: the Keras model, weight conversion, processes and model files.

This module runs only in the TFF environment (``make tff-env``: TensorFlow 2.14, TFF 0.87) and imports nothing
from fedrecon, whose own environment cannot hold TFF. The TFF worker (``tff_worker.py``) uses it, and so can
anyone with TFF code of their own, with this folder on the path:

    PYTHONPATH=tff .venv-tff/bin/python
    >>> import tff_interop
    >>> weights, spec, training = tff_interop.read_model_file("model.npz")   # fedrecon export / simulate
    >>> process, evaluator = tff_interop.build_processes(spec, training)
    >>> state = process.set_model_weights(process.initialize(), weights)
    ...
    >>> tff_interop.write_model_file("trained.npz", process.get_model_weights(state), spec, training)

``write_model_file`` writes the format of fedrecon's ``fedrecon/model_file.py`` (``fedrecon.model/2``), which
``fedrecon serve --init-model``, ``simulate --init-model`` and the client library load; a test reads what this
side writes with fedrecon's own reader.

Two kinds of task. Matrix factorization: the Keras model here mirrors ``core.matrix_factorization``: item
factors (and item bias, global offset) in global layers; the user's factors (and bias) in a local layer.
A Keras task (``kind = "keras"``, e.g. ``core.nextword``): its Keras 3 description is rebuilt in tf.keras 2
by ``keras_bridge``, which refuses what it cannot build exactly; its local variables' start must be given
(``build_processes(..., local_start={name: value})``), as TFF starts every client from one value.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import keras_bridge
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

MODEL_FILE_FORMAT = "fedrecon.model/2"  # fedrecon/model_file.py
READABLE_MODEL_FILE_FORMATS = ("fedrecon.model/1", MODEL_FILE_FORMAT)
META_KEY = "__meta__"  # fedrecon/tensors.py

INIT_SCALE = 0.05


def _local_initializer(kind: str, start: list[float] | None) -> tf.keras.initializers.Initializer:
    """TFF evaluates this once, when it builds the client computation: every client starts from that value.

    ``start`` is fedrecon's shared start (``local_init="shared"``), so both engines begin from the same
    vector; without it, a ``shared`` start is TFF's own ±0.05 draw.
    """
    if kind == "zeros":
        return tf.keras.initializers.Zeros()
    if kind == "shared":
        if start is not None:
            return tf.keras.initializers.Constant(np.asarray(start, np.float32))
        return tf.keras.initializers.RandomUniform(-INIT_SCALE, INIT_SCALE)
    raise ValueError(f"TFF cannot run local_init {kind!r} (it draws the local start once for all clients): "
                     "use 'shared' or 'zeros'")


class LocalUser(tf.keras.layers.Layer):
    """The user's factors (and bias): TFF gives every client the initial value afresh."""

    def __init__(self, num_factors: int, use_bias: bool, initializer: str, start: list[float] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        init = _local_initializer(initializer, start)
        self.factors = self.add_weight(name="user_embedding", shape=(num_factors,), initializer=init)
        self.bias = self.add_weight(name="user_bias", shape=(), initializer="zeros") if use_bias else None


class GlobalOffset(tf.keras.layers.Layer):
    """The global rating offset μ (a scalar, like fedrecon's ``global_bias``)."""

    def __init__(self, value: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.value = self.add_weight(name="global_bias", shape=(),
                                     initializer=tf.keras.initializers.Constant(value))


class MatrixFactorization(tf.keras.Model):
    """ŷ = q_i · p_u [+ b_i + b_u + μ]; predictions and labels are ``[B, 1]`` (per-example metrics)."""

    def __init__(self, spec: dict[str, Any], local_start: list[float] | None = None) -> None:
        super().__init__()
        num_items, factors = int(spec["num_items"]), int(spec["num_factors"])
        self.use_biases = bool(spec.get("use_biases", False))
        uniform = tf.keras.initializers.RandomUniform(-INIT_SCALE, INIT_SCALE)
        self.items = tf.keras.layers.Embedding(num_items, factors, embeddings_initializer=uniform,
                                               name="item_embedding")
        self.user = LocalUser(factors, self.use_biases, spec.get("local_init", "shared"), local_start,
                              name="user")
        self.global_layers: list[tf.keras.layers.Layer] = [self.items]
        if self.use_biases:
            self.item_bias = tf.keras.layers.Embedding(num_items, 1, embeddings_initializer="zeros",
                                                       name="item_bias")
            self.offset = GlobalOffset(float(spec.get("initial_offset", 0.0)), name="global_bias")
            self.global_layers += [self.item_bias, self.offset]

    def call(self, item_ids: tf.Tensor) -> tf.Tensor:
        pred = tf.reduce_sum(self.items(item_ids) * self.user.factors[None, :], axis=1, keepdims=True)
        if self.use_biases:
            pred += self.item_bias(item_ids) + self.user.bias + self.offset.value
        return pred


# ----- weight conversion: fedrecon's global variables <-> TFF ModelWeights ---------------------------------
def is_keras(spec: dict[str, Any]) -> bool:
    """A Keras task (``core.keras_spec``, rebuilt by ``keras_bridge``) rather than matrix factorization."""
    return spec.get("kind") == "keras"


def _global_table(spec: dict[str, Any]) -> list[tuple[str, tuple[int, ...], bool]]:
    """fedrecon's global variables in its order: (name, shape TFF holds it in, trainable)."""
    if is_keras(spec):
        return [(str(v["name"]), tuple(int(d) for d in v["shape"]), bool(v.get("trainable", True)))
                for v in spec["variables"] if not v.get("local")]
    items, factors = int(spec["num_items"]), int(spec["num_factors"])
    table = [("item_embedding", (items, factors), True)]
    if spec.get("use_biases", False):  # TFF keeps the item bias as a [items, 1] embedding; fedrecon [items]
        table += [("item_bias", (items, 1), True), ("global_bias", (), True)]
    return table


def global_names(spec: dict[str, Any]) -> list[str]:
    """fedrecon's global variable names, in its order (``core.matrix_factorization``, or a Keras task's
    variable table)."""
    return [name for name, _, _ in _global_table(spec)]


def to_model_weights(arrays: dict[str, np.ndarray], spec: dict[str, Any]) -> tff.learning.models.ModelWeights:
    """A fedrecon model (arrays by name) as the ``ModelWeights`` of this reconstruction model's globals:
    trainable and non-trainable, each in fedrecon's order (the order the TFF model lists them in)."""
    trainable, non_trainable = [], []
    for name, shape, is_trainable in _global_table(spec):
        if name not in arrays:
            raise ValueError(f"the model has no variable {name!r} (has {sorted(arrays)})")
        value = np.asarray(arrays[name], np.float32)
        if value.size != math.prod(shape):
            raise ValueError(f"{name} has shape {value.shape}; this model needs {shape}")
        (trainable if is_trainable else non_trainable).append(value.reshape(shape))
    return tff.learning.models.ModelWeights(trainable=trainable, non_trainable=non_trainable)


def from_model_weights(weights: tff.learning.models.ModelWeights, spec: dict[str, Any]
                       ) -> dict[str, np.ndarray]:
    """TFF's global ``ModelWeights`` back in fedrecon's names and shapes."""
    table = _global_table(spec)
    values = iter(list(weights.trainable))
    fixed = iter(list(weights.non_trainable))
    out = {}
    for name, _, is_trainable in table:
        value = np.asarray(next(values) if is_trainable else next(fixed), np.float32)
        out[name] = value.reshape(-1) if name == "item_bias" and not is_keras(spec) else value
    if next(values, None) is not None or next(fixed, None) is not None:
        raise ValueError("TFF's weights hold more variables than the task's globals")
    return out


# ----- the TFF processes ---------------------------------------------------------------------------------
def _optimizer(spec: dict[str, Any]) -> tff.learning.optimizers.Optimizer:
    name, lr = spec["name"], float(spec["learning_rate"])
    eps = spec.get("epsilon")
    if name == "sgd":
        return tff.learning.optimizers.build_sgdm(learning_rate=lr)
    if name == "momentum":
        return tff.learning.optimizers.build_sgdm(learning_rate=lr, momentum=float(spec["momentum"]))
    if name == "adam":
        return tff.learning.optimizers.build_adam(lr, beta_1=float(spec["beta_1"]),
                                                  beta_2=float(spec["beta_2"]),
                                                  epsilon=1e-7 if eps is None else float(eps))
    if name == "adagrad":
        acc = spec.get("initial_accumulator")
        return tff.learning.optimizers.build_adagrad(lr, initial_preconditioner_value=0.1 if acc is None
                                                     else float(acc), epsilon=1e-7 if eps is None
                                                     else float(eps))
    if name == "yogi":
        acc = spec.get("initial_accumulator")
        return tff.learning.optimizers.build_yogi(lr, beta_1=float(spec["beta_1"]),
                                                  beta_2=float(spec["beta_2"]),
                                                  epsilon=1e-3 if eps is None else float(eps),
                                                  initial_preconditioner_value=1e-6 if acc is None
                                                  else float(acc))
    raise ValueError(f"unknown optimizer {name!r}")


class _ClippedMean(tf.keras.metrics.Mean):
    """Mean of a per-example score of predictions clipped to [lo, hi] (no clipping with infinite bounds)."""

    def __init__(self, lo: float = -math.inf, hi: float = math.inf, name: str = "clipped",
                 dtype: Any = None) -> None:
        super().__init__(name=name, dtype=dtype)
        self.lo, self.hi = lo, hi

    def score(self, y_true: tf.Tensor, pred: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def update_state(self, y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: Any = None) -> Any:
        pred = tf.clip_by_value(tf.cast(y_pred, tf.float32), self.lo, self.hi)
        return super().update_state(self.score(tf.cast(y_true, tf.float32), pred))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "lo": self.lo, "hi": self.hi}


class ClippedSquaredError(_ClippedMean):
    """Mean squared error of the clipped predictions."""

    def __init__(self, lo: float = -math.inf, hi: float = math.inf, name: str = "mse",
                 dtype: Any = None) -> None:
        super().__init__(lo, hi, name=name, dtype=dtype)

    def score(self, y_true: tf.Tensor, pred: tf.Tensor) -> tf.Tensor:
        return tf.square(pred - y_true)


class RatingAccuracy(_ClippedMean):
    """Share of (clipped) predictions within 0.5 of the rating."""

    def __init__(self, lo: float = -math.inf, hi: float = math.inf, name: str = "accuracy",
                 dtype: Any = None) -> None:
        super().__init__(lo, hi, name=name, dtype=dtype)

    def score(self, y_true: tf.Tensor, pred: tf.Tensor) -> tf.Tensor:
        return tf.cast(tf.abs(pred - y_true) <= 0.5, tf.float32)


class ExampleCount(tf.keras.metrics.Sum):
    """Number of evaluated examples (summed over clients by TFF's metric aggregation)."""

    def __init__(self, name: str = "num_examples", dtype: Any = None) -> None:
        super().__init__(name=name, dtype=dtype)

    def update_state(self, y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: Any = None) -> Any:
        return super().update_state(tf.reduce_sum(tf.ones_like(y_true, tf.float32)))


def check_supported(training: dict[str, Any]) -> None:
    """Refuse fedrecon settings that ``build_fed_recon`` has no equivalent for."""
    if training.get("jointly_train_variables"):
        raise ValueError("TFF's build_fed_recon cannot train local variables in the global update")
    if float(training.get("reconstruction_l2", 0.0)):
        raise ValueError("TFF's build_fed_recon has no reconstruction L2 penalty")
    for key in ("reconstruction_optimizer", "client_optimizer"):
        if training[key]["name"] != "sgd":
            raise ValueError(f"{key} must be sgd")


LocalStart = list[float] | Mapping[str, np.ndarray] | None
MetricsFn = Callable[[], list[tf.keras.metrics.Metric]]


def _task(spec: dict[str, Any], eval_clip: tuple[float, float] | None, local_start: LocalStart
          ) -> tuple[Callable[[], tff.learning.models.ReconstructionModel],
                     Callable[[], tf.keras.losses.Loss], MetricsFn | None, MetricsFn]:
    """The model, loss, training metrics and evaluation metrics of a task, as TFF's no-argument builders."""
    if is_keras(spec):
        if local_start is not None and not isinstance(local_start, Mapping):
            raise ValueError("a Keras task's local start is a mapping of local variable name to value")
        loss_fn, train_metrics_fn, eval_metrics_fn = keras_bridge.build_objective(spec)
        keras_model_fn = functools.partial(keras_bridge.build_reconstruction_model, spec, local_start)
        return keras_model_fn, loss_fn, train_metrics_fn, eval_metrics_fn
    if isinstance(local_start, Mapping):
        raise ValueError("matrix factorization's local start is the user factors, a list of floats")
    lo, hi = eval_clip or (-math.inf, math.inf)
    input_spec = (tf.TensorSpec([None], tf.int64), tf.TensorSpec([None, 1], tf.float32))

    def model_fn() -> tff.learning.models.ReconstructionModel:
        keras_model = MatrixFactorization(spec, local_start)
        keras_model(tf.zeros([1], tf.int64))  # create the variables
        return tff.learning.models.ReconstructionModel.from_keras_model_and_layers(
            keras_model, global_layers=keras_model.global_layers, local_layers=[keras_model.user],
            input_spec=input_spec)

    def loss_fn() -> tf.keras.losses.Loss:
        return tf.keras.losses.MeanSquaredError()

    def metrics_fn() -> list[tf.keras.metrics.Metric]:
        return [ClippedSquaredError(lo, hi), RatingAccuracy(lo, hi), ExampleCount()]

    return model_fn, loss_fn, None, metrics_fn


def client_dataset(spec: dict[str, Any], x: np.ndarray, y: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """One client's examples (fedrecon's order and arrays) as the batches the task's TFF model reads."""
    if is_keras(spec):
        return keras_bridge.client_dataset(x, y, batch_size)
    return tf.data.Dataset.from_tensor_slices(
        (x.astype(np.int64), y.astype(np.float32)[:, None])).batch(batch_size)


def build_processes(spec: dict[str, Any], training: dict[str, Any],
                    eval_clip: tuple[float, float] | None = None, local_start: LocalStart = None
                    ) -> tuple[tff.learning.templates.LearningProcess,
                               tff.learning.templates.LearningProcess]:
    """``build_fed_recon`` and ``build_fed_recon_eval`` for a fedrecon model description and training config.

    Datasets are ``client_dataset``'s batches. ``local_start``: where every client's local variables start
    (TFF builds the client model once, so it is one value for all clients). Matrix factorization: the user
    factors, for ``local_init="shared"`` (default: TFF's own draw). A Keras task: every local variable's
    value by name (required; ``keras_bridge``).
    """
    check_supported(training)
    model_fn, loss_fn, train_metrics_fn, eval_metrics_fn = _task(spec, eval_clip, local_start)

    split = tff.learning.models.ReconstructionModel.build_dataset_split_fn
    recon_sgd = tff.learning.optimizers.build_sgdm(
        float(training["reconstruction_optimizer"]["learning_rate"]))
    weighting = (tff.learning.ClientWeighting.UNIFORM if training["client_weighting"] == "uniform"
                 else tff.learning.ClientWeighting.NUM_EXAMPLES)
    process = tff.learning.algorithms.build_fed_recon(
        model_fn, loss_fn=loss_fn, metrics_fn=train_metrics_fn,
        server_optimizer_fn=_optimizer(training["server_optimizer"]),
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(
            float(training["client_optimizer"]["learning_rate"])),
        reconstruction_optimizer_fn=recon_sgd,
        dataset_split_fn=split(recon_epochs=int(training["recon_epochs"]),
                               recon_steps_max=training["recon_steps_max"],
                               post_recon_epochs=int(training["post_recon_epochs"]),
                               post_recon_steps_max=training["post_recon_steps_max"],
                               split_dataset=bool(training["split_dataset"])),
        client_weighting=weighting)
    eval_epochs = training.get("eval_recon_epochs")
    eval_cap = training.get("eval_recon_steps_max")
    evaluator = tff.learning.algorithms.build_fed_recon_eval(
        model_fn, loss_fn=loss_fn, metrics_fn=eval_metrics_fn, reconstruction_optimizer_fn=recon_sgd,
        dataset_split_fn=split(recon_epochs=int(training["recon_epochs"] if eval_epochs is None
                                                else eval_epochs),
                               recon_steps_max=training["recon_steps_max"] if eval_cap is None
                               else eval_cap,
                               post_recon_epochs=1, post_recon_steps_max=None,
                               split_dataset=bool(training["split_dataset"])))
    return process, evaluator


# ----- fedrecon model files ---------------------------------------------------------------------------------
def read_model_file(path: str) -> tuple[tff.learning.models.ModelWeights, dict[str, Any], dict[str, Any]]:
    """A fedrecon model file as TFF ``ModelWeights``, with its model description and training config."""
    with np.load(path, allow_pickle=False) as archive:
        meta = json.loads(str(archive[META_KEY]))
        if meta.get("format") not in READABLE_MODEL_FILE_FORMATS:
            raise ValueError(f"{path} is not a fedrecon model file (format {meta.get('format')!r})")
        names = [v["name"] for v in meta["variables"]] if "variables" in meta else meta["names"]
        arrays = {name: archive[name] for name in names}
    spec = dict(meta["model"])
    return to_model_weights(arrays, spec), spec, dict(meta["training"])


def write_model_file(path: str, weights: tff.learning.models.ModelWeights, spec: dict[str, Any],
                     training: dict[str, Any], *, task: str = "tff", version: int = 0, batch_size: int = 5
                     ) -> None:
    """TFF global weights as a fedrecon model file (``fedrecon serve --init-model`` starts a task from it)."""
    names = global_names(spec)
    arrays = from_model_weights(weights, spec)
    variables = [{"name": n, "shape": list(np.shape(arrays[n])), "dtype": np.asarray(arrays[n]).dtype.name}
                 for n in names]
    meta = {"format": MODEL_FILE_FORMAT, "task": task, "version": int(version), "model": spec,
            "training": training, "batch_size": int(batch_size), "variables": variables}
    payload = {n: arrays[n] for n in names}
    payload[META_KEY] = np.asarray(json.dumps(meta, sort_keys=True))
    with open(path, "wb") as f:
        np.savez(f, **payload)
