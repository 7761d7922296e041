"""fedrecon's Keras tasks rebuilt for TensorFlow Federated (tf.keras 2.14, TFF 0.87's environment).

A Keras task travels as Keras 3's serialisation of a functional model (``core.keras_spec``): a graph of
layers and of Keras *operations* (slicing, casts, ``keras.ops`` arithmetic), with dtype policies as
objects. tf.keras 2 cannot deserialise that format, so this module reads the graph itself and builds the
same computation from tf.keras 2 layers and TensorFlow ops, from a closed list of what it knows to be the
same computation in both. Anything else (a layer class, an option with a value other than the one listed,
an operation, a shared layer, several inputs) is refused with ``UnsupportedInTff`` naming it, rather than
built approximately: a parity check against a model that is only almost the same would prove nothing.

Not translated, on purpose:

- initializers: the global variables get fedrecon's values (``set_model_weights``), and every local
  variable starts from the value fedrecon gives (``local_start``: TFF builds the client's model once, so a
  local start must be one value for all clients; ``simulations.tff_backend`` refuses a random one);
- regularizers, constraints, dropout, masking: fedrecon's engine (``core.keras_model``, Keras'
  ``stateless_call``) does not apply regularisation losses or constraints, and the translation would have
  to match it; they are refused unless absent.

The variables are mapped by layer name and variable name onto fedrecon's variable table (globals in wire
order, then locals), so ``ModelWeights`` hold the globals in exactly fedrecon's order. The objective
(``core.objectives``) becomes a tf.keras loss with the same masked mean, and metrics with fedrecon's
definitions of the training loss (token cross-entropy summed per example), evaluation loss and accuracy.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff


class UnsupportedInTff(ValueError):
    """A Keras task that this bridge cannot rebuild, exactly, in tf.keras 2."""


# ----- layers -------------------------------------------------------------------------------------------
# Per layer class: options passed on to tf.keras 2, options that must have one of the listed values, and
# options ignored because they only decide initial values (which fedrecon supplies). Every other option is
# refused: a Keras release that adds one must be looked at before it is trusted to mean the same.
_ABSENT = (None,)
_LAYERS: dict[str, dict[str, Any]] = {
    "Embedding": {
        "passed": ("input_dim", "output_dim"),
        "fixed": {"mask_zero": (False,), "embeddings_regularizer": _ABSENT, "activity_regularizer": _ABSENT,
                  "embeddings_constraint": _ABSENT, "quantization_config": _ABSENT, "sparse": (False,),
                  "input_length": _ABSENT, "lora_rank": _ABSENT, "lora_alpha": _ABSENT},
        "ignored": ("embeddings_initializer",),
        "initializers": {"embeddings": "embeddings_initializer"},
    },
    "Dense": {
        "passed": ("units", "activation", "use_bias"),
        "fixed": {"kernel_regularizer": _ABSENT, "bias_regularizer": _ABSENT, "activity_regularizer": _ABSENT,
                  "kernel_constraint": _ABSENT, "bias_constraint": _ABSENT, "quantization_config": _ABSENT,
                  "lora_rank": _ABSENT, "lora_alpha": _ABSENT},
        "ignored": ("kernel_initializer", "bias_initializer"),
        "initializers": {"kernel": "kernel_initializer", "bias": "bias_initializer"},
    },
    "LSTM": {
        "passed": ("units", "activation", "recurrent_activation", "use_bias", "return_sequences", "unroll"),
        "fixed": {"return_state": (False,), "go_backwards": (False,), "stateful": (False,),
                  "dropout": (0, 0.0), "recurrent_dropout": (0, 0.0), "kernel_regularizer": _ABSENT,
                  "recurrent_regularizer": _ABSENT, "bias_regularizer": _ABSENT,
                  "activity_regularizer": _ABSENT, "kernel_constraint": _ABSENT,
                  "recurrent_constraint": _ABSENT, "bias_constraint": _ABSENT, "use_cudnn": ("auto", False)},
        # zero_output_for_mask only acts on a mask, and masks are refused (Embedding mask_zero).
        "ignored": ("kernel_initializer", "recurrent_initializer", "bias_initializer", "unit_forget_bias",
                    "seed", "zero_output_for_mask"),
        "initializers": {"kernel": "kernel_initializer", "recurrent_kernel": "recurrent_initializer",
                         "bias": "bias_initializer"},
    },
    "Add": {"passed": (), "fixed": {}, "ignored": (), "initializers": {}},
}
# Activations that are the same function under the same name in Keras 3 and tf.keras 2.
_ACTIVATIONS = frozenset({"linear", "relu", "tanh", "sigmoid", "softmax", "elu", "selu", "softplus", "swish",
                          "gelu", "exponential"})
_COMMON = frozenset({"name", "trainable", "dtype"})


def _float32_policy(dtype: Any) -> bool:
    if dtype in (None, "float32"):
        return True
    return isinstance(dtype, Mapping) and (dtype.get("config") or {}).get("name") == "float32"


def _layer_kwargs(cls: str, name: str, config: Mapping[str, Any]) -> dict[str, Any]:
    rules = _LAYERS[cls]
    kwargs: dict[str, Any] = {"name": name, "trainable": bool(config.get("trainable", True))}
    if not _float32_policy(config.get("dtype")):
        raise UnsupportedInTff(f"layer {name!r} ({cls}) computes in dtype {config.get('dtype')!r}: the TFF "
                               "bridge builds float32 layers only")
    for key, value in config.items():
        if key in _COMMON or key in rules["ignored"]:
            continue
        if key in rules["passed"]:
            if key.endswith("activation") and value not in _ACTIVATIONS:
                raise UnsupportedInTff(f"layer {name!r} ({cls}): {key} {value!r} is not one the TFF bridge "
                                       f"knows to be the same in tf.keras 2 ({sorted(_ACTIVATIONS)})")
            kwargs[key] = value
        elif key in rules["fixed"]:
            if value not in rules["fixed"][key]:
                raise UnsupportedInTff(f"layer {name!r} ({cls}): {key}={value!r} cannot be built for TFF "
                                       f"(the bridge builds {key}={rules['fixed'][key][0]!r} only)")
        else:
            raise UnsupportedInTff(f"layer {name!r} ({cls}): option {key}={value!r} is unknown to the TFF "
                                   "bridge, which refuses what it cannot check means the same in tf.keras 2")
    return kwargs


# ----- operations (Keras 3 records these as graph nodes; tf.keras 2 builds them as TFOpLambda layers) -----
_OPS: dict[str, tuple[frozenset[str], Callable[..., Any]]] = {
    "GetItem": (frozenset(), lambda c, x, key: x[tuple(key) if isinstance(key, list) else key]),
    "Greater": (frozenset(), lambda c, a, b: tf.math.greater(a, b)),
    "Less": (frozenset(), lambda c, a, b: tf.math.less(a, b)),
    "Equal": (frozenset(), lambda c, a, b: tf.math.equal(a, b)),
    "Add": (frozenset(), lambda c, a, b: tf.math.add(a, b)),
    "Subtract": (frozenset(), lambda c, a, b: tf.math.subtract(a, b)),
    "Multiply": (frozenset(), lambda c, a, b: tf.math.multiply(a, b)),
    "Cast": (frozenset({"dtype"}), lambda c, x: tf.cast(x, c["dtype"])),
    "ExpandDims": (frozenset({"axis"}), lambda c, x: tf.expand_dims(x, c["axis"])),
}


def _resolve(arg: Any, tensors: Mapping[str, Any], where: str) -> Any:
    """A node argument with Keras 3's markers (tensors by producing layer, slices) made real."""
    if isinstance(arg, Mapping):
        kind = arg.get("class_name")
        if kind == "__keras_tensor__":
            layer, node, index = arg["config"]["keras_history"]
            if layer not in tensors or node != 0 or index != 0:
                raise UnsupportedInTff(f"{where}: an input from {layer!r} (node {node}, output {index}) the "
                                       "bridge cannot follow (shared layers and multi-output layers are "
                                       "not supported)")
            return tensors[layer]
        if kind == "__slice__":
            c = arg["config"]
            return slice(c.get("start"), c.get("stop"), c.get("step"))
        raise UnsupportedInTff(f"{where}: an argument of kind {kind!r} the bridge does not know")
    if isinstance(arg, list | tuple):
        return [_resolve(a, tensors, where) for a in arg]
    if arg is None or isinstance(arg, bool | int | float | str):
        return arg
    raise UnsupportedInTff(f"{where}: an argument {arg!r} the bridge does not know")


def _history(ref: Any) -> str:
    """The layer name of a functional config's input/output reference (``[name, 0, 0]`` or nested)."""
    refs = ref if ref and isinstance(ref[0], list) else [ref]
    if len(refs) != 1 or list(refs[0][1:]) != [0, 0]:
        raise UnsupportedInTff(f"the model has inputs or outputs {ref!r}: the TFF bridge builds models with "
                               "one input and one output")
    return str(refs[0][0])


def _node(layer: Mapping[str, Any], where: str) -> tuple[list[Any], dict[str, Any]]:
    nodes = layer.get("inbound_nodes") or []
    if len(nodes) != 1:
        raise UnsupportedInTff(f"{where} is called {len(nodes)} times: the TFF bridge builds layers called "
                               "once (no shared layers)")
    node = nodes[0]
    if not isinstance(node, Mapping):
        raise UnsupportedInTff(f"{where}: an inbound node in a format other than Keras 3's")
    return list(node.get("args", [])), dict(node.get("kwargs", {}))


def build_keras2_model(description: Mapping[str, Any],
                       local_start: Mapping[str, np.ndarray] | None = None) -> tf.keras.Model:
    """The tf.keras 2 model of a fedrecon Keras description (``kind = "keras"``).

    ``local_start``: each local variable's start by fedrecon name (the local layers' initial values);
    every local variable needs one."""
    architecture = description["architecture"]
    if architecture.get("class_name") != "Functional":
        raise UnsupportedInTff(f"the model is a Keras {architecture.get('class_name')!r}: the TFF bridge "
                               "builds functional models (keras.Model(inputs, outputs))")
    config = architecture["config"]
    local_layers = set(description["local_layers"])
    local_vars = [v for v in description["variables"] if v.get("local")]
    start = dict(local_start or {})
    missing = [v["name"] for v in local_vars if v["name"] not in start]
    if missing:
        raise UnsupportedInTff(f"no start for the local variables {missing}: give local_start (TFF builds "
                               "the client model once, so every client starts its locals from one value)")
    tensors: dict[str, Any] = {}
    inputs = None
    for layer in config["layers"]:
        cls, name, layer_config = layer["class_name"], layer["config"]["name"], dict(layer["config"])
        where = f"layer {name!r} ({cls})"
        module = str(layer.get("module", ""))
        if cls == "InputLayer":
            unknown = set(layer_config) - {"batch_shape", "dtype", "sparse", "ragged", "name", "optional"}
            if unknown or layer_config.get("sparse") or layer_config.get("ragged") or layer_config.get(
                    "optional"):
                raise UnsupportedInTff(f"{where}: options {sorted(unknown) or layer_config} the TFF bridge "
                                       "does not build (a dense input only)")
            shape = layer_config["batch_shape"]
            inputs = tensors[name] = tf.keras.Input(shape=tuple(shape[1:]), dtype=layer_config["dtype"],
                                                    name=name)
            continue
        args, kwargs = _node(layer, where)
        if module.startswith("keras.src.ops"):
            if cls not in _OPS:
                raise UnsupportedInTff(f"operation {name!r} ({module}.{cls}): the TFF bridge builds only "
                                       f"{sorted(_OPS)}")
            allowed, build = _OPS[cls]
            unknown = set(layer_config) - allowed - {"name"}
            if unknown or kwargs:
                raise UnsupportedInTff(f"operation {name!r} ({cls}): options {sorted(unknown)} / arguments "
                                       f"{sorted(kwargs)} the TFF bridge does not build")
            tensors[name] = build(layer_config, *_resolve(args, tensors, where))
            continue
        if module != "keras.layers" or cls not in _LAYERS:
            raise UnsupportedInTff(f"{where} from {module!r}: the TFF bridge builds only the Keras layers "
                                   f"{sorted(_LAYERS)} and the operations {sorted(_OPS)}")
        extra = {k: v for k, v in kwargs.items() if not (k == "training" or (k == "mask" and v is None))}
        if extra:
            raise UnsupportedInTff(f"{where} is called with {sorted(extra)}, which the TFF bridge does not "
                                   "pass on")
        layer_kwargs = _layer_kwargs(cls, name, layer_config)
        if name in local_layers:
            for short, init_arg in _LAYERS[cls]["initializers"].items():
                value = start.get(f"{name}/{short}")
                if value is None:  # an LSTM's variables are named through its cell: lstm/lstm_cell/kernel
                    value = next((v for k, v in start.items()
                                  if k.startswith(f"{name}/") and k.rsplit("/", 1)[-1] == short), None)
                if value is not None:
                    layer_kwargs[init_arg] = tf.keras.initializers.Constant(np.asarray(value, np.float32))
            if cls == "LSTM":
                layer_kwargs["unit_forget_bias"] = False  # the start above is the whole bias
        built = getattr(tf.keras.layers, cls)(**layer_kwargs)
        (operand,) = _resolve(args, tensors, where)
        tensors[name] = built(operand)
    if inputs is None:
        raise UnsupportedInTff("the model has no InputLayer")
    output = tensors[_history(config["output_layers"])]
    if _history(config["input_layers"]) not in tensors:
        raise UnsupportedInTff("the model's input is not among its layers")
    return tf.keras.Model(inputs, output, name=config.get("name"))


_UNIQUIFIED = re.compile(r"_\d+$")


def _short(variable: tf.Variable) -> str:
    """``lstm/lstm_cell/kernel:0`` -> ``kernel`` (a graph may add ``_1``: ``kernel_1:0``)."""
    return _UNIQUIFIED.sub("", variable.name.split(":")[0].rsplit("/", 1)[-1])


def variables_in_fedrecon_order(model: tf.keras.Model, description: Mapping[str, Any]
                                ) -> dict[str, list[tf.Variable]]:
    """The tf.keras 2 variables as fedrecon's table lists them: ``global_trainable``,
    ``global_non_trainable``, ``local_trainable``, ``local_non_trainable``, each in table order. Every
    variable of the model must be in the table, and every table entry in the model, with the same shape and
    trainability."""
    groups: dict[str, list[tf.Variable]] = {"global_trainable": [], "global_non_trainable": [],
                                            "local_trainable": [], "local_non_trainable": []}
    used: set[int] = set()
    for entry in description["variables"]:
        name = str(entry["name"])
        layer_name, short = name.split("/", 1)[0], name.rsplit("/", 1)[-1]
        try:
            layer = model.get_layer(layer_name)
        except ValueError as err:
            raise UnsupportedInTff(f"variable {name}: the tf.keras 2 model has no layer {layer_name!r}"
                                   ) from err
        found = [w for w in layer.weights if _short(w) == short and id(w) not in used]
        if not found:
            has = [w.name for w in layer.weights]
            raise UnsupportedInTff(f"variable {name}: layer {layer_name!r} has {has} in tf.keras 2")
        w = found[0]
        if tuple(w.shape) != tuple(int(d) for d in entry["shape"]):
            raise UnsupportedInTff(f"variable {name}: shape {list(entry['shape'])} in fedrecon, "
                                   f"{list(w.shape)} in tf.keras 2")
        trainable = bool(entry.get("trainable", True))
        if bool(w.trainable) != trainable:
            raise UnsupportedInTff(f"variable {name}: trainable {trainable} in fedrecon, {w.trainable} in "
                                   "tf.keras 2")
        used.add(id(w))
        group = (("local_" if entry.get("local") else "global_")
                 + ("trainable" if trainable else "non_trainable"))
        groups[group].append(w)
    extra = [w.name for w in model.weights if id(w) not in used]
    if extra:
        raise UnsupportedInTff(f"the tf.keras 2 model has variables fedrecon's table does not: {extra}")
    return groups


def input_spec(description: Mapping[str, Any]) -> tuple[tf.TensorSpec, tf.TensorSpec]:
    """A batch as TFF sees it: the model input ``[B, ...]`` and the targets ``[B, T]`` (float32 ids, as
    fedrecon's batches carry them)."""
    for layer in description["architecture"]["config"]["layers"]:
        if layer["class_name"] == "InputLayer":
            shape, dtype = layer["config"]["batch_shape"], layer["config"]["dtype"]
            return (tf.TensorSpec([None, *shape[1:]], tf.as_dtype(dtype)),
                    tf.TensorSpec([None, *shape[1:2]], tf.float32))
    raise UnsupportedInTff("the model has no InputLayer")


def build_reconstruction_model(description: Mapping[str, Any], local_start: Mapping[str, np.ndarray] | None
                               ) -> tff.learning.models.ReconstructionModel:
    """TFF's ReconstructionModel of the task, its variables in fedrecon's order (``ModelWeights``' order)."""
    keras_model = build_keras2_model(description, local_start)
    groups = variables_in_fedrecon_order(keras_model, description)
    return tff.learning.models.ReconstructionModel.from_keras_model_and_variables(
        keras_model, **{f"{group}_variables": variables for group, variables in groups.items()},
        input_spec=input_spec(description))


def client_dataset(x: np.ndarray, y: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """A client's examples in fedrecon's order, batched as fedrecon batches them."""
    return tf.data.Dataset.from_tensor_slices((x.astype(np.int32), y.astype(np.float32))).batch(batch_size)


# ----- the objective -------------------------------------------------------------------------------------
def _units(y_true: tf.Tensor, pad_id: int | None) -> tf.Tensor:
    """1 for a target that counts, 0 for padding (``core.objectives.SparseCategoricalCrossentropy``)."""
    y = tf.cast(y_true, tf.float32)
    return tf.ones_like(y) if pad_id is None else tf.cast(tf.not_equal(y, float(pad_id)), tf.float32)


def _cross_entropy(y_true: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(y_true, tf.int32), logits=logits)


class MaskedCrossEntropy(tf.keras.losses.Loss):
    """fedrecon's batch loss: the mean cross-entropy over the batch's non-padding targets (0 if none).

    ``call`` returns that mean itself; the ``SUM`` reduction of one value leaves it as it is (Keras'
    default reduction would divide by the number of targets, padding included)."""

    def __init__(self, pad_id: int | None = 0, name: str = "masked_cross_entropy") -> None:
        super().__init__(reduction=tf.keras.losses.Reduction.SUM, name=name)
        self.pad_id = pad_id

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        units = _units(y_true, self.pad_id)
        return tf.reduce_sum(_cross_entropy(y_true, y_pred) * units) / tf.maximum(tf.reduce_sum(units), 1.0)

    def get_config(self) -> dict[str, Any]:
        return {"pad_id": self.pad_id, "name": self.name}


class _Ratio(tf.keras.metrics.Metric):
    """Σ numerator / Σ denominator over every batch (and, summed by TFF, every client)."""

    def __init__(self, pad_id: int | None = 0, excludes: Sequence[int] = (), name: str = "ratio",
                 dtype: Any = None) -> None:
        super().__init__(name=name, dtype=dtype)
        self.pad_id, self.excludes = pad_id, [int(e) for e in excludes]
        self.numerator = self.add_weight("numerator", initializer="zeros")
        self.denominator = self.add_weight("denominator", initializer="zeros")

    def parts(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        raise NotImplementedError

    def update_state(self, y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: Any = None) -> Any:
        numerator, denominator = self.parts(y_true, y_pred)
        self.numerator.assign_add(numerator)
        return self.denominator.assign_add(denominator)

    def result(self) -> tf.Tensor:
        return tf.math.divide_no_nan(self.numerator, self.denominator)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "pad_id": self.pad_id, "excludes": self.excludes}


class LossPerTarget(_Ratio):
    """fedrecon's loss, in training (over the post-reconstruction batches: ``simulations.runner``, loss sum
    / loss units) and in evaluation: cross-entropy per non-padding target."""

    def parts(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        units = _units(y_true, self.pad_id)
        return tf.reduce_sum(_cross_entropy(y_true, y_pred) * units), tf.reduce_sum(units)


class CountedAccuracy(_Ratio):
    """fedrecon's accuracy: arg-max hits over targets that are neither padding nor ``excludes``."""

    def counted(self, y_true: tf.Tensor) -> tf.Tensor:
        counted = _units(y_true, self.pad_id)
        if self.excludes:
            hit = tf.reduce_any(tf.equal(tf.cast(y_true, tf.float32)[..., None],
                                         tf.constant(self.excludes, tf.float32)), axis=-1)
            counted *= 1.0 - tf.cast(hit, tf.float32)
        return counted

    def parts(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        counted = self.counted(y_true)
        hits = tf.cast(tf.equal(tf.cast(tf.argmax(y_pred, axis=-1), tf.float32), tf.cast(y_true, tf.float32)),
                       tf.float32)
        return tf.reduce_sum(hits * counted), tf.reduce_sum(counted)


class CountedTargets(CountedAccuracy):
    """How many targets accuracy counted (fedrecon's ``num_examples`` of a next-word evaluation)."""

    def result(self) -> tf.Tensor:
        return self.denominator


def build_objective(description: Mapping[str, Any]) -> tuple[Callable[[], tf.keras.losses.Loss],
                                                               Callable[[], list[tf.keras.metrics.Metric]],
                                                               Callable[[], list[tf.keras.metrics.Metric]]]:
    """The task's loss, its training metrics and its evaluation metrics, as TFF's no-argument builders."""
    config = dict(description.get("objective") or {"name": "mse"})
    if config.get("name") != "sparse_categorical_crossentropy":
        raise UnsupportedInTff(f"objective {config.get('name')!r}: the TFF bridge runs Keras tasks with the "
                               "sparse_categorical_crossentropy objective")
    pad_id = config.get("pad_id", 0)
    pad_id = None if pad_id is None else int(pad_id)
    excludes = tuple(int(e) for e in config.get("accuracy_excludes", ()))
    return (lambda: MaskedCrossEntropy(pad_id),
            lambda: [LossPerTarget(pad_id, name="loss_per_target")],
            lambda: [LossPerTarget(pad_id, name="loss_per_target"),
                     CountedAccuracy(pad_id, excludes, name="accuracy"),
                     CountedTargets(pad_id, excludes, name="num_examples")])


__all__ = ["UnsupportedInTff", "build_keras2_model", "build_objective", "build_reconstruction_model",
           "client_dataset", "input_spec", "variables_in_fedrecon_order"]
