"""Federated Reconstruction (Singhal et al., NeurIPS 2021), composed from its parts.

One round:

1. The server sends the global variables g to each selected client (``FedRecon.state.globals``).
2. Each client reconstructs its local variables from scratch with g frozen, then updates g with its locals
   frozen, and reports Δ_i, a weight w_i and metrics (``client_work``; locals never leave the client).
3. The server folds each report through the aggregation stages (``aggregation``: weight cap, norm clip,
   then by default a streaming weighted mean; trimmed mean or median as options).
4. The server takes one optimizer step with the aggregate as pseudo-gradient (by default
   -Σw_i s_i Δ_i/Σw_i) on the global trainable variables (``optimizers.ServerOptimizer``); the new model
   becomes the next version unless a value of it is not finite (``NonFiniteUpdate``: the model stays).

Only the client step is specific to FedRecon; distribution, aggregation and the server step are ordinary
federated learning, so the coordinator reuses ``server_update`` exactly as the simulator does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedrecon.core.aggregation import AggregationConfig, Aggregator, build_aggregator, check_buffer
from fedrecon.core.compression import UploadCodec
from fedrecon.core.config import FedReconConfig
from fedrecon.core.model import ReconstructionModel
from fedrecon.core.optimizers import OptimizerState, ServerOptimizer

if TYPE_CHECKING:
    from fedrecon.core.client_work import ClientStep


class NonFiniteUpdate(ValueError):
    """A round's aggregate or the model it would make holds a NaN or an infinity: it must not be committed."""


@dataclass(frozen=True)
class ServerState:
    """The global model after ``round_num`` committed rounds and the server optimizer's state."""

    globals: list[np.ndarray]
    optimizer_state: OptimizerState
    round_num: int
    clip_bound: float | None = None  # where adaptive clipping has moved the norm bound (None: not adaptive)


class FedRecon:
    """The algorithm for one model and configuration: client step plus server step."""

    def __init__(self, model: ReconstructionModel, config: FedReconConfig, *,
                 aggregation: AggregationConfig | None = None) -> None:
        self.model = model
        self.config = config
        self.aggregation = aggregation if aggregation is not None else AggregationConfig()
        self.server_optimizer = ServerOptimizer(config.server_optimizer)

    @functools.cached_property
    def client_step(self) -> ClientStep:
        """The compiled client step, built on first use: the coordinator only ever runs the server step
        and so never imports TensorFlow."""
        from fedrecon.core.client_work import ClientStep

        return ClientStep(self.model, self.config)

    @functools.cached_property
    def xla_client_step(self) -> ClientStep:
        """The same client step with its training graph compiled by XLA (the simulator's ``--xla``)."""
        from fedrecon.core.client_work import ClientStep

        return ClientStep(self.model, self.config, xla=True)

    def client_step_for(self, *, xla: bool) -> ClientStep:
        return self.xla_client_step if xla else self.client_step

    def initial_state(self, seed: int, globals_: Sequence[np.ndarray] | None = None) -> ServerState:
        weights = list(globals_) if globals_ is not None else self.model.initial_globals(seed)
        trainable = [weights[i] for i in self.model.global_trainable]
        return ServerState(globals=weights, optimizer_state=self.server_optimizer.init(trainable),
                           round_num=0)

    @property
    def delta_shapes(self) -> list[tuple[int, ...]]:
        """The shapes of an update: the global trainable variables, in model order."""
        return [tuple(self.model.global_variables[i].shape) for i in self.model.global_trainable]

    _delta_shapes = delta_shapes

    def check_aggregation(self, *, max_clients: int) -> None:
        """Refuse settings whose buffering reducer would exceed its memory bound (at start, not mid-round)."""
        check_buffer(self.aggregation, self._delta_shapes, max_clients)

    def new_aggregate(self, *, max_clients: int, batch_size: int, expected_clients: int | None = None,
                      noise_rng: np.random.Generator | None = None,
                      state: ServerState | None = None) -> Aggregator:
        """A round's aggregation stages; ``max_clients`` bounds the updates a buffering reducer keeps and
        ``batch_size`` derives the default weight cap (``AggregationConfig.weight_cap``). With DP noise,
        ``expected_clients`` is the mean's fixed denominator and ``noise_rng`` draws the noise. ``state``:
        the model the round trains, whose adaptive clip bound (if any) the round uses. With an upload codec
        the round's stages start with ``upload_<codec>``: its updates arrived encoded and were decoded."""
        aggregate = build_aggregator(self.aggregation, self._delta_shapes,
                                     weight_cap=self.aggregation.weight_cap(self.config, batch_size),
                                     max_clients=max_clients, expected_clients=expected_clients,
                                     noise_rng=noise_rng,
                                     clip_bound=state.clip_bound if state is not None else None)
        codec = self.aggregation.upload_codec
        if codec != UploadCodec.NONE:
            aggregate.report.stages = (f"upload_{codec.value}", *aggregate.report.stages)
        return aggregate

    def server_update(self, state: ServerState, aggregate: Aggregator) -> ServerState:
        """Apply the aggregated delta; with nothing folded the model stays as it was.

        Raises ``NonFiniteUpdate`` (and changes nothing) when the aggregate or the new global variables
        are not all finite: finite but huge updates can still overflow float32, and a committed Inf would
        stay for good."""
        mean = aggregate.mean()
        clip_bound = aggregate.next_clip_bound() or state.clip_bound
        if mean is None:
            return ServerState(state.globals, state.optimizer_state, state.round_num + 1, clip_bound)
        if not all(np.isfinite(m).all() for m in mean):
            raise NonFiniteUpdate(f"round {state.round_num + 1}: the aggregated update is not finite")
        idx = self.model.global_trainable
        with np.errstate(over="ignore", invalid="ignore"):
            new_trainable, opt_state = self.server_optimizer.apply(
                [state.globals[i] for i in idx], mean, state.optimizer_state)
        produced = [*new_trainable, *(slot for slots in opt_state.slots.values() for slot in slots)]
        if not all(np.isfinite(np.asarray(w)).all() for w in produced):
            raise NonFiniteUpdate(f"round {state.round_num + 1}: the new model would not be finite")
        globals_ = list(state.globals)
        for i, w in zip(idx, new_trainable, strict=True):
            globals_[i] = w
        return ServerState(globals_, opt_state, state.round_num + 1, clip_bound)
