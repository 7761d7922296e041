"""What a model is trained to minimise and how it is scored: the loss and metrics of a task, as data.

The client step (``client_work``) is the same for every model; only the objective differs between rating
prediction (mean squared error, the paper's MovieLens task) and next-word prediction (sparse categorical
cross-entropy over tokens, the paper's Stack Overflow task). An objective is a plain frozen value with a
JSON ``config()``, so a task can name it and a device rebuild it, and it computes on a leading client axis:

- ``loss(y, pred, mask)``: each client's training loss on one padded batch, shape ``[C]``. A padded example
  (``mask`` 0) and, for token targets, a padding token contribute neither loss nor gradient, so a padded
  batch trains exactly like the unpadded one.
- ``sums(y, pred, mask)``: per-client sums for reporting and evaluation, ``[C]`` each: the loss summed over
  its units and how many units there were, the correct predictions and how many predictions were counted.
- ``class_sums(y, pred, mask)``: the same scoring broken down by class, summed over clients, ``[K]`` each
  (``class_names`` says what they are): for next-word prediction per target word (how often it was the
  target, how often it was predicted correctly, how often it was predicted at all), for ratings per true
  rating value (count, squared error, within tolerance). They show what a single accuracy hides: a
  model that predicts "," everywhere, or ratings pulled to the mean (large errors at 1 and 5 stars).
  Simulation-side only: a device's evaluation report carries its totals, never per-word counts (they
  would tell the coordinator which words its user writes).

Accuracy for next-word prediction follows the paper (Singhal et al., 2021, after Reddi et al., 2021):
targets that are padding, out-of-vocabulary or end-of-sentence tokens are not counted, since predicting
them says little about a model's use as a keyboard.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedrecon.core.lazy_tensorflow import tf

#: rating classes of ``MeanSquaredError.class_sums``: true ratings rounded to 0..10
RATING_CLASSES = 11


class Objective(abc.ABC):
    """A loss with its metrics, on client-batched tensors (``y``, ``mask`` ``[C, B, ...]``)."""

    name: str = ""

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """A JSON description (``objective_from_config`` rebuilds the same objective)."""

    @abc.abstractmethod
    def loss(self, y: tf.Tensor, pred: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
        """Each client's mean loss over the real units of one batch, ``[C]``."""

    @abc.abstractmethod
    def sums(self, y: tf.Tensor, pred: tf.Tensor, mask: tf.Tensor
             ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """Per client: (loss sum, loss units, correct predictions, counted predictions), each ``[C]``."""

    #: names of ``class_sums``' outputs, in order
    class_names: tuple[str, ...] = ()

    @abc.abstractmethod
    def class_sums(self, y: tf.Tensor, pred: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, ...]:
        """Per class, summed over clients and batches: ``[K]`` each, as named by ``class_names``."""

    def prepare(self, pred: tf.Tensor) -> tf.Tensor:
        """The model's raw output per client ``[B, ...]`` into the shape ``loss`` expects."""
        return pred


@dataclass(frozen=True)
class MeanSquaredError(Objective):
    """Rating prediction: squared error per example; "correct" means ``|y - ŷ| <= tolerance``."""

    tolerance: float = 0.5
    name: str = field(default="mse", init=False)
    class_names: tuple[str, ...] = field(default=("count", "squared_error", "correct"), init=False)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "tolerance": self.tolerance}

    def prepare(self, pred: tf.Tensor) -> tf.Tensor:
        return tf.reshape(pred, [-1])  # a Keras model's [B, 1] output: one rating per example

    def loss(self, y: tf.Tensor, pred: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
        se = tf.square(pred - y) * mask
        return tf.reduce_sum(se, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)

    def sums(self, y: tf.Tensor, pred: tf.Tensor, mask: tf.Tensor
             ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        count = tf.reduce_sum(mask, axis=1)
        se = tf.reduce_sum(tf.square(pred - y) * mask, axis=1)
        correct = tf.reduce_sum(tf.cast(tf.abs(pred - y) <= self.tolerance, tf.float32) * mask, axis=1)
        return se, count, correct, count

    def class_sums(self, y: tf.Tensor, pred: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, ...]:
        # Classes are true ratings rounded to whole values 0..RATING_CLASSES-1 (MovieLens' 1-5 stars).
        value = tf.reshape(tf.clip_by_value(tf.round(y), 0.0, RATING_CLASSES - 1.0), [-1])
        segment = tf.cast(value, tf.int32)
        m = tf.reshape(mask, [-1])
        se = tf.reshape(tf.square(pred - y), [-1]) * m
        ok = tf.reshape(tf.cast(tf.abs(pred - y) <= self.tolerance, tf.float32), [-1]) * m
        return tuple(tf.math.unsorted_segment_sum(t, segment, RATING_CLASSES) for t in (m, se, ok))


@dataclass(frozen=True)
class SparseCategoricalCrossentropy(Objective):
    """Classification over ``V`` classes from logits; targets are class ids (carried as float32 by the
    batches, exact below 2**24). For sequences (``y`` ``[C, B, T]``, logits ``[C, B, T, V]``) a target
    equal to ``pad_id`` is padding: no loss, no gradient, not counted. ``accuracy_excludes`` lists further
    target ids that accuracy does not count (out-of-vocabulary buckets, end of sentence), as the paper does.
    The loss is the mean over a client's non-padding targets in the batch (Keras' masked mean)."""

    pad_id: int | None = 0
    accuracy_excludes: tuple[int, ...] = ()
    name: str = field(default="sparse_categorical_crossentropy", init=False)
    class_names: tuple[str, ...] = field(default=("targets", "correct", "predicted"), init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "accuracy_excludes", tuple(int(i) for i in self.accuracy_excludes))

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "pad_id": self.pad_id, "accuracy_excludes": list(self.accuracy_excludes)}

    def _weights(self, y: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(units per target, targets counted by accuracy), both shaped like ``y``, summed over all but C."""
        while mask.shape.rank < y.shape.rank:
            mask = mask[..., None]
        units = mask * tf.ones_like(y)
        if self.pad_id is not None:
            units = units * tf.cast(tf.not_equal(y, float(self.pad_id)), tf.float32)
        counted = units
        if self.accuracy_excludes:
            excluded = tf.constant(self.accuracy_excludes, tf.float32)
            hit = tf.reduce_any(tf.equal(y[..., None], excluded), axis=-1)
            counted = counted * (1.0 - tf.cast(hit, tf.float32))
        return units, counted

    def _per_target(self, y: tf.Tensor, pred: tf.Tensor) -> tf.Tensor:
        labels = tf.cast(y, tf.int32)
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=pred)

    @staticmethod
    def _per_client(t: tf.Tensor) -> tf.Tensor:
        return tf.reduce_sum(tf.reshape(t, [tf.shape(t)[0], -1]), axis=1)

    def loss(self, y: tf.Tensor, pred: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
        units, _ = self._weights(y, mask)
        ce = self._per_target(y, pred) * units
        return self._per_client(ce) / tf.maximum(self._per_client(units), 1.0)

    def sums(self, y: tf.Tensor, pred: tf.Tensor, mask: tf.Tensor
             ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        units, counted = self._weights(y, mask)
        ce = self._per_target(y, pred) * units
        hits = tf.cast(tf.equal(tf.cast(tf.argmax(pred, axis=-1), tf.float32), y), tf.float32) * counted
        return (self._per_client(ce), self._per_client(units), self._per_client(hits),
                self._per_client(counted))

    def class_sums(self, y: tf.Tensor, pred: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, ...]:
        # Over the targets accuracy counts: per true class, how often it was the target and predicted
        # correctly (recall = correct / targets); per predicted class, how often it was predicted
        # (precision = correct / predicted).
        _, counted = self._weights(y, mask)
        classes = tf.shape(pred)[-1]
        counted = tf.reshape(counted, [-1])
        target = tf.reshape(tf.cast(y, tf.int32), [-1])
        guess = tf.reshape(tf.cast(tf.argmax(pred, axis=-1), tf.int32), [-1])
        hits = tf.cast(tf.equal(guess, target), tf.float32) * counted
        return (tf.math.unsorted_segment_sum(counted, target, classes),
                tf.math.unsorted_segment_sum(hits, target, classes),
                tf.math.unsorted_segment_sum(counted, guess, classes))


MSE = MeanSquaredError()
OBJECTIVES = ("mse", "sparse_categorical_crossentropy")


def objective_from_config(config: Mapping[str, Any] | str | None) -> Objective:
    """The objective a description names (a name alone takes the defaults); ``ValueError`` otherwise."""
    if config is None:
        return MSE
    fields: dict[str, Any] = {"name": config} if isinstance(config, str) else dict(config)
    name = fields.pop("name", None)
    try:
        if name == "mse":
            return MeanSquaredError(**fields)
        if name == "sparse_categorical_crossentropy":
            excludes: Sequence[int] = fields.pop("accuracy_excludes", ())
            return SparseCategoricalCrossentropy(accuracy_excludes=tuple(excludes), **fields)
    except TypeError as err:
        raise ValueError(f"bad {name} objective {dict(fields)}: {err}") from err
    raise ValueError(f"unknown objective {name!r} (known: {', '.join(OBJECTIVES)})")
