"""Losses and metrics beyond MSE: sparse categorical cross-entropy with padding masked, accuracy that does
not count padding, out-of-vocabulary or end-of-sentence targets, and reconstruct-then-evaluate for a Keras
sequence model with a local layer."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from fedrecon.core.algorithm import FedRecon
from fedrecon.core.batching import ClientExamples, pack_clients
from fedrecon.core.client_work import ClassSums
from fedrecon.core.config import FedReconConfig, OptimizerSpec
from fedrecon.core.keras_model import KerasReconstructionModel
from fedrecon.core.objectives import MSE, SparseCategoricalCrossentropy, objective_from_config

PAD, EOS, OOV = 0, 2, 7
CE = SparseCategoricalCrossentropy(pad_id=PAD, accuracy_excludes=(EOS, OOV))


def test_accuracy_counts_only_real_in_vocabulary_targets() -> None:
    # One client, one sequence of five targets: 3 (right), 2=EOS (right, not counted), 7=OOV (wrong, not
    # counted), 4 (wrong), 0=pad (not a target at all).
    y = tf.constant([[[3.0, 2.0, 7.0, 4.0, 0.0]]])
    guess = [3, 2, 5, 5, 5]
    logits = tf.one_hot([[guess]], 8) * 10.0
    loss_sum, units, correct, counted = (t.numpy()[0] for t in CE.sums(y, logits, tf.ones([1, 1])))
    assert (units, correct, counted) == (4.0, 1.0, 2.0)  # pad is no unit; EOS and OOV are not counted
    per_target = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=[3, 2, 7, 4], logits=tf.one_hot(
        guess[:4], 8) * 10.0).numpy()
    assert loss_sum == pytest.approx(per_target.sum(), rel=1e-6)


def test_per_class_sums_count_what_accuracy_counts_by_target_and_by_prediction() -> None:
    # Client 0 as above: 3 (right), EOS and OOV (not counted, whatever was predicted), 4 (predicted 5),
    # pad. Client 1: 4 (right), 3 (predicted 4).
    y = tf.constant([[[3.0, 2.0, 7.0, 4.0, 0.0]], [[4.0, 3.0, 0.0, 0.0, 0.0]]])
    logits = tf.one_hot([[[3, 2, 5, 5, 5]], [[4, 4, 1, 1, 1]]], 8) * 10.0
    targets, correct, predicted = (t.numpy() for t in CE.class_sums(y, logits, tf.ones([2, 1])))
    np.testing.assert_array_equal(targets, [0, 0, 0, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(correct, [0, 0, 0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(predicted, [0, 0, 0, 1, 2, 1, 0, 0])
    rows = ClassSums(CE.name, dict(zip(CE.class_names, (targets, correct, predicted), strict=True))).rows(
        [f"w{i}" for i in range(8)], top=2)
    assert rows == [  # both targeted twice; 4 predicted more often
        {"class": 4, "label": "w4", "targets": 2, "predicted": 2, "recall": 0.5, "precision": 0.5},
        {"class": 3, "label": "w3", "targets": 2, "predicted": 1, "recall": 0.5, "precision": 1.0}]


def test_rating_classes_are_true_ratings_with_their_own_rmse() -> None:
    # One client: ratings 1, 5, 5 and a padded slot (mask 0) whose rating 3 is no example.
    y = tf.constant([[1.0, 5.0, 5.0, 3.0]])
    pred = tf.constant([[2.0, 4.8, 5.0, 3.0]])
    mask = tf.constant([[1.0, 1.0, 1.0, 0.0]])
    sums = dict(zip(MSE.class_names, (t.numpy() for t in MSE.class_sums(y, pred, mask)), strict=True))
    assert sums["count"][[1, 3, 5]].tolist() == [1, 0, 2]
    rows = ClassSums(MSE.name, sums).rows()
    assert [r["rating"] for r in rows] == [1, 5] and [r["count"] for r in rows] == [1, 2]
    assert rows[0]["rmse"] == pytest.approx(1.0) and rows[0]["accuracy"] == 0.0
    assert rows[1]["rmse"] == pytest.approx(np.sqrt(0.04 / 2), rel=1e-5) and rows[1]["accuracy"] == 1.0


def test_padding_changes_neither_loss_nor_gradient() -> None:
    rng = np.random.default_rng(0)
    logits = tf.Variable(rng.normal(size=(1, 2, 4, 8)).astype(np.float32))
    y = tf.constant([[[3, 4, 5, 0], [1, 0, 0, 0]]], tf.float32)  # padded sequences
    with tf.GradientTape() as tape:
        padded = CE.loss(y, logits, tf.ones([1, 2]))
    g_padded = tape.gradient(padded, logits).numpy()
    # the same targets without padding: the first three of row 0 and the first of row 1
    labels = [3, 4, 5, 1]
    with tf.GradientTape() as tape:
        picked = tf.stack([logits[0, 0, 0], logits[0, 0, 1], logits[0, 0, 2], logits[0, 1, 0]])
        plain = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=picked))
    g_plain = tape.gradient(plain, logits).numpy()
    assert padded.numpy()[0] == pytest.approx(plain.numpy(), rel=1e-6)
    np.testing.assert_allclose(g_padded, g_plain, atol=1e-7)
    # a padded example slot (mask 0) is no unit either
    with_empty = CE.loss(tf.concat([y, tf.constant([[[6, 6, 6, 6]]], tf.float32)], 1),
                         tf.concat([logits, logits[:, :1]], 1), tf.constant([[1.0, 1.0, 0.0]]))
    assert with_empty.numpy()[0] == pytest.approx(plain.numpy(), rel=1e-6)


def test_objectives_round_trip_and_unknown_names_are_refused() -> None:
    assert objective_from_config(CE.config()) == CE
    assert objective_from_config("mse").config() == {"name": "mse", "tolerance": 0.5}
    with pytest.raises(ValueError, match="unknown objective 'hinge'"):
        objective_from_config("hinge")


def _sequence_model() -> KerasReconstructionModel:
    keras.utils.set_random_seed(0)
    tokens = keras.Input(shape=(5,), dtype="int32")
    x = keras.layers.Embedding(8, 4, name="embedding")(tokens)
    x = keras.layers.Dense(6, activation="tanh", name="hidden")(x)
    x = keras.layers.Dense(6, name="adapter", kernel_initializer="zeros")(x)  # personal
    logits = keras.layers.Dense(8, name="logits")(x)
    return KerasReconstructionModel(keras.Model(tokens, logits), ["adapter"], objective=CE)


def test_reconstruct_then_evaluate_a_keras_sequence_model() -> None:
    """Evaluation without reconstruction steps scores the model as Keras computes it; with steps the
    local adapter moves, the loss on the client's own held-out data drops, and a round trains."""
    model = _sequence_model()
    rng = np.random.default_rng(3)
    starts = rng.integers(0, 7, size=(12, 1))
    pattern = ((starts + np.arange(6)) % 7 + 1).astype(np.int32)  # the next token is learnable
    seqs = pattern.copy()
    seqs[:, 4:] = np.where(rng.random((12, 2)) < 0.5, PAD, seqs[:, 4:])  # some padding at the end
    client = ClientExamples(x=seqs[:, :5], y=seqs[:, 1:].astype(np.float32))
    globals_ = model.initial_globals(0)

    def evaluate(examples: ClientExamples, steps: int) -> dict[str, float]:
        config = FedReconConfig(recon_epochs=20, eval_recon_epochs=steps, eval_recon_steps_max=steps,
                                reconstruction_optimizer=OptimizerSpec("sgd", 2.0))
        packed = pack_clients(model, [examples], config, batch_size=3, local_rngs=[np.random.default_rng(0)],
                              evaluation=True)
        return FedRecon(model, config).client_step.evaluate(globals_, packed).metrics()

    scored = evaluate(client, 0)
    config0 = FedReconConfig(eval_recon_epochs=0, eval_recon_steps_max=0)
    sums = FedRecon(model, config0).client_step.evaluate(globals_, pack_clients(
        model, [client], config0, batch_size=3, local_rngs=[np.random.default_rng(0)], evaluation=True))
    held_out = np.concatenate([np.arange(3, 6), np.arange(9, 12)])  # odd batches of 3
    logits = model.keras_model(seqs[held_out, :5]).numpy()
    targets = seqs[held_out, 1:]
    real = targets != PAD
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits).numpy()
    counted = real & (targets != EOS) & (targets != OOV)
    assert scored["loss"] == pytest.approx(ce[real].mean(), rel=1e-5)
    assert scored["accuracy"] == pytest.approx((logits.argmax(-1) == targets)[counted].mean(), abs=1e-6)
    assert scored["num_examples"] == counted.sum()
    # Per class: the same predictions, counted by their target and by their guess.
    assert sums.per_class is not None
    per_class = sums.per_class.sums
    guesses = logits.argmax(-1)
    np.testing.assert_array_equal(per_class["targets"], np.bincount(targets[counted], minlength=8))
    np.testing.assert_array_equal(per_class["predicted"], np.bincount(guesses[counted], minlength=8))
    np.testing.assert_array_equal(per_class["correct"], np.bincount(
        targets[counted & (guesses == targets)], minlength=8))
    # On the unpadded pattern, reconstructing the adapter lowers the loss on the held-out batches.
    plain = ClientExamples(x=pattern[:, :5], y=pattern[:, 1:].astype(np.float32))
    assert evaluate(plain, 20)["loss"] < evaluate(plain, 0)["loss"] - 0.01
    round_config = FedReconConfig(client_optimizer=OptimizerSpec("sgd", 0.5))
    packed = pack_clients(model, [client, client], round_config, batch_size=3,
                          local_rngs=[np.random.default_rng(1), np.random.default_rng(2)])
    trained = FedRecon(model, round_config).client_step.train(globals_, packed)
    assert trained.finite.all() and max(np.abs(d).max() for d in trained.weighted_delta_sum) > 1e-4
