"""Models described as plain JSON objects, so the coordinator can tell a device which model to build.

A task names its model by ``config()``: ``{"kind": "matrix_factorization", "num_items": ..., ...}`` for
the direct matrix factorization model, or ``{"kind": "keras", "architecture": ..., "local_layers": ...}``
for any Keras 3 model (``keras_spec``: deserialised safely, its variables listed so that the coordinator
needs no TensorFlow). The client library, the coordinator and exported model files all rebuild a model
with ``model_from_config``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedrecon.core.matrix_factorization import MatrixFactorization
from fedrecon.core.model import ReconstructionModel

KINDS = ("matrix_factorization", "keras")


def model_from_config(config: Mapping[str, Any], *, custom_objects: Mapping[str, Any] | None = None,
                      safe_mode: bool = True) -> ReconstructionModel:
    """The model a JSON description names; unknown kinds or fields raise ``ValueError``. For Keras
    descriptions, ``custom_objects`` are the classes and functions the app registers and ``safe_mode=False``
    trusts the description with code (Lambda layers); see ``keras_spec``."""
    fields = dict(config)
    kind = fields.pop("kind", None)
    if kind == "matrix_factorization":
        try:
            return MatrixFactorization(**fields)
        except TypeError as err:
            raise ValueError(f"bad matrix_factorization description {dict(config)}: {err}") from err
    if kind == "keras":
        from fedrecon.core.keras_spec import KerasDescribedModel

        return KerasDescribedModel(config, custom_objects=custom_objects, safe_mode=safe_mode)
    raise ValueError(f"unknown model kind {kind!r} (known: {', '.join(repr(k) for k in KINDS)})")
