"""Hyper-parameters of a Federated Reconstruction run, as plain frozen values.

Everything that changes what a client or the server computes lives here, so that the simulator, the gRPC
coordinator and the client library read one definition (and a task stored by the coordinator can be
round-tripped through ``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

#: ``FedReconConfig``'s on/off settings: a task file must give each as a boolean.
BOOLEAN_FIELDS = ("split_dataset", "jointly_train_variables", "shuffle_each_round")


class ClientWeighting(StrEnum):
    """How a client's update is weighted in the server's mean."""

    NUM_EXAMPLES = "num_examples"  # examples seen in the post-reconstruction update (reference default)
    UNIFORM = "uniform"


@dataclass(frozen=True)
class OptimizerSpec:
    """A named optimizer with its hyper-parameters; built into an update rule by ``optimizers``.

    Kept as data (not an optimizer object) so a task can be stored, sent over the wire and rebuilt
    identically on the server, in the simulator and on a device.
    """

    name: str = "sgd"
    learning_rate: float = 1.0
    momentum: float = 0.0
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float | None = None  # None: the optimizer's own default (see ``optimizers``)
    initial_accumulator: float | None = None  # Adagrad accumulator / Yogi preconditioner start

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimizerSpec:
        return cls(**data)


@dataclass(frozen=True)
class FedReconConfig:
    """Client-side and server-side settings of one FedRecon task.

    Defaults are the reference MovieLens settings of the paper's code (Singhal et al., 2021):
    reconstruction SGD 0.1 for 5 epochs capped at 50 steps, client SGD 0.5 for 1 epoch capped at 50 steps,
    server SGD 1.0, even batches reconstruct and odd batches train, weights = post-reconstruction examples.
    """

    reconstruction_optimizer: OptimizerSpec = field(default_factory=lambda: OptimizerSpec("sgd", 0.1))
    client_optimizer: OptimizerSpec = field(default_factory=lambda: OptimizerSpec("sgd", 0.5))
    server_optimizer: OptimizerSpec = field(default_factory=lambda: OptimizerSpec("sgd", 1.0))
    recon_epochs: int = 5
    recon_steps_max: int | None = 50
    post_recon_epochs: int = 1
    post_recon_steps_max: int | None = 50
    split_dataset: bool = True
    # L2 penalty λ·‖l‖² on the local trainable variables while reconstructing (a Gaussian prior on a
    # user's factors: with few ratings, unregularised reconstruction overfits). 0 = reference behaviour.
    reconstruction_l2: float = 0.0
    jointly_train_variables: bool = False
    client_weighting: ClientWeighting = ClientWeighting.NUM_EXAMPLES
    # Evaluation of unseen users reconstructs with these settings (defaults: same as training).
    eval_recon_epochs: int | None = None
    eval_recon_steps_max: int | None = None
    # Put the client's examples in a fresh order every training round, before its batches are scheduled.
    # Off, both phases always start from the client's first batch, so with a step cap a client holding
    # more batches than the cap trains on the same first batches every round and never on the rest. It is
    # part of the training recipe, so it travels with the task to devices (which draw the order from fresh
    # entropy; the simulator from (seed, round, user)). Evaluation never shuffles: held-out batches stay
    # the same for every model scored.
    shuffle_each_round: bool = False

    def __post_init__(self) -> None:
        for name in BOOLEAN_FIELDS:  # TOML/JSON hand-written: "yes" or 1 must not pass as a switch
            value = getattr(self, name)
            if not isinstance(value, bool | np.bool_):
                raise ValueError(f"{name} must be true or false, not {value!r}")
            object.__setattr__(self, name, bool(value))
        if self.recon_epochs < 0 or self.post_recon_epochs < 0:
            raise ValueError("epochs must be non-negative")
        for name in ("recon_steps_max", "post_recon_steps_max", "eval_recon_steps_max"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be non-negative or None")
        if self.reconstruction_l2 < 0:
            raise ValueError("reconstruction_l2 must be non-negative")
        if self.reconstruction_optimizer.name != "sgd" or self.client_optimizer.name != "sgd":
            raise ValueError("client-side optimizers support 'sgd' only (the reference setting)")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["client_weighting"] = self.client_weighting.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FedReconConfig:
        data = dict(data)
        for key in ("reconstruction_optimizer", "client_optimizer", "server_optimizer"):
            if key in data and isinstance(data[key], dict):
                data[key] = OptimizerSpec.from_dict(data[key])
        if "client_weighting" in data:
            data["client_weighting"] = ClientWeighting(data["client_weighting"])
        return cls(**data)

    def replace(self, **changes: Any) -> FedReconConfig:
        return dataclasses.replace(self, **changes)
