"""Federated Reconstruction (Singhal et al., NeurIPS 2021), composed from its parts.

One round:

1. The server sends the global variables g to each selected client (``FedRecon.state.globals``).
2. Each client reconstructs its local variables from scratch with g frozen, then updates g with its locals
   frozen, and reports Δ_i, a weight w_i and metrics (``client_work``; locals never leave the client).
3. The server folds each report into a running weighted sum (``aggregation.RunningWeightedSum``).
4. The server takes one optimizer step with pseudo-gradient -Σw_iΔ_i/Σw_i on the global trainable
   variables (``optimizers.ServerOptimizer``) and the new model becomes the next version.

Only the client step is specific to FedRecon; distribution, aggregation and the server step are ordinary
federated learning, so the coordinator reuses ``server_update`` exactly as the simulator does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedrecon.core.aggregation import RunningWeightedSum
from fedrecon.core.config import FedReconConfig
from fedrecon.core.model import ReconstructionModel
from fedrecon.core.optimizers import OptimizerState, ServerOptimizer

if TYPE_CHECKING:
    from fedrecon.core.client_work import ClientStep


@dataclass(frozen=True)
class ServerState:
    """The global model after ``round_num`` committed rounds and the server optimizer's state."""

    globals: list[np.ndarray]
    optimizer_state: OptimizerState
    round_num: int


class FedRecon:
    """The algorithm for one model and configuration: client step plus server step."""

    def __init__(self, model: ReconstructionModel, config: FedReconConfig) -> None:
        self.model = model
        self.config = config
        self.server_optimizer = ServerOptimizer(config.server_optimizer)

    @functools.cached_property
    def client_step(self) -> ClientStep:
        """The compiled client step, built on first use: the coordinator only ever runs the server step
        and so never imports TensorFlow."""
        from fedrecon.core.client_work import ClientStep

        return ClientStep(self.model, self.config)

    def initial_state(self, seed: int, globals_: Sequence[np.ndarray] | None = None) -> ServerState:
        weights = list(globals_) if globals_ is not None else self.model.initial_globals(seed)
        trainable = [weights[i] for i in self.model.global_trainable]
        return ServerState(globals=weights, optimizer_state=self.server_optimizer.init(trainable),
                           round_num=0)

    def new_aggregate(self) -> RunningWeightedSum:
        return RunningWeightedSum([self.model.global_variables[i].shape for i in self.model.global_trainable])

    def server_update(self, state: ServerState, aggregate: RunningWeightedSum) -> ServerState:
        """Apply the aggregated mean delta; with no weight folded the model stays as it was."""
        mean = aggregate.mean()
        if mean is None:
            return ServerState(state.globals, state.optimizer_state, state.round_num + 1)
        idx = self.model.global_trainable
        new_trainable, opt_state = self.server_optimizer.apply(
            [state.globals[i] for i in idx], mean, state.optimizer_state)
        globals_ = list(state.globals)
        for i, w in zip(idx, new_trainable, strict=True):
            globals_[i] = w
        return ServerState(globals_, opt_state, state.round_num + 1)
