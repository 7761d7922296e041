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

MISSING_TENSORFLOW = ("fedrecon's client step needs TensorFlow, which the package does not install by itself "
                      "(an app brings its own): pip install tensorflow, or pip install 'fedrecon[tf]'")


def import_tensorflow() -> ModuleType:
    """The real TensorFlow module, or an error that says how to install it."""
    try:
        return importlib.import_module("tensorflow")
    except ModuleNotFoundError as err:
        if err.name != "tensorflow":
            raise
        raise ModuleNotFoundError(MISSING_TENSORFLOW, name="tensorflow") from err


class _LazyTensorFlow:
    _module: ModuleType | None = None

    def __getattr__(self, name: str) -> Any:
        if _LazyTensorFlow._module is None:
            _LazyTensorFlow._module = import_tensorflow()
        return getattr(_LazyTensorFlow._module, name)


tf: Any = _LazyTensorFlow()
