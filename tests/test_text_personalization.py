"""Personalized next-word prediction in the client library: a user's own texts are encoded with the task's
vocabulary, the personal layer is reconstructed from them, and ``next_words`` completes a prefix exactly as
the plain Keras model would score the window training cut (issue 12: a user never seen in training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedrecon.client import Personalization
from fedrecon.core.config import FedReconConfig, OptimizerSpec
from fedrecon.core.matrix_factorization import MatrixFactorization
from fedrecon.core.nextword import NextWordSizes, nextword_model
from fedrecon.model_file import ModelFile
from fedrecon.text_encoding import (
    BOS,
    SPECIAL,
    Vocabulary,
    encoding_of,
    examples,
    prefix_window,
    text_description,
)

WORDS = ("the", "king", "hark", "queen", "my", "lord", ",", ".")
SEQ_LEN = 4


def test_a_prefix_is_windowed_as_training_windows_its_sentence() -> None:
    vocabulary = Vocabulary(WORDS, oov_buckets=3)
    ids = {w: SPECIAL + i for i, w in enumerate(WORDS)}
    # "the king my lord , hark ." in training: inputs [BOS the king my | lord , hark .], targets shifted.
    trained = examples(["The king my lord, hark."], vocabulary, SEQ_LEN)
    x, position = prefix_window("Good day. The king my lord,", vocabulary, SEQ_LEN)
    # The last sentence only; its 6th token (",") sits in the second window at position 1, whose target in
    # training is the next word, "hark".
    assert position == 1
    np.testing.assert_array_equal(x[0, :2], trained.x[1, :2])
    assert trained.y[1, position] == ids["hark"]
    assert (x[0, 2:] == 0).all()  # nothing after the prefix: padding
    # An unknown word keeps its OOV id and bucket, as in training.
    x, position = prefix_window("my zounds", vocabulary, SEQ_LEN)
    assert position == 2 and x[0, 2, 0] == vocabulary.oov_id and x[0, 2, 1] == vocabulary.bucket("zounds")
    # A finished sentence, or nothing at all, asks for the first word of a new one: BOS alone.
    for prefix in ("Hark the king. ", ""):
        x, position = prefix_window(prefix, vocabulary, SEQ_LEN)
        assert position == 0 and x[0, 0, 0] == BOS and (x[0, 1:] == 0).all()


def _model_file(tmp_path: Path) -> tuple[Path, Vocabulary, object]:
    vocabulary = Vocabulary(WORDS, oov_buckets=3)
    model = nextword_model(NextWordSizes(vocabulary.size, seq_len=SEQ_LEN, embedding=8, hidden=8),
                           "personal_layer", accuracy_excludes=vocabulary.accuracy_excludes(), seed=3)
    config = FedReconConfig(reconstruction_optimizer=OptimizerSpec("sgd", 1.0), recon_epochs=20,
                            recon_steps_max=200)
    description = {**model.config(), "text": text_description(vocabulary, SEQ_LEN)}
    path = tmp_path / "nextword.npz"
    ModelFile(task="nextword", version=4, model_spec=description,
              names=[v.name for v in model.global_variables], arrays=model.initial_globals(0),
              training=config.to_dict(), batch_size=4).save(path)
    return path, vocabulary, model


def test_next_words_are_the_keras_models_own_scores_for_the_prefix(tmp_path: Path) -> None:
    """With the adapter at its zero start (no reconstruction), suggestions are the plain Keras model's
    softmax at the prefix's position, restricted to vocabulary words and ranked."""
    path, vocabulary, model = _model_file(tmp_path)
    f = ModelFile.load(path)
    assert encoding_of(f.model_spec) == (vocabulary, SEQ_LEN)  # the encoding travels in the file
    fitted = Personalization.from_model_file(str(path), ["My lord, the king."], rng=np.random.default_rng(0))
    start = Personalization(fitted.model, 4, fitted.globals,
                            [np.zeros_like(v) for v in fitted.locals], frozenset(), text=fitted.text)
    suggestions = start.next_words("The king my lord", k=len(WORDS))
    keras_model = model.keras_model  # type: ignore[attr-defined]
    model.set_globals(f.arrays)  # type: ignore[attr-defined]
    for layer in keras_model.layers:
        if layer.name == "adapter":
            layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])
    x, position = prefix_window("The king my lord", vocabulary, SEQ_LEN)
    logits = np.asarray(keras_model(x), np.float64)[0, position]
    expected = np.exp(logits - logits.max())
    expected /= expected.sum()
    assert [w for w, _ in suggestions] == [WORDS[i - SPECIAL] for i in
                                           np.argsort(-expected[SPECIAL:SPECIAL + len(WORDS)],
                                                      kind="stable") + SPECIAL]
    np.testing.assert_allclose([p for _, p in suggestions],
                               sorted(expected[SPECIAL:SPECIAL + len(WORDS)], reverse=True), rtol=1e-5)
    assert sum(p for _, p in suggestions) < 1.0  # BOS, EOS, padding and OOV hold the rest
    assert len(start.next_words("The king", k=3)) == 3
    with pytest.raises(ValueError, match="k must be"):
        start.next_words("the", k=0)


def test_reconstruction_from_a_users_texts_raises_its_own_words(tmp_path: Path) -> None:
    """A user who always follows "my" with "hark" gets "hark" suggested after "my" far more strongly once
    the personal adapter is reconstructed from their texts (the globals never move)."""
    path, _, _ = _model_file(tmp_path)
    texts = ["My hark, my hark. The king, my hark."] * 12
    fitted = Personalization.from_model_file(str(path), texts, rng=np.random.default_rng(1))
    start = Personalization(fitted.model, 4, fitted.globals,
                            [np.zeros_like(v) for v in fitted.locals], frozenset(), text=fitted.text)
    before = dict(start.next_words("The queen, my", k=len(WORDS)))
    after = dict(fitted.next_words("The queen, my", k=len(WORDS)))
    assert after["hark"] > 2 * before["hark"], (before, after)
    assert fitted.next_words("The queen, my", k=1)[0][0] == "hark", after
    assert any(np.abs(v).max() > 0 for v in fitted.locals)  # the adapter moved from its zero start
    np.testing.assert_array_equal(fitted.globals[0], ModelFile.load(path).arrays[0])


def test_texts_for_a_model_without_text_and_text_calls_on_ratings_are_refused(tmp_path: Path) -> None:
    model = MatrixFactorization(20, 3)
    with pytest.raises(ValueError, match="takes no text"):
        Personalization.fit(model, FedReconConfig(), model.initial_globals(0), ["hark the king"],
                            batch_size=4, version=0)
    path, _, _ = _model_file(tmp_path)
    with pytest.raises(ValueError, match="no words"):
        Personalization.from_model_file(str(path), ["", "   "])
    ratings = Personalization(model, 0, model.initial_globals(0), [np.zeros(3, np.float32)], frozenset())
    with pytest.raises(TypeError, match="takes no text"):
        ratings.next_words("the")
