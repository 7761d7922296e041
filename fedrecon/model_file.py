"""A model version in a file that says what it is: what ``fedrecon export`` and ``fedrecon simulate`` write,
and what the client library, ``simulate --init-model`` and ``serve --init-model`` read.

An ``.npz`` archive (no pickle) of the global variables by name, with JSON meta (format
``fedrecon.model/2``):

- ``model``: the model description (``core.model_spec``), enough to rebuild the model;
- ``variables``: each global variable's name, shape and dtype, in the model's order;
- ``task``, ``version``, ``training`` (``FedReconConfig.to_dict()``) and ``batch_size``.

Readers take what they know and keep the rest: a field this module does not name (a later release may add
one, e.g. the dataset's item ids) is carried in ``extra`` and written back unchanged, so the format stays
open. Files of format ``fedrecon.model/1`` (names but no shapes in the meta) still load: their shapes and
dtypes are read from the arrays. Anything else is refused with one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedrecon.tensors import arrays_from_bytes, arrays_to_bytes

FORMAT = "fedrecon.model/2"
READABLE_FORMATS = ("fedrecon.model/1", FORMAT)
#: Meta keys this module reads itself; any other key is an optional field kept in ``ModelFile.extra``.
_KNOWN_KEYS = frozenset({"format", "task", "version", "model", "training", "batch_size", "names",
                         "variables"})


class ModelFileError(ValueError):
    """A file that is not a readable model file, or a model that does not fit what a caller needs."""


@dataclass(frozen=True)
class VariableLayout:
    """Name, shape and dtype of one stored global variable."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class ModelFile:
    task: str
    version: int
    model_spec: dict[str, Any]
    names: list[str]
    arrays: list[np.ndarray]
    training: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 5
    extra: dict[str, Any] = field(default_factory=dict)  # optional fields, kept as read

    @property
    def item_ids(self) -> tuple[int, ...] | None:
        """The dataset's own item ids in model order (the optional ``item_ids`` field), if the file has them:
        what lets ``Personalization`` speak in MovieLens movie ids rather than dense indices."""
        ids = self.extra.get("item_ids")
        return tuple(int(i) for i in ids) if ids else None

    def __post_init__(self) -> None:
        if len(self.names) != len(self.arrays):
            raise ModelFileError(f"{len(self.names)} variable names for {len(self.arrays)} arrays")
        clash = _KNOWN_KEYS & set(self.extra)
        if clash:
            raise ModelFileError(f"extra fields {sorted(clash)} would shadow the model file's own fields")

    @property
    def variables(self) -> list[VariableLayout]:
        return [VariableLayout(n, tuple(int(d) for d in np.shape(a)), np.asarray(a).dtype.name)
                for n, a in zip(self.names, self.arrays, strict=True)]

    def meta(self) -> dict[str, Any]:
        return {**self.extra, "format": FORMAT, "task": self.task, "version": self.version,
                "model": self.model_spec, "variables": [v.to_dict() for v in self.variables],
                "training": self.training, "batch_size": self.batch_size}

    def save(self, path: Path) -> None:
        Path(path).write_bytes(arrays_to_bytes(dict(zip(self.names, self.arrays, strict=True)), self.meta()))

    @classmethod
    def load(cls, path: Path | str) -> ModelFile:
        """Read a model file; ``ModelFileError`` (one line, naming the file) if it is not one."""
        try:
            named, meta = arrays_from_bytes(Path(path).read_bytes())
        except OSError:  # missing or unreadable: the caller's own message (it knows the option)
            raise
        except Exception as err:  # zip/npz/JSON damage: not a model file, whatever the exact cause
            raise ModelFileError(f"{path} is not a fedrecon model file ({type(err).__name__}: {err})"
                                 ) from err
        fmt = meta.get("format")
        if fmt not in READABLE_FORMATS:
            raise ModelFileError(f"{path} is not a fedrecon model file this release reads (format {fmt!r}; "
                                 f"readable: {', '.join(READABLE_FORMATS)})")
        try:
            if fmt == FORMAT:
                layouts = [VariableLayout(str(v["name"]), tuple(int(d) for d in v["shape"]), str(v["dtype"]))
                           for v in meta["variables"]]
                names = [v.name for v in layouts]
            else:  # fedrecon.model/1: names only; shapes and dtypes are those of the arrays
                names = [str(n) for n in meta["names"]]
                layouts = []
            missing = [n for n in names if n not in named]
            if missing:
                raise ModelFileError(f"{path}: variable {missing[0]!r} is listed but not stored")
            arrays = [named[n] for n in names]
            for layout, array in zip(layouts, arrays, strict=False):
                if tuple(array.shape) != layout.shape or array.dtype.name != layout.dtype:
                    raise ModelFileError(f"{path}: variable {layout.name!r} is stored as {array.dtype.name}"
                                         f"{list(array.shape)} but described as {layout.dtype}"
                                         f"{list(layout.shape)}")
            extra = {k: v for k, v in meta.items() if k not in _KNOWN_KEYS}
            return cls(task=str(meta["task"]), version=int(meta["version"]), model_spec=dict(meta["model"]),
                       names=names, arrays=arrays, training=dict(meta.get("training") or {}),
                       batch_size=int(meta.get("batch_size", 5)), extra=extra)
        except KeyError as err:
            raise ModelFileError(f"{path}: model file without the {err.args[0]!r} field") from err

    def globals_for(self, wanted: Sequence[tuple[str, tuple[int, ...]]], owner: str) -> list[np.ndarray]:
        """The arrays in ``wanted``'s order (``(name, shape)`` pairs, e.g. a model's global variables).

        Matched by name (another tool may list variables in another order); the first variable that is
        missing or has another shape is named in a ``ModelFileError`` with both shapes.
        """
        named = dict(zip(self.names, self.arrays, strict=True))
        out = []
        for name, shape in wanted:
            shape = tuple(int(d) for d in shape)
            if name not in named:
                raise ModelFileError(f"variable {name!r}: {owner} needs shape {list(shape)}, the model file "
                                     f"has no such variable (it has {', '.join(self.names) or 'none'})")
            got = tuple(np.shape(named[name]))
            if got != shape:
                raise ModelFileError(f"variable {name!r}: {owner} needs shape {list(shape)}, the model file "
                                     f"has {list(got)}")
            out.append(named[name])
        extra = [n for n in self.names if n not in {name for name, _ in wanted}]
        if extra:
            raise ModelFileError(f"variable {extra[0]!r}: the model file has it, {owner} has no such "
                                 "variable")
        return out


def globals_for_model(model_file: ModelFile, model: Any, owner: str) -> list[np.ndarray]:
    """``model_file``'s arrays for ``model`` (a ``ReconstructionModel``: its global variables, by name)."""
    return model_file.globals_for([(v.name, tuple(v.shape)) for v in model.global_variables], owner)

