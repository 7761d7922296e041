"""TensorFlow, imported on first use.

The model classes describe variables (names, shapes, numpy initial values) as well as the TensorFlow
forward pass. The coordinator needs only the former: it aggregates and applies the server optimizer in
numpy, so it should not pay TensorFlow's start-up time and hundreds of megabytes of memory. Modules that
only *may* need TensorFlow use ``tf`` from here; the first attribute access imports the real module.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class _LazyTensorFlow:
    _module: ModuleType | None = None

    def __getattr__(self, name: str) -> Any:
        if _LazyTensorFlow._module is None:
            _LazyTensorFlow._module = importlib.import_module("tensorflow")
        return getattr(_LazyTensorFlow._module, name)


tf: Any = _LazyTensorFlow()
