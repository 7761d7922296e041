"""fedrecon: Federated Reconstruction, from simulation to a coordinator and an embeddable client."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedrecon")  # pyproject.toml is the one source of the version
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
