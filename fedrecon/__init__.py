"""fedrecon: Federated Reconstruction, from simulation to a coordinator and an embeddable client."""

__version__ = "0.1.0"
