"""The paper's two baselines, evaluated on the same unseen users as FedRecon.

- FedAvg: the user embedding is made global (one vector shared by all users) so nothing is local; every
  client trains all variables on all its batches; unseen users are scored with the shared model directly.
- Centralized: the same matrix factorization trained on the server over all training users' ratings (each
  training user with its own embedding), then unseen users are reconstructed and evaluated exactly as
  FedRecon's are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from fedrecon.core.batching import ClientExamples
from fedrecon.core.config import FedReconConfig
from fedrecon.core.matrix_factorization import INIT_SCALE, MatrixFactorization


def fedavg_configs(config: FedReconConfig) -> tuple[FedReconConfig, FedReconConfig]:
    """(training, evaluation) settings: train on every batch; score the same held-out batches as FedRecon."""
    return config.replace(split_dataset=False), config.replace(split_dataset=True)


@dataclass(frozen=True)
class CentralizedSettings:
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 0.01
    seed: int = 0


def train_centralized(
    model: MatrixFactorization,
    train: Mapping[int, ClientExamples],
    settings: CentralizedSettings,
    *,
    on_epoch: Callable[[int, list[np.ndarray]], float] | None = None,
) -> tuple[list[np.ndarray], list[dict[str, float]]]:
    """Fit user and item factors on pooled ratings with Adam; return the global variables.

    ``on_epoch(epoch, globals)`` may score the global variables (on validation users) and return an RMSE;
    the epoch with the lowest returned value is kept.
    """
    users = sorted(train)
    user_index = np.concatenate([np.full(len(train[u]), k, np.int32) for k, u in enumerate(users)])
    items = np.concatenate([train[u].x for u in users]).astype(np.int32)
    ratings = np.concatenate([train[u].y for u in users]).astype(np.float32)
    rng = np.random.default_rng(settings.seed)
    tf.random.set_seed(settings.seed)
    init = model.initial_globals(settings.seed)
    names = [v.name for v in model.global_variables]
    item_emb = tf.Variable(init[names.index("item_embedding")])
    user_emb = tf.Variable(rng.uniform(-INIT_SCALE, INIT_SCALE, (len(users), model.num_factors))
                           .astype(np.float32))
    extra: dict[str, tf.Variable] = {}
    if model.use_biases:
        extra = {"item_bias": tf.Variable(init[names.index("item_bias")]),
                 "global_bias": tf.Variable(init[names.index("global_bias")]),
                 "user_bias": tf.Variable(np.zeros(len(users), np.float32))}
    variables = [item_emb, user_emb, *extra.values()]
    optimizer = tf.keras.optimizers.Adam(settings.learning_rate)

    @tf.function(reduce_retracing=True)
    def step(u: tf.Tensor, i: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            pred = tf.reduce_sum(tf.gather(item_emb, i) * tf.gather(user_emb, u), axis=1)
            if extra:
                pred += (tf.gather(extra["item_bias"], i) + tf.gather(extra["user_bias"], u)
                         + extra["global_bias"])
            loss = tf.reduce_mean(tf.square(pred - y))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return loss

    def current_globals() -> list[np.ndarray]:
        values = {"item_embedding": item_emb.numpy(), **{k: v.numpy() for k, v in extra.items()}}
        return [values[n] for n in names]

    history: list[dict[str, float]] = []
    best, best_score = current_globals(), float("inf")
    for epoch in range(1, settings.epochs + 1):
        order = rng.permutation(len(ratings))
        losses = []
        for start in range(0, len(order), settings.batch_size):
            b = order[start:start + settings.batch_size]
            losses.append(float(step(user_index[b], items[b], ratings[b])))
        record = {"epoch": float(epoch), "train_mse": float(np.mean(losses))}
        if on_epoch is not None:
            score = on_epoch(epoch, current_globals())
            record["validation_rmse"] = score
            if score < best_score:
                best, best_score = current_globals(), score
        else:
            best = current_globals()
        history.append(record)
    return best, history
