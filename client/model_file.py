"""A model version in a file: what ``fedrecon export`` writes and the client library and simulator read.

An ``.npz`` archive (no pickle) of the global variables by name, with the task's model description,
training configuration, batch size and version as JSON meta, so the file alone is enough to rebuild the
model and personalize for a user.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedrecon.tensors import arrays_from_bytes, arrays_to_bytes

FORMAT = "fedrecon.model/1"


@dataclass(frozen=True)
class ModelFile:
    task: str
    version: int
    model_spec: dict[str, Any]
    names: list[str]
    arrays: list[np.ndarray]
    training: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 5

    def save(self, path: Path) -> None:
        meta = {"format": FORMAT, "task": self.task, "version": self.version, "model": self.model_spec,
                "training": self.training, "batch_size": self.batch_size, "names": self.names}
        path.write_bytes(arrays_to_bytes(dict(zip(self.names, self.arrays, strict=True)), meta))

    @classmethod
    def load(cls, path: Path) -> ModelFile:
        named, meta = arrays_from_bytes(Path(path).read_bytes())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a fedrecon model file (format {meta.get('format')!r})")
        names = list(meta["names"])
        return cls(task=meta["task"], version=int(meta["version"]), model_spec=dict(meta["model"]),
                   names=names, arrays=[named[n] for n in names], training=dict(meta["training"]),
                   batch_size=int(meta["batch_size"]))
