"""Models described as plain JSON objects, so the coordinator can tell a device which model to build.

A task names its model by ``config()`` (for matrix factorization: ``{"kind": "matrix_factorization",
"num_items": ..., ...}``); the client library, the coordinator and exported model files all rebuild it with
``model_from_config``. Keras models are Python objects and cannot travel this way: build those in the app
and pass them to the client library directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedrecon.core.matrix_factorization import MatrixFactorization
from fedrecon.core.model import ReconstructionModel


def model_from_config(config: Mapping[str, Any]) -> ReconstructionModel:
    """The model a JSON description names; unknown kinds or fields raise ``ValueError``."""
    fields = dict(config)
    kind = fields.pop("kind", None)
    if kind == "matrix_factorization":
        try:
            return MatrixFactorization(**fields)
        except TypeError as err:
            raise ValueError(f"bad matrix_factorization description {dict(config)}: {err}") from err
    raise ValueError(f"unknown model kind {kind!r} (known: 'matrix_factorization')")
