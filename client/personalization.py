"""Personalized inference for a user the model has never seen: reconstruct its local variables, then predict.

The user's data never leaves the device: the global variables come down, the reconstruction runs here
(every batch reconstructs, nothing is held out), and predictions are served from the result. Items are the
dataset's own ids when the task has an item vocabulary (``vocabulary``), the model's indices otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedrecon.client.model_file import ModelFile
from fedrecon.client.vocabulary import ItemVocabulary
from fedrecon.core.batching import ClientExamples
from fedrecon.core.config import FedReconConfig
from fedrecon.core.model_spec import model_from_config

if TYPE_CHECKING:
    from fedrecon.core.model import ReconstructionModel


@dataclass(frozen=True)
class Personalization:
    """A user's reconstructed local variables beside the global model version they were fitted to."""

    model: ReconstructionModel
    version: int
    globals: list[np.ndarray]
    locals: list[np.ndarray]
    seen_items: frozenset[int]  # the model's indices of the items this user rated
    vocabulary: ItemVocabulary = field(default_factory=ItemVocabulary)
    dropped_examples: int = 0  # examples whose item the task's vocabulary does not have

    @classmethod
    def fit(cls, model: ReconstructionModel, config: FedReconConfig, globals_: list[np.ndarray],
            examples: ClientExamples, *, batch_size: int, version: int,
            rng: np.random.Generator | None = None, vocabulary: ItemVocabulary | None = None
            ) -> Personalization:
        """Reconstruct against ``globals_`` on ``examples`` (items as the dataset's ids when ``vocabulary``
        is given, as the model's indices otherwise)."""
        from fedrecon.core.client_work import ClientStep  # TensorFlow: imported when a client step runs

        vocabulary = vocabulary or ItemVocabulary()
        dense, dropped = vocabulary.examples(examples)
        step = ClientStep(model, config)
        locals_ = step.reconstruct(globals_, dense, batch_size=batch_size,
                                   rng=rng if rng is not None else np.random.default_rng())
        seen = frozenset(int(i) for i in np.asarray(dense.x).reshape(len(dense), -1)[:, 0])
        return cls(model, version, list(globals_), locals_, seen, vocabulary, dropped)

    @classmethod
    def from_model_file(cls, path: str, examples: ClientExamples, *, rng: np.random.Generator | None = None,
                        vocabulary: ItemVocabulary | None = None) -> Personalization:
        """Personalize against an exported model version, no coordinator needed. Items are the dataset's
        ids per ``vocabulary`` (default: the file's, if it has one; else the model's indices)."""
        f = ModelFile.load(path)  # type: ignore[arg-type]
        if vocabulary is None:  # the file's own vocabulary, once model files carry one
            vocabulary = ItemVocabulary.of(tuple(getattr(f, "item_ids", None) or ()))
        return cls.fit(model_from_config(f.model_spec), FedReconConfig.from_dict(f.training), f.arrays,
                       examples, batch_size=f.batch_size, version=f.version, rng=rng, vocabulary=vocabulary)

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
