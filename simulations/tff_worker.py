"""TensorFlow Federated's Federated Reconstruction, driven one command at a time (runs in ``.venv-tff``).

TFF 0.87 needs TensorFlow 2.14 and protobuf 4, fedrecon needs TensorFlow 2.21 and protobuf 7: they cannot
share a Python environment. So this file imports nothing from fedrecon: ``simulations.tff_backend`` starts it
with the TFF environment's interpreter and sends it one JSON command per line on stdin; it answers one JSON
line per command on stdout (TensorFlow's own chatter goes to stderr). Arrays travel as ``.npz`` files.

Commands:

- ``init``: build ``tff.learning.algorithms.build_fed_recon`` and ``build_fed_recon_eval`` for a matrix
  factorization task, load every user's ratings (an ``.npz`` of concatenated examples), and set the global
  weights to a given model (fedrecon's variable names and shapes, converted to TFF ``ModelWeights``).
- ``round``: one ``process.next`` over the datasets of the given users; write the new global weights
  (converted back to fedrecon's layout) and report the seconds ``next`` took and the training loss.
- ``evaluate``: reconstruct-then-evaluate the given users under given global weights.
- ``get_globals``: write the training process's current global weights (converted back to fedrecon's layout).
- ``quit``.

The Keras model mirrors ``core.matrix_factorization``: item factors (and item bias, global offset) in global
layers; the user's factors (and bias) in a local layer that TFF re-initialises for every client.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

INIT_SCALE = 0.05


def _local_initializer(kind: str) -> tf.keras.initializers.Initializer:
    """TFF evaluates this once, when it builds the client computation: every client starts from that value."""
    if kind == "zeros":
        return tf.keras.initializers.Zeros()
    if kind == "shared":
        return tf.keras.initializers.RandomUniform(-INIT_SCALE, INIT_SCALE)
    raise ValueError(f"TFF cannot run local_init {kind!r} (it draws the local start once for all clients): "
                     "use 'shared' or 'zeros'")


class LocalUser(tf.keras.layers.Layer):
    """The user's factors (and bias): one vector per client, created afresh by TFF for every client."""

    def __init__(self, num_factors: int, use_bias: bool, initializer: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        init = _local_initializer(initializer)
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

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        num_items, factors = int(spec["num_items"]), int(spec["num_factors"])
        self.use_biases = bool(spec.get("use_biases", False))
        uniform = tf.keras.initializers.RandomUniform(-INIT_SCALE, INIT_SCALE)
        self.items = tf.keras.layers.Embedding(num_items, factors, embeddings_initializer=uniform,
                                               name="item_embedding")
        self.user = LocalUser(factors, self.use_biases, spec.get("local_init", "shared"), name="user")
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
def global_names(spec: dict[str, Any]) -> list[str]:
    """fedrecon's global variable names, in its order (``core.matrix_factorization``)."""
    names = ["item_embedding"]
    if spec.get("use_biases", False):
        names += ["item_bias", "global_bias"]
    return names


def to_model_weights(arrays: dict[str, np.ndarray], spec: dict[str, Any]) -> tff.learning.models.ModelWeights:
    """A fedrecon model (arrays by name) as the ``ModelWeights`` of this reconstruction model's globals.

    TFF keeps the item bias as a ``[items, 1]`` embedding; fedrecon keeps ``[items]``.
    """
    shapes = {"item_embedding": (int(spec["num_items"]), int(spec["num_factors"])),
              "item_bias": (int(spec["num_items"]), 1), "global_bias": ()}
    trainable = []
    for name in global_names(spec):
        if name not in arrays:
            raise ValueError(f"the model has no variable {name!r} (has {sorted(arrays)})")
        value = np.asarray(arrays[name], np.float32)
        if value.size != math.prod(shapes[name]):
            raise ValueError(f"{name} has shape {value.shape}; this model needs {shapes[name]}")
        trainable.append(value.reshape(shapes[name]))
    return tff.learning.models.ModelWeights(trainable=trainable, non_trainable=[])


def from_model_weights(weights: tff.learning.models.ModelWeights, spec: dict[str, Any]
                       ) -> dict[str, np.ndarray]:
    """TFF's global ``ModelWeights`` back in fedrecon's names and shapes."""
    out = {}
    for name, value in zip(global_names(spec), weights.trainable, strict=True):
        value = np.asarray(value, np.float32)
        out[name] = value.reshape(-1) if name == "item_bias" else value
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


class ClippedSquaredError(tf.keras.metrics.Mean):
    """Mean squared error of predictions clipped to [lo, hi] (no clipping with infinite bounds)."""

    def __init__(self, lo: float = -math.inf, hi: float = math.inf, name: str = "mse",
                 dtype: Any = None) -> None:
        super().__init__(name=name, dtype=dtype)
        self.lo, self.hi = lo, hi

    def update_state(self, y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: Any = None) -> Any:
        pred = tf.clip_by_value(tf.cast(y_pred, tf.float32), self.lo, self.hi)
        return super().update_state(tf.square(pred - tf.cast(y_true, tf.float32)))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "lo": self.lo, "hi": self.hi}


class RatingAccuracy(tf.keras.metrics.Mean):
    """Share of (clipped) predictions within 0.5 of the rating."""

    def __init__(self, lo: float = -math.inf, hi: float = math.inf, name: str = "accuracy",
                 dtype: Any = None) -> None:
        super().__init__(name=name, dtype=dtype)
        self.lo, self.hi = lo, hi

    def update_state(self, y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: Any = None) -> Any:
        pred = tf.clip_by_value(tf.cast(y_pred, tf.float32), self.lo, self.hi)
        return super().update_state(tf.cast(tf.abs(pred - tf.cast(y_true, tf.float32)) <= 0.5, tf.float32))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "lo": self.lo, "hi": self.hi}


class ExampleCount(tf.keras.metrics.Sum):
    """Number of evaluated examples (summed over clients by TFF's metric aggregation)."""

    def __init__(self, name: str = "num_examples", dtype: Any = None) -> None:
        super().__init__(name=name, dtype=dtype)

    def update_state(self, y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: Any = None) -> Any:
        return super().update_state(tf.reduce_sum(tf.ones_like(y_true, tf.float32)))


class Worker:
    def __init__(self) -> None:
        self.spec: dict[str, Any] = {}
        self.datasets: dict[int, tf.data.Dataset] = {}

    # -- commands -------------------------------------------------------------------------------------------
    def init(self, cmd: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.spec = spec = dict(cmd["model"])
        training = cmd["training"]
        if training.get("jointly_train_variables"):
            raise ValueError("TFF's build_fed_recon cannot train local variables in the global update")
        if float(training.get("reconstruction_l2", 0.0)):
            raise ValueError("TFF's build_fed_recon has no reconstruction L2 penalty")
        for key in ("reconstruction_optimizer", "client_optimizer"):
            if training[key]["name"] != "sgd":
                raise ValueError(f"{key} must be sgd")
        lo, hi = cmd.get("eval_clip") or (-math.inf, math.inf)
        batch_size = int(cmd["batch_size"])
        data = np.load(cmd["data"])
        users, offsets, xs, ys = data["users"], data["offsets"], data["x"], data["y"]
        for k, user in enumerate(users):
            a, b = int(offsets[k]), int(offsets[k + 1])
            self.datasets[int(user)] = tf.data.Dataset.from_tensor_slices(
                (xs[a:b].astype(np.int64), ys[a:b].astype(np.float32)[:, None])).batch(batch_size)
        input_spec = (tf.TensorSpec([None], tf.int64), tf.TensorSpec([None, 1], tf.float32))

        def model_fn() -> tff.learning.models.ReconstructionModel:
            keras_model = MatrixFactorization(spec)
            keras_model(tf.zeros([1], tf.int64))  # create the variables
            return tff.learning.models.ReconstructionModel.from_keras_model_and_layers(
                keras_model, global_layers=keras_model.global_layers, local_layers=[keras_model.user],
                input_spec=input_spec)

        def loss_fn() -> tf.keras.losses.Loss:
            return tf.keras.losses.MeanSquaredError()

        def metrics_fn() -> list[tf.keras.metrics.Metric]:
            return [ClippedSquaredError(lo, hi), RatingAccuracy(lo, hi), ExampleCount()]

        split = tff.learning.models.ReconstructionModel.build_dataset_split_fn
        recon_sgd = tff.learning.optimizers.build_sgdm(
            float(training["reconstruction_optimizer"]["learning_rate"]))
        weighting = (tff.learning.ClientWeighting.UNIFORM if training["client_weighting"] == "uniform"
                     else tff.learning.ClientWeighting.NUM_EXAMPLES)
        self.process = tff.learning.algorithms.build_fed_recon(
            model_fn, loss_fn=loss_fn, metrics_fn=None,
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
        self.evaluator = tff.learning.algorithms.build_fed_recon_eval(
            model_fn, loss_fn=loss_fn, metrics_fn=metrics_fn, reconstruction_optimizer_fn=recon_sgd,
            dataset_split_fn=split(recon_epochs=int(training["recon_epochs"] if eval_epochs is None
                                                    else eval_epochs),
                                   recon_steps_max=training["recon_steps_max"] if eval_cap is None
                                   else eval_cap,
                                   post_recon_epochs=1, post_recon_steps_max=None,
                                   split_dataset=bool(training["split_dataset"])))
        self.state = self.process.initialize()
        self.state = self.process.set_model_weights(self.state, self._load_weights(cmd["globals"]))
        self.eval_state = self.evaluator.initialize()
        return {"users": len(self.datasets), "build_seconds": time.perf_counter() - t0,
                "tff_version": tff.__version__, "tensorflow_version": tf.__version__}

    def _load_weights(self, path: str) -> tff.learning.models.ModelWeights:
        with np.load(path) as f:
            return to_model_weights({k: f[k] for k in f.files}, self.spec)

    def _save_weights(self, weights: tff.learning.models.ModelWeights, path: str) -> None:
        np.savez(path, **from_model_weights(weights, self.spec))

    def _datasets(self, users: list[int]) -> list[tf.data.Dataset]:
        unknown = [u for u in users if u not in self.datasets]
        if unknown:
            raise ValueError(f"unknown users {unknown[:5]}")
        return [self.datasets[u] for u in users]

    def round(self, cmd: dict[str, Any]) -> dict[str, Any]:
        data = self._datasets([int(u) for u in cmd["clients"]])
        t0 = time.perf_counter()
        output = self.process.next(self.state, data)
        seconds = time.perf_counter() - t0
        self.state = output.state
        self._save_weights(self.process.get_model_weights(self.state), cmd["out"])
        train = output.metrics["client_work"]["train"]
        # TFF's loss metric: the mean over post-reconstruction batches of each batch's mean loss.
        return {"seconds": seconds, "loss": float(train["loss"])}

    def get_globals(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self._save_weights(self.process.get_model_weights(self.state), cmd["out"])
        return {}

    def evaluate(self, cmd: dict[str, Any]) -> dict[str, Any]:
        data = self._datasets([int(u) for u in cmd["users"]])
        weights = self._load_weights(cmd["globals"])
        self.eval_state = self.evaluator.set_model_weights(self.eval_state, weights)
        t0 = time.perf_counter()
        output = self.evaluator.next(self.eval_state, data)
        seconds = time.perf_counter() - t0
        metrics = output.metrics["client_work"]["eval"]["current_round_metrics"]
        return {"mse": float(metrics["mse"]), "accuracy": float(metrics["accuracy"]),
                "num_examples": float(metrics["num_examples"]), "seconds": seconds}


def main() -> None:
    """Serve commands until ``quit`` or end of input; every answer is one JSON line."""
    protocol = sys.stdout
    sys.stdout = sys.stderr  # anything TFF prints must not corrupt the answers
    worker = Worker()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
            op = cmd.get("op")
            if op == "quit":
                protocol.write(json.dumps({"ok": True}) + "\n")
                protocol.flush()
                return
            if op not in ("init", "round", "evaluate", "get_globals"):
                raise ValueError(f"unknown op {op!r}")
            reply = {"ok": True, **getattr(worker, op)(cmd)}
        except Exception as err:  # every failure becomes an answer the driver can raise
            reply = {"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
        protocol.write(json.dumps(reply) + "\n")
        protocol.flush()


if __name__ == "__main__":
    main()
