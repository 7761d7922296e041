"""Any Keras model as a reconstruction model: name the layers whose variables are local.

Like ``tff.learning.models.ReconstructionModel.from_keras_model_and_layers``: the variables of
``local_layers`` are local (reconstructed on the device, never sent), every other variable is global. The
forward pass calls Keras 3's ``stateless_call`` with the given variable values, vectorised over the client
axis with ``tf.vectorized_map``, so the one client step in ``client_work`` trains it exactly as it trains the
direct matrix factorization model.

Fresh local values come from each local variable's own layer initializer (``kernel_initializer`` for a
``kernel``, ...), re-seeded from the client's generator so a client's draw is reproducible. Variables that
are not floating point (the state of a layer's seed generator) are internal to Keras: they are neither
global nor local, and every forward pass uses their value at wrapping time.

``config()`` describes the model for the wire (``keras_spec``): the Keras architecture, the local layers, the
objective and the variable table, so a coordinator can serve it and a device can rebuild it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

try:
    import tensorflow as tf
except ModuleNotFoundError as _missing:  # an app brings its own TensorFlow; say how to get one
    from fedrecon.core.lazy_tensorflow import MISSING_TENSORFLOW

    raise ModuleNotFoundError(MISSING_TENSORFLOW, name="tensorflow") from _missing

from fedrecon.core.keras_spec import KIND, variable_table
from fedrecon.core.model import ReconstructionModel, VariableSpec
from fedrecon.core.objectives import MSE, Objective


def _initializer_for(layer: keras.layers.Layer, variable: keras.Variable) -> keras.initializers.Initializer:
    short = variable.path.split("/")[-1]
    init = getattr(layer, f"{short}_initializer", None)
    if init is None:
        raise ValueError(f"cannot find an initializer for local variable {variable.path!r}: "
                         f"layer {layer.name!r} has no attribute {short}_initializer")
    return keras.initializers.get(init)


def _is_float(variable: keras.Variable) -> bool:
    return "float" in str(variable.dtype)


class KerasReconstructionModel(ReconstructionModel):
    """A Keras model whose ``local_layers`` (layers or their names) hold the local variables."""

    def __init__(self, keras_model: keras.Model, local_layers: Sequence[keras.layers.Layer | str], *,
                 objective: Objective = MSE) -> None:
        if not keras_model.built:
            raise ValueError("build the Keras model (call it once or give it an Input) before wrapping it")
        self.keras_model = keras_model
        self.objective = objective
        layers = [keras_model.get_layer(layer) if isinstance(layer, str) else layer for layer in local_layers]
        self.local_layer_names = tuple(layer.name for layer in layers)
        local_ids: dict[int, keras.layers.Layer] = {}
        for layer in layers:
            if not any(_is_float(v) for v in layer.variables):
                raise ValueError(f"local layer {layer.name!r} has no variables")
            for v in layer.variables:
                if _is_float(v):
                    local_ids[id(v)] = layer
        all_vars = list(keras_model.trainable_variables) + list(keras_model.non_trainable_variables)
        missing = set(local_ids) - {id(v) for v in all_vars}
        if missing:
            raise ValueError("local_layers must be layers of keras_model")
        self._trainable_ids = [id(v) for v in keras_model.trainable_variables]
        self._non_trainable_ids = [id(v) for v in keras_model.non_trainable_variables]
        federated = [v for v in all_vars if _is_float(v)]
        self._globals = [v for v in federated if id(v) not in local_ids]
        self._locals = [v for v in federated if id(v) in local_ids]
        # Keras-internal state (seed generators): constant inputs of every forward pass.
        self._internal = {id(v): tf.constant(v.numpy()) for v in all_vars if not _is_float(v)}
        self._local_inits = [_initializer_for(local_ids[id(v)], v) for v in self._locals]
        trainable = set(self._trainable_ids)

        def spec(v: keras.Variable) -> VariableSpec:
            return VariableSpec(v.path, tuple(int(d) for d in v.shape), trainable=id(v) in trainable,
                                dtype=str(v.dtype))

        self.global_variables = tuple(spec(v) for v in self._globals)
        self.local_variables = tuple(spec(v) for v in self._locals)
        names = [v.name for v in (*self.global_variables, *self.local_variables)]
        if len(set(names)) != len(names):
            raise ValueError("the Keras model has two variables with the same path; give its layers unique "
                             "names")
        self._position = {id(v): ("g", i) for i, v in enumerate(self._globals)}
        self._position.update({id(v): ("l", i) for i, v in enumerate(self._locals)})
        self._description: dict[str, Any] | None = None

    @classmethod
    def from_keras_model_and_layers(cls, keras_model: keras.Model,
                                    local_layers: Sequence[keras.layers.Layer | str], *,
                                    objective: Objective = MSE) -> KerasReconstructionModel:
        return cls(keras_model, local_layers, objective=objective)

    def config(self) -> dict[str, Any]:
        """The model's description for a task, the wire and model files (``keras_spec``)."""
        if self._description is None:
            self._description = {
                "kind": KIND,
                "architecture": keras.saving.serialize_keras_object(self.keras_model),
                "local_layers": list(self.local_layer_names),
                "objective": self.objective.config(),
                "variables": variable_table(self.global_variables, self.local_variables),
            }
        return self._description

    def initial_globals(self, seed: int) -> list[np.ndarray]:
        """The Keras model's current global weights (build the model with a seed for reproducibility)."""
        del seed
        return [np.asarray(v.numpy(), np.float32) for v in self._globals]

    def initial_locals(self, rng: np.random.Generator) -> list[np.ndarray]:
        values = []
        for v, init in zip(self._locals, self._local_inits, strict=True):
            config = init.get_config()
            if "seed" in config:
                config["seed"] = int(rng.integers(0, 2**31 - 1))
            fresh = type(init).from_config(config)
            values.append(np.asarray(fresh(tuple(v.shape), dtype="float32"), np.float32))
        return values

    def set_globals(self, values: Sequence[np.ndarray]) -> None:
        """Write global values into the Keras model itself (what ``fedrecon export`` saves as ``.keras``)."""
        self.check_globals(values, "this Keras model")
        for v, value in zip(self._globals, values, strict=True):
            v.assign(value)

    def _assemble(self, g: Sequence[tf.Tensor], lv: Sequence[tf.Tensor]) -> tuple[list, list]:
        def pick(var_id: int) -> tf.Tensor:
            if var_id in self._internal:
                return self._internal[var_id]
            group, i = self._position[var_id]
            return g[i] if group == "g" else lv[i]

        return [pick(i) for i in self._trainable_ids], [pick(i) for i in self._non_trainable_ids]

    def predict(self, global_views: Sequence[tf.Tensor], locals_: Sequence[tf.Tensor], x: tf.Tensor
                ) -> tf.Tensor:
        n_global = len(global_views)

        def one_client(args: list[tf.Tensor]) -> tf.Tensor:
            tv, ntv = self._assemble(args[:n_global], args[n_global:-1])
            out, _ = self.keras_model.stateless_call(tv, ntv, args[-1], training=False)
            return self.objective.prepare(out)

        return tf.vectorized_map(one_client, [*global_views, *locals_, x])
