"""The algorithms a simulation can train and each one's training defaults, in one place (with the engines
and transports it can run them on: plain values, importable without TensorFlow).

FedRecon's defaults are the reference MovieLens settings (``FedReconConfig``). The FedAvg baseline trains
every variable on every batch with one user vector shared by all clients; with FedRecon's client learning
rate (0.5) it diverges (validation RMSE ~1e10 on ML-1M), so it gets its own: client SGD 0.05, measured
stable on the embedded synthetic data and on an ML-1M subset (validation RMSE falling steadily to ~1.03
within 60 rounds of 100 clients, where 0.1 still oscillates). A task file's ``[training]`` table and
explicit CLI flags override these (``training_config``).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from fedrecon.core.config import FedReconConfig, OptimizerSpec


class Algorithm(StrEnum):
    FEDRECON = "fedrecon"  # Federated Reconstruction (local user factors, reconstructed each round)
    FEDAVG = "fedavg"  # baseline: everything global, one shared user vector
    CENTRALIZED = "centralized"  # baseline: all training ratings pooled on the server


class Backend(StrEnum):
    FEDRECON = "fedrecon"  # this project's engine
    TFF = "tff"  # TensorFlow Federated's build_fed_recon, in the environment `make tff-env` builds
    RAY = "ray"  # this project's engine, each round's clients on Ray workers (the sim-ray extra)


class Transport(StrEnum):
    INPROCESS = "inprocess"  # the lock-step simulator
    GRPC = "grpc"  # every round through a real coordinator on loopback with the client library


#: ``FedReconConfig`` fields each algorithm sets differently from the reference defaults.
TRAINING_DEFAULTS: Mapping[Algorithm, Mapping[str, Any]] = {
    Algorithm.FEDRECON: {},
    Algorithm.FEDAVG: {"client_optimizer": OptimizerSpec("sgd", 0.05)},
    Algorithm.CENTRALIZED: {},
}


def default_training(algorithm: Algorithm | str) -> FedReconConfig:
    """The training settings ``algorithm`` runs with when nothing else is said."""
    return FedReconConfig().replace(**TRAINING_DEFAULTS[Algorithm(algorithm)])


def training_config(algorithm: Algorithm | str, *overrides: Mapping[str, Any]) -> FedReconConfig:
    """``algorithm``'s defaults with each mapping of ``FedReconConfig`` fields laid over them in turn (a
    task file's ``[training]`` table, then CLI flags). An optimizer given as a partial table (``{
    learning_rate = 0.1 }``) keeps the fields it does not name. Bad values raise ``ValueError``."""
    merged = default_training(algorithm).to_dict()
    for layer in overrides:
        for key, value in layer.items():
            if isinstance(value, OptimizerSpec):
                value = value.to_dict()
            if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
                value = {**merged[key], **value}
            merged[key] = value
    try:
        return FedReconConfig.from_dict(merged)
    except TypeError as err:  # an unknown field
        raise ValueError(f"bad training settings: {err}") from err
