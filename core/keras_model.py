"""Any Keras model as a reconstruction model: name the layers whose variables are local.

Like ``tff.learning.models.ReconstructionModel.from_keras_model_and_layers``: the variables of
``local_layers`` are local (reconstructed on the device, never sent), every other variable is global. The
forward pass calls Keras 3's ``stateless_call`` with the given variable values, vectorised over the client
axis with ``tf.vectorized_map``, so the one client step in ``client_work`` trains it exactly as it trains the
direct matrix factorization model.

Fresh local values come from each local variable's own layer initializer (``kernel_initializer`` for a
``kernel``, ...), re-seeded from the client's generator so a client's draw is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np

try:
    import tensorflow as tf
except ModuleNotFoundError as _missing:  # an app brings its own TensorFlow; say how to get one
    from fedrecon.core.lazy_tensorflow import MISSING_TENSORFLOW

    raise ModuleNotFoundError(MISSING_TENSORFLOW, name="tensorflow") from _missing

from fedrecon.core.model import ReconstructionModel, VariableSpec


def _initializer_for(layer: keras.layers.Layer, variable: keras.Variable) -> keras.initializers.Initializer:
    short = variable.path.split("/")[-1]
    init = getattr(layer, f"{short}_initializer", None)
    if init is None:
        raise ValueError(f"cannot find an initializer for local variable {variable.path!r}: "
                         f"layer {layer.name!r} has no attribute {short}_initializer")
    return keras.initializers.get(init)


class KerasReconstructionModel(ReconstructionModel):
    """A Keras model whose ``local_layers`` hold the local variables."""

    def __init__(self, keras_model: keras.Model, local_layers: Sequence[keras.layers.Layer]) -> None:
        if not keras_model.built:
            raise ValueError("build the Keras model (call it once or give it an Input) before wrapping it")
        self.keras_model = keras_model
        local_ids: dict[int, keras.layers.Layer] = {}
        for layer in local_layers:
            if not layer.variables:
                raise ValueError(f"local layer {layer.name!r} has no variables")
            for v in layer.variables:
                local_ids[id(v)] = layer
        all_vars = list(keras_model.trainable_variables) + list(keras_model.non_trainable_variables)
        missing = set(local_ids) - {id(v) for v in all_vars}
        if missing:
            raise ValueError("local_layers must be layers of keras_model")
        self._trainable_ids = [id(v) for v in keras_model.trainable_variables]
        self._non_trainable_ids = [id(v) for v in keras_model.non_trainable_variables]
        self._globals = [v for v in all_vars if id(v) not in local_ids]
        self._locals = [v for v in all_vars if id(v) in local_ids]
        self._local_inits = [_initializer_for(local_ids[id(v)], v) for v in self._locals]
        trainable = set(self._trainable_ids)

        def spec(v: keras.Variable) -> VariableSpec:
            return VariableSpec(v.path, tuple(int(d) for d in v.shape), trainable=id(v) in trainable,
                                dtype=str(v.dtype))

        self.global_variables = tuple(spec(v) for v in self._globals)
        self.local_variables = tuple(spec(v) for v in self._locals)
        self._position = {id(v): ("g", i) for i, v in enumerate(self._globals)}
        self._position.update({id(v): ("l", i) for i, v in enumerate(self._locals)})

    @classmethod
    def from_keras_model_and_layers(cls, keras_model: keras.Model,
                                    local_layers: Sequence[keras.layers.Layer]) -> KerasReconstructionModel:
        return cls(keras_model, local_layers)

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

    def _assemble(self, g: Sequence[tf.Tensor], lv: Sequence[tf.Tensor]) -> tuple[list, list]:
        def pick(var_id: int) -> tf.Tensor:
            group, i = self._position[var_id]
            return g[i] if group == "g" else lv[i]

        return [pick(i) for i in self._trainable_ids], [pick(i) for i in self._non_trainable_ids]

    def predict(self, global_views: Sequence[tf.Tensor], locals_: Sequence[tf.Tensor], x: tf.Tensor
                ) -> tf.Tensor:
        n_global = len(global_views)

        def one_client(args: list[tf.Tensor]) -> tf.Tensor:
            tv, ntv = self._assemble(args[:n_global], args[n_global:-1])
            out, _ = self.keras_model.stateless_call(tv, ntv, args[-1], training=False)
            return tf.reshape(out, [-1])

        return tf.vectorized_map(one_client, [*global_views, *locals_, x])
