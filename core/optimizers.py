"""Server optimizers: the update the server applies to the global model with the averaged client delta.

Following FedOpt (Reddi et al., 2021) and TensorFlow Federated, the server treats the negative weighted mean
delta as a pseudo-gradient ``g = -Δ̄`` and takes one step of an ordinary optimizer. Written in numpy: the
coordinator applies it once per round and should not need TensorFlow to do so. State is a plain list of
arrays plus a step count, so it can be stored beside the model version and survive a restart.

Formulas (t is the 1-based step, ε the epsilon):
- ``sgd``: w ← w - lr·g  (lr = 1 is plain federated averaging of the deltas)
- ``momentum``: m ← μ·m + g; w ← w - lr·m
- ``adam``: m ← β1·m + (1-β1)·g; v ← β2·v + (1-β2)·g²; w ← w - lr·√(1-β2^t)/(1-β1^t)·m/(√v + ε)
- ``adagrad``: a ← a + g²; w ← w - lr·g/(√a + ε)   (a starts at ``initial_accumulator``, default 0.1)
- ``yogi``: m as Adam; v ← v - (1-β2)·sign(v - g²)·g²; step as Adam (v starts at 1e-6, ε default 1e-3)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from fedrecon.core.config import OptimizerSpec


class ServerOptimizerName(StrEnum):
    """The server optimizers this module implements (the CLI's and a task file's choices)."""

    SGD = "sgd"
    MOMENTUM = "momentum"
    ADAM = "adam"
    ADAGRAD = "adagrad"
    YOGI = "yogi"


SERVER_OPTIMIZERS = tuple(o.value for o in ServerOptimizerName)
_DEFAULT_EPSILON = {"adam": 1e-7, "adagrad": 1e-7, "yogi": 1e-3}
_DEFAULT_ACCUMULATOR = {"adagrad": 0.1, "yogi": 1e-6}


@dataclass
class OptimizerState:
    """Slots (one list per slot name, one array per variable) and the number of steps taken."""

    step: int = 0
    slots: dict[str, list[np.ndarray]] = field(default_factory=dict)


class ServerOptimizer:
    """A stateless update rule built from an ``OptimizerSpec``; state is passed in and returned."""

    def __init__(self, spec: OptimizerSpec) -> None:
        if spec.name not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {spec.name!r}; choose from {SERVER_OPTIMIZERS}")
        if spec.learning_rate <= 0:
            raise ValueError("learning_rate must be positive")
        self.spec = spec
        self.epsilon = spec.epsilon if spec.epsilon is not None else _DEFAULT_EPSILON.get(spec.name, 1e-7)
        self.initial_accumulator = (spec.initial_accumulator if spec.initial_accumulator is not None
                                    else _DEFAULT_ACCUMULATOR.get(spec.name, 0.0))

    def init(self, weights: Sequence[np.ndarray]) -> OptimizerState:
        name = self.spec.name
        zeros = [np.zeros_like(w, dtype=np.float32) for w in weights]
        slots: dict[str, list[np.ndarray]] = {}
        if name == "momentum":
            slots["m"] = zeros
        elif name in ("adam", "yogi"):
            slots["m"] = zeros
            slots["v"] = [np.full_like(z, self.initial_accumulator if name == "yogi" else 0.0) for z in zeros]
        elif name == "adagrad":
            slots["a"] = [np.full_like(z, self.initial_accumulator) for z in zeros]
        return OptimizerState(step=0, slots=slots)

    def apply(self, weights: Sequence[np.ndarray], mean_delta: Sequence[np.ndarray], state: OptimizerState
              ) -> tuple[list[np.ndarray], OptimizerState]:
        """New weights and state after one step with pseudo-gradient ``-mean_delta``."""
        spec, name = self.spec, self.spec.name
        lr, eps = np.float32(spec.learning_rate), np.float32(self.epsilon)
        step = state.step + 1
        new_weights: list[np.ndarray] = []
        slots: dict[str, list[np.ndarray]] = {k: [] for k in state.slots}
        for i, (w, d) in enumerate(zip(weights, mean_delta, strict=True)):
            g = -np.asarray(d, np.float32)
            w = np.asarray(w, np.float32)
            if name == "sgd":
                w = w - lr * g
            elif name == "momentum":
                m = np.float32(spec.momentum) * state.slots["m"][i] + g
                slots["m"].append(m)
                w = w - lr * m
            elif name in ("adam", "yogi"):
                b1, b2 = np.float32(spec.beta_1), np.float32(spec.beta_2)
                m = b1 * state.slots["m"][i] + (1 - b1) * g
                v_old, g2 = state.slots["v"][i], g * g
                if name == "adam":
                    v = b2 * v_old + (1 - b2) * g2
                else:
                    v = v_old - (1 - b2) * np.sign(v_old - g2) * g2
                slots["m"].append(m)
                slots["v"].append(v)
                lr_t = lr * np.sqrt(1 - b2**step) / (1 - b1**step)
                w = w - lr_t * m / (np.sqrt(v) + eps)
            elif name == "adagrad":
                a = state.slots["a"][i] + g * g
                slots["a"].append(a)
                w = w - lr * g / (np.sqrt(a) + eps)
            new_weights.append(w.astype(np.float32))
        return new_weights, OptimizerState(step=step, slots=slots)
