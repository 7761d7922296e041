"""Parity with TensorFlow Federated's ``build_fed_recon`` on a Keras task: next-word prediction with a
personal layer (``core.nextword``, the ``personal_layer`` variant; TFF 0.87, ``make tff-env``).

The TFF worker rebuilds the task's Keras 3 description in tf.keras 2 (``tff/keras_bridge.py``). Both engines
get the same synthetic speakers, the same initial global weights, the same clients, the even/odd batch split
and the same step caps; the personal adapter starts at zero in both (a start TFF can share with every
client). A round is then a deterministic function of its inputs and the engines must agree up to float32
summation order: new global weights within 1e-5 (max abs), and the training loss (cross-entropy per
non-padding token, which the worker also reports in fedrecon's definition) within 1e-5. The tolerance is
shown to be tight enough to catch a real difference: one reconstruction step fewer on fedrecon's side
moves the weights by more than it.

Server SGD 1.0, so the new globals are the initial ones plus the clients' weighted mean delta and any
difference between the client steps shows unscaled (Adam's first step would scale every difference up to
the learning rate).

Without a TFF environment these tests skip on a user's clone and fail under CI (which builds it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import keras
import pytest

from fedrecon.core.aggregation import UNBOUNDED_MEAN
from fedrecon.core.algorithm import FedRecon
from fedrecon.core.config import FedReconConfig, OptimizerSpec
from fedrecon.core.keras_model import KerasReconstructionModel
from fedrecon.core.nextword import NextWordSizes, nextword_model
from fedrecon.core.objectives import SparseCategoricalCrossentropy
from fedrecon.simulations.runner import Simulation, SimulationSettings
from fedrecon.simulations.text import FederatedText, split_texts, synthetic_texts
from fedrecon.simulations.tff_backend import SideBySide, TffEngine, TffError, max_abs_difference

ONE_ROUND_TOLERANCE = 1e-5
SEQ_LEN = 8
CONFIG = FedReconConfig(
    reconstruction_optimizer=OptimizerSpec("sgd", 0.5), client_optimizer=OptimizerSpec("sgd", 0.5),
    server_optimizer=OptimizerSpec("sgd", 1.0), recon_epochs=1, recon_steps_max=2, post_recon_epochs=1,
    post_recon_steps_max=3)
SETTINGS = SimulationSettings(clients_per_round=5, batch_size=4)


@pytest.fixture(scope="module")
def text() -> FederatedText:
    """Ten training speakers of 32 sequences (8 batches of 4: reconstruction on the even ones)."""
    return split_texts(synthetic_texts(num_users=12, words_per_user=200), vocab_size=40, seq_len=SEQ_LEN,
                       min_words=50, max_examples_per_user=32)


def personal_layer_model(text: FederatedText) -> KerasReconstructionModel:
    sizes = NextWordSizes(text.vocabulary.size, seq_len=SEQ_LEN, embedding=8, hidden=12, oov_buckets=4)
    return nextword_model(sizes, "personal_layer", accuracy_excludes=text.vocabulary.accuracy_excludes())


@pytest.fixture(scope="module")
def pair(text: FederatedText, tff_env: Path) -> Iterator[SideBySide]:
    with SideBySide(personal_layer_model(text), CONFIG, text.train, {**text.train, **text.validation},
                    SETTINGS, python=tff_env) as side_by_side:
        yield side_by_side


def test_weights_cross_exactly_by_name(pair: SideBySide) -> None:
    # Our globals go into TFF's ModelWeights in the task's variable order and come back bit for bit.
    model = pair.engine.model
    assert [v.name for v in model.global_variables][:2] == ["embedding/embeddings", "lstm/lstm_cell/kernel"]
    assert [v.name for v in model.local_variables] == ["adapter/kernel", "adapter/bias"]
    assert max_abs_difference(pair.engine.current_globals(), pair.initial.globals) == 0.0


def test_one_round_agrees_with_tff_and_a_step_less_does_not(pair: SideBySide, text: FederatedText) -> None:
    assert pair.state_ours.round_num == 0  # the first round of this pair
    difference = pair.step()
    ours, theirs = pair.records[-1]
    print(f"one round: max |Δ| {difference:.2e}; training loss fedrecon {ours.train_loss:.7f}, "
          f"TFF {theirs.train_loss:.7f}")
    assert difference <= ONE_ROUND_TOLERANCE
    assert abs(ours.train_loss - theirs.train_loss) <= ONE_ROUND_TOLERANCE
    assert max_abs_difference(pair.state_ours.globals, pair.initial.globals) > 1e-3  # the round trained

    # The same round with one reconstruction step fewer (fedrecon only): the tolerance catches it.
    fewer = FedRecon(personal_layer_model(text), CONFIG.replace(recon_steps_max=1),
                     aggregation=UNBOUNDED_MEAN)
    other, _ = Simulation(fewer, text.train, SETTINGS).run_round(pair.initial)
    off_by_a_step = max_abs_difference(other.globals, pair.state_theirs.globals)
    print(f"one reconstruction step fewer: max |Δ| {off_by_a_step:.2e}")
    assert off_by_a_step > 10 * ONE_ROUND_TOLERANCE

    # And reconstruct-then-evaluate of unseen speakers under each engine's new model.
    ours_eval, theirs_eval = pair.evaluate(text.validation)
    assert ours_eval["num_examples"] == theirs_eval["num_examples"] > 0
    assert abs(ours_eval["loss"] - theirs_eval["loss"]) <= 1e-4
    assert abs(ours_eval["accuracy"] - theirs_eval["accuracy"]) <= 1e-6


def test_what_tff_cannot_build_is_refused(text: FederatedText, tff_env: Path) -> None:
    # A local start drawn per client (the local OOV embeddings' uniform draw): TFF starts all clients from
    # one value, so the engines could not be compared; refused before any worker starts.
    sizes = NextWordSizes(text.vocabulary.size, seq_len=SEQ_LEN, embedding=8, hidden=12, oov_buckets=4)
    oov = nextword_model(sizes, "local_oov", accuracy_excludes=text.vocabulary.accuracy_excludes())
    with pytest.raises(ValueError, match=r"oov_embedding/embeddings.*random draw"):
        TffEngine(oov, CONFIG, text.validation, batch_size=4, initial_globals=oov.initial_globals(0),
                  python=tff_env)
    # A layer the tf.keras 2 bridge does not build: the worker names it instead of building something else.
    inputs = keras.Input(shape=(SEQ_LEN, 2), dtype="int32")
    x = keras.layers.Embedding(text.vocabulary.size, 8, name="embedding")(inputs[:, :, 0])
    x = keras.layers.LayerNormalization(name="norm")(x)
    x = keras.layers.Dense(8, name="personal", kernel_initializer="zeros")(x)
    logits = keras.layers.Dense(text.vocabulary.size, name="logits")(x)
    normed = KerasReconstructionModel(keras.Model(inputs, logits), ["personal"],
                                      objective=SparseCategoricalCrossentropy())
    with pytest.raises(TffError, match=r"layer 'norm' \(LayerNormalization\).*TFF bridge builds only"):
        TffEngine(normed, CONFIG, text.validation, batch_size=4, initial_globals=normed.initial_globals(0),
                  python=tff_env)
