"""A Keras model wrapped with its local layers trains exactly like the direct matrix factorization."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from fedrecon.core.algorithm import FedRecon
from fedrecon.core.batching import ClientExamples, pack_clients
from fedrecon.core.config import FedReconConfig, OptimizerSpec
from fedrecon.core.keras_model import KerasReconstructionModel
from fedrecon.core.matrix_factorization import MatrixFactorization

NUM_ITEMS, FACTORS, BATCH = 10, 4, 3


class UserVector(keras.layers.Layer):
    """The user's embedding as a layer: scores item vectors against one local vector."""

    def __init__(self, dim: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.dim = dim
        self.embedding_initializer = keras.initializers.RandomUniform(-0.05, 0.05, seed=1)

    def build(self, input_shape: tuple[int, ...]) -> None:
        self.embedding = self.add_weight(shape=(self.dim,), initializer=self.embedding_initializer,
                                         name="embedding")

    def call(self, item_vectors):  # type: ignore[no-untyped-def]
        return keras.ops.sum(item_vectors * self.embedding, axis=-1)


def _keras_mf() -> tuple[keras.Model, keras.layers.Layer]:
    keras.utils.set_random_seed(0)
    items = keras.Input(shape=(), dtype="int32")
    item_vectors = keras.layers.Embedding(NUM_ITEMS, FACTORS, name="items")(items)
    user = UserVector(FACTORS, name="user")
    return keras.Model(items, user(item_vectors)), user


def _clients() -> list[ClientExamples]:
    rng = np.random.default_rng(0)
    return [ClientExamples(x=rng.choice(NUM_ITEMS, n, replace=False).astype(np.int32),
                           y=rng.integers(1, 6, n).astype(np.float32)) for n in (8, 5, 10)]


def test_variable_groups_follow_the_local_layers() -> None:
    keras_model, user = _keras_mf()
    model = KerasReconstructionModel.from_keras_model_and_layers(keras_model, [user])
    assert [v.name for v in model.global_variables] == ["items/embeddings"]
    assert [v.name for v in model.local_variables] == ["user/embedding"]
    assert model.global_trainable == (0,) and model.local_trainable == (0,)
    a = model.initial_locals(np.random.default_rng(1))[0]
    b = model.initial_locals(np.random.default_rng(2))[0]
    assert a.shape == (FACTORS,) and np.abs(a).max() <= 0.05 and not np.array_equal(a, b)


def test_keras_round_equals_direct_matrix_factorization_round() -> None:
    keras_model, user = _keras_mf()
    wrapped = KerasReconstructionModel(keras_model, [user])
    direct = MatrixFactorization(NUM_ITEMS, FACTORS)
    config = FedReconConfig(client_optimizer=OptimizerSpec("sgd", 0.3), recon_epochs=2,
                            post_recon_epochs=2)
    clients = _clients()
    globals_ = wrapped.initial_globals(0)
    rngs = [np.random.default_rng(c) for c in range(3)]
    packed_direct = pack_clients(direct, clients, config, batch_size=BATCH, local_rngs=rngs)
    packed_keras = pack_clients(wrapped, clients, config, batch_size=BATCH,
                                local_rngs=[np.random.default_rng(c) for c in range(3)])
    packed_keras = dataclasses.replace(packed_keras, locals=packed_direct.locals)
    results = []
    for model, packed in ((direct, packed_direct), (wrapped, packed_keras)):
        algorithm = FedRecon(model, config)
        out = algorithm.client_step.train(globals_, packed)
        results.append(out)
    np.testing.assert_allclose(results[1].weighted_delta_sum[0], results[0].weighted_delta_sum[0], atol=1e-6)
    np.testing.assert_array_equal(results[1].weights, results[0].weights)
    assert np.abs(results[0].weighted_delta_sum[0]).max() > 1e-3
