"""The dataset's own item ids on the device, the model's dense item indices on the wire.

A task may carry an item vocabulary (``item_ids[i]`` is the dataset's id of the model's item ``i``, e.g. a
MovieLens movie id), served with the model. An app then speaks its own ids: examples are mapped to dense
indices before the client step, and predictions and recommendations are mapped back. Examples whose item
is not in the vocabulary (an item the model does not know) are dropped and counted. Without a vocabulary
the ids are the indices, unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedrecon.core.batching import ClientExamples


@dataclass(frozen=True)
class ItemVocabulary:
    """``ids[i]``: the dataset's id of the model's item ``i``; None: the ids are the indices."""

    ids: np.ndarray | None = None

    @classmethod
    def of(cls, item_ids: Sequence[int]) -> ItemVocabulary:
        return cls(np.asarray(item_ids, np.int64) if len(item_ids) else None)

    def _sorted(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.ids is not None
        order = np.argsort(self.ids, kind="stable")
        return self.ids[order], order

    def to_dense(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dense indices, known mask) of ``item_ids``; unknown ids get index -1."""
        item_ids = np.asarray(item_ids, np.int64)
        if self.ids is None:
            return item_ids, np.ones(item_ids.shape, bool)
        keys, order = self._sorted()
        at = np.clip(np.searchsorted(keys, item_ids), 0, len(keys) - 1)
        known = keys[at] == item_ids
        return np.where(known, order[at], -1), known

    def to_ids(self, dense: np.ndarray) -> np.ndarray:
        """The dataset's ids of the model's items ``dense``."""
        dense = np.asarray(dense, np.int64)
        return dense if self.ids is None else self.ids[dense]

    def examples(self, examples: ClientExamples) -> tuple[ClientExamples, int]:
        """``examples`` (item ids in the first column of ``x``) with dense item indices, and how many were
        dropped because their item is not in the vocabulary."""
        if self.ids is None:
            return examples, 0
        x = np.asarray(examples.x)
        items = x.reshape(len(x), -1)[:, 0] if x.ndim > 1 else x
        dense, known = self.to_dense(items)
        mapped = x.copy()
        if x.ndim > 1:
            mapped.reshape(len(x), -1)[:, 0] = dense
        else:
            mapped[:] = dense
        return ClientExamples(x=mapped[known], y=np.asarray(examples.y)[known]), int((~known).sum())
