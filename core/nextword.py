"""Next-word prediction models with personal parts, as plain Keras models (the paper's second task).

One architecture, four ways to federate it (Singhal et al., 2021, Section 5.2, on Stack Overflow; here at
a smaller scale):

- ``global``: everything global (FedAvg or an adaptive server optimizer; "+ fine-tuning" adapts a copy of
  all of it on the user's reconstruction data at evaluation: ``FineTuned``);
- ``local_oov``: FedRecon with local embeddings for ``oov_buckets`` out-of-vocabulary buckets (a user's
  own rare words, names and spellings get embeddings that never leave the device);
- ``personal_layer``: FedRecon with a local residual adapter after the recurrent layer (``h + W h + b``,
  ``W`` and ``b`` local and starting at zero: reconstruction starts from the global model exactly).

Layers: input ``[T, 2]`` int32 (token id, OOV bucket or 0), a word embedding (global) plus the bucket
embedding (local, ``local_oov`` only) for unknown words, an LSTM, the optional adapter, a projection to the
embedding size and the output logits over the vocabulary (global). Only standard Keras layers and ops, so
the description travels and is rebuilt safely (no Lambda layers, no custom classes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from fedrecon.core.keras_model import KerasReconstructionModel
from fedrecon.core.lazy_tensorflow import tf
from fedrecon.core.model import ReconstructionModel
from fedrecon.core.objectives import SparseCategoricalCrossentropy

VARIANTS = ("global", "local_oov", "personal_layer")


@dataclass(frozen=True)
class NextWordSizes:
    vocab_classes: int  # output classes: padding, BOS, EOS, words, OOV
    seq_len: int = 16
    embedding: int = 48
    hidden: int = 96
    oov_buckets: int = 50  # local bucket embeddings of the local_oov variant


def nextword_model(sizes: NextWordSizes, variant: str, *, accuracy_excludes: Sequence[int], seed: int = 0
                   ) -> KerasReconstructionModel:
    """The Keras model of ``variant`` (``VARIANTS``) wrapped with its local layers and the objective."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(sizes.seq_len, 2), dtype="int32", name="tokens")
    tokens = inputs[:, :, 0]
    x = keras.layers.Embedding(sizes.vocab_classes, sizes.embedding, name="embedding")(tokens)
    local: list[str] = []
    if variant == "local_oov":
        buckets = inputs[:, :, 1]
        start = keras.initializers.RandomUniform(-0.05, 0.05)
        oov = keras.layers.Embedding(sizes.oov_buckets + 1, sizes.embedding, name="oov_embedding",
                                     embeddings_initializer=start)(buckets)
        is_oov = keras.ops.expand_dims(keras.ops.cast(keras.ops.greater(buckets, 0), "float32"), -1)
        x = x + oov * is_oov
        local.append("oov_embedding")
    h = keras.layers.LSTM(sizes.hidden, return_sequences=True, name="lstm")(x)
    if variant == "personal_layer":
        adapter = keras.layers.Dense(sizes.hidden, name="adapter", kernel_initializer="zeros")(h)
        h = keras.layers.Add(name="adapted")([h, adapter])
        local.append("adapter")
    h = keras.layers.Dense(sizes.embedding, name="projection")(h)
    logits = keras.layers.Dense(sizes.vocab_classes, name="logits")(h)
    objective = SparseCategoricalCrossentropy(pad_id=0, accuracy_excludes=tuple(accuracy_excludes))
    return KerasReconstructionModel(keras.Model(inputs, logits, name=f"nextword_{variant}"), local,
                                    objective=objective)


class FineTuned(ReconstructionModel):
    """Evaluation with local fine-tuning (the paper's "+ fine-tuning" row): every variable of ``base`` is
    local and starts from the given global values, so the engine's reconstruct-then-evaluate is exactly
    "fine-tune a copy of the model on the user's reconstruction data, then score the held-out data"."""

    def __init__(self, base: ReconstructionModel, globals_: Sequence[np.ndarray]) -> None:
        if base.local_variables:
            raise ValueError("fine-tuning adapts an all-global model")
        self.base = base
        self.objective = base.objective
        self.global_variables = ()
        self.local_variables = base.global_variables
        self._start = [np.asarray(g, np.float32) for g in globals_]

    def initial_globals(self, seed: int) -> list[np.ndarray]:
        return []

    def initial_locals(self, rng: np.random.Generator) -> list[np.ndarray]:
        return [g.copy() for g in self._start]

    def predict(self, global_views: Sequence[Any], locals_: Sequence[Any], x: Any) -> Any:
        return self.base.predict(list(locals_), [], x)


def parameter_count(model: ReconstructionModel) -> dict[str, int]:
    """Global and local parameter counts (what is sent and what stays on the device)."""
    def count(specs: Sequence[Any]) -> int:
        return int(sum(np.prod(v.shape, dtype=np.int64) for v in specs))

    return {"global": count(model.global_variables), "local": count(model.local_variables)}


__all__ = ["VARIANTS", "FineTuned", "NextWordSizes", "nextword_model", "parameter_count", "tf"]
