"""Personalized inference for a user the model has never seen: reconstruct its local variables, then predict.

The user's data never leaves the device: the global variables come down, the reconstruction runs here
(every batch reconstructs, nothing is held out), and predictions are served from the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedrecon.client.model_file import ModelFile
from fedrecon.core.batching import ClientExamples
from fedrecon.core.client_work import ClientStep
from fedrecon.core.config import FedReconConfig
from fedrecon.core.model import ReconstructionModel
from fedrecon.core.model_spec import model_from_config


@dataclass(frozen=True)
class Personalization:
    """A user's reconstructed local variables beside the global model version they were fitted to."""

    model: ReconstructionModel
    version: int
    globals: list[np.ndarray]
    locals: list[np.ndarray]
    seen_items: frozenset[int]

    @classmethod
    def fit(cls, model: ReconstructionModel, config: FedReconConfig, globals_: list[np.ndarray],
            examples: ClientExamples, *, batch_size: int, version: int,
            rng: np.random.Generator | None = None) -> Personalization:
        step = ClientStep(model, config)
        locals_ = step.reconstruct(globals_, examples, batch_size=batch_size,
                                   rng=rng if rng is not None else np.random.default_rng())
        seen = frozenset(int(i) for i in np.asarray(examples.x).reshape(len(examples), -1)[:, 0])
        return cls(model, version, list(globals_), locals_, seen)

    @classmethod
    def from_model_file(cls, path: str, examples: ClientExamples, *, rng: np.random.Generator | None = None
                        ) -> Personalization:
        """Personalize against an exported model version, no coordinator needed."""
        f = ModelFile.load(path)  # type: ignore[arg-type]
        return cls.fit(model_from_config(f.model_spec), FedReconConfig.from_dict(f.training), f.arrays,
                       examples, batch_size=f.batch_size, version=f.version, rng=rng)

    def _scorer(self):  # type: ignore[no-untyped-def]
        score = getattr(self.model, "score_items", None)
        if score is None:
            raise TypeError(f"{type(self.model).__name__} does not score items; use its own predict")
        return score

    def predict(self, items: np.ndarray) -> np.ndarray:
        """Predicted ratings of ``items`` for this user."""
        return self._scorer()(self.globals, self.locals)[np.asarray(items, np.int64)]

    def recommend(self, k: int = 10) -> list[tuple[int, float]]:
        """Top-``k`` (item, predicted rating) among items this user has not rated yet."""
        self._scorer()
        return self.model.recommend(self.globals, self.locals, k,  # type: ignore[attr-defined]
                                    exclude=sorted(self.seen_items))
