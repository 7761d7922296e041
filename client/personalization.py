"""Personalized inference for a user the model has never seen: reconstruct its local variables, then predict.

The user's data never leaves the device: the global variables come down, the reconstruction runs here
(every batch reconstructs, nothing is held out), and predictions are served from the result. Items are the
dataset's own ids when the task has an item vocabulary (``vocabulary``), the model's indices otherwise.

A next-word model (its description carries a ``text`` encoding: ``fedrecon.text_encoding``) personalizes
from the user's own texts, encoded with the task's vocabulary, and completes a prefix with ``next_words``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedrecon.client.model_file import ModelFile
from fedrecon.client.vocabulary import ItemVocabulary
from fedrecon.core.batching import ClientExamples
from fedrecon.core.config import FedReconConfig
from fedrecon.core.model_spec import model_from_config
from fedrecon.text_encoding import (
    BOS,
    EOS,
    PAD,
    SPECIAL,
    Vocabulary,
    device_examples,
    encoding_of,
    prefix_window,
)

if TYPE_CHECKING:
    from fedrecon.core.model import ReconstructionModel


@dataclass(frozen=True)
class Personalization:
    """A user's reconstructed local variables beside the global model version they were fitted to."""

    model: ReconstructionModel
    version: int
    globals: list[np.ndarray]
    locals: list[np.ndarray]
    seen_items: frozenset[int]  # the model's indices of the items this user rated (none for text)
    vocabulary: ItemVocabulary = field(default_factory=ItemVocabulary)
    dropped_examples: int = 0  # examples whose item the task's vocabulary does not have
    text: tuple[Vocabulary, int] | None = None  # a next-word model's encoding: vocabulary, sequence length

    @classmethod
    def fit(cls, model: ReconstructionModel, config: FedReconConfig, globals_: list[np.ndarray],
            examples: ClientExamples | Sequence[str], *, batch_size: int, version: int,
            rng: np.random.Generator | None = None, vocabulary: ItemVocabulary | None = None,
            text: tuple[Vocabulary, int] | None = None) -> Personalization:
        """Reconstruct against ``globals_`` on ``examples``: items as the dataset's ids when ``vocabulary``
        is given, as the model's indices otherwise; or, for a next-word model, the user's texts (a list of
        strings), encoded with ``text`` (the task's encoding: ``encoding_of`` of its model description)."""
        from fedrecon.core.client_work import ClientStep  # TensorFlow: imported when a client step runs

        vocabulary = vocabulary or ItemVocabulary()
        if not isinstance(examples, ClientExamples):
            examples = device_examples(examples, text, model="this model")
            if not len(examples):
                raise ValueError("the texts hold no words to personalize from")
        dense, dropped = vocabulary.examples(examples)
        step = ClientStep(model, config)
        locals_ = step.reconstruct(globals_, dense, batch_size=batch_size,
                                   rng=rng if rng is not None else np.random.default_rng())
        seen = frozenset() if text is not None else frozenset(
            int(i) for i in np.asarray(dense.x).reshape(len(dense), -1)[:, 0])
        return cls(model, version, list(globals_), locals_, seen, vocabulary, dropped, text)

    @classmethod
    def from_model_file(cls, path: str, examples: ClientExamples | Sequence[str], *,
                        rng: np.random.Generator | None = None, vocabulary: ItemVocabulary | None = None
                        ) -> Personalization:
        """Personalize against an exported model version, no coordinator needed. Items are the dataset's
        ids per ``vocabulary`` (default: the file's, if it has one; else the model's indices); a next-word
        model's file carries its text encoding, so ``examples`` may be the user's texts."""
        f = ModelFile.load(path)  # type: ignore[arg-type]
        if vocabulary is None:  # the file's own vocabulary, once model files carry one
            vocabulary = ItemVocabulary.of(tuple(getattr(f, "item_ids", None) or ()))
        return cls.fit(model_from_config(f.model_spec), FedReconConfig.from_dict(f.training), f.arrays,
                       examples, batch_size=f.batch_size, version=f.version, rng=rng, vocabulary=vocabulary,
                       text=encoding_of(f.model_spec))

    def next_words(self, prefix: str, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` likeliest next words after ``prefix`` for this user, with their probabilities, best
        first: a keyboard's suggestions. Only the vocabulary's words are suggested (not the end of the
        sentence, nor "unknown word"); the probabilities are the model's over all its classes, so they sum
        to less than 1. A prefix ending a sentence asks for the first word of the next one."""
        if self.text is None:
            raise TypeError(f"{type(self.model).__name__} takes no text (its task has no text encoding); "
                            "use predict or recommend")
        if k < 1:
            raise ValueError("k must be at least 1")
        words_, seq_len = self.text
        x, position = prefix_window(prefix, words_, seq_len)
        # The model predicts per client (a leading client axis on every argument): this user is client 0.
        logits = np.asarray(self.model.predict([g[None] for g in self.globals],
                                               [v[None] for v in self.locals], x[None]), np.float64)
        logits = logits.reshape(-1, seq_len, logits.shape[-1])[0, position]
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        suggestable = probabilities.copy()
        suggestable[[PAD, BOS, EOS, words_.oov_id]] = -1.0
        best = np.argsort(-suggestable, kind="stable")[:min(k, len(words_.words))]
        return [(words_.words[i - SPECIAL], float(probabilities[i])) for i in best]

    def _scorer(self) -> Any:
        score = getattr(self.model, "score_items", None)
        if score is None:
            raise TypeError(f"{type(self.model).__name__} does not score items; use its own predict")
        return score

    def predict(self, items: np.ndarray) -> np.ndarray:
        """Predicted ratings of ``items`` (the dataset's ids) for this user; unknown ids are a ValueError."""
        dense, known = self.vocabulary.to_dense(np.asarray(items, np.int64))
        if not known.all():
            unknown = np.asarray(items, np.int64)[~known][:5].tolist()
            raise ValueError(f"items {unknown} are not in the task's item vocabulary")
        return np.asarray(self._scorer()(self.globals, self.locals))[dense]

    def recommend(self, k: int = 10) -> list[tuple[int, float]]:
        """Top-``k`` (item id, predicted rating) among items this user has not rated yet, best first; item
        ids are the dataset's own (e.g. MovieLens movie ids) when the task has an item vocabulary."""
        self._scorer()
        top = self.model.recommend(self.globals, self.locals, k,  # type: ignore[attr-defined]
                                   exclude=sorted(self.seen_items))
        ids = self.vocabulary.to_ids(np.asarray([i for i, _ in top], np.int64))
        return [(int(item), float(score)) for item, (_, score) in zip(ids, top, strict=True)]
