"""Server optimizer steps against their formulas, with numbers checkable by hand."""

import numpy as np
import pytest

from fedrecon.core.config import OptimizerSpec
from fedrecon.core.optimizers import ServerOptimizer


def _two_steps(spec: OptimizerSpec, w0: float, deltas: list[float]) -> list[float]:
    opt = ServerOptimizer(spec)
    w = [np.array([w0], np.float32)]
    state = opt.init(w)
    out = []
    for d in deltas:
        w, state = opt.apply(w, [np.array([d], np.float32)], state)
        out.append(float(w[0][0]))
    return out


def test_sgd_adds_scaled_mean_delta() -> None:
    assert _two_steps(OptimizerSpec("sgd", 1.0), 1.0, [0.5, -0.25]) == pytest.approx([1.5, 1.25])
    assert _two_steps(OptimizerSpec("sgd", 0.5), 0.0, [2.0]) == pytest.approx([1.0])


def test_momentum_accumulates() -> None:
    # g = -Δ: g1 = -1, m1 = -1, w = 0 + 0.1; g2 = -1, m2 = 0.9*-1 - 1 = -1.9, w = 0.1 + 0.19 = 0.29
    assert _two_steps(OptimizerSpec("momentum", 0.1, momentum=0.9), 0.0, [1.0, 1.0]) == pytest.approx(
        [0.1, 0.29])


def test_adam_first_step_moves_by_learning_rate() -> None:
    # With bias correction the first Adam step is lr * g/|g| (up to epsilon).
    (w1,) = _two_steps(OptimizerSpec("adam", 0.01, epsilon=0.0), 0.0, [3.0])
    assert w1 == pytest.approx(0.01, rel=1e-5)


def test_adam_second_step_formula() -> None:
    b1, b2, lr, eps = 0.9, 0.999, 0.1, 1e-7
    g = [-1.0, -0.5]
    m = v = 0.0
    w = 0.0
    for t, gt in enumerate(g, start=1):
        m = b1 * m + (1 - b1) * gt
        v = b2 * v + (1 - b2) * gt * gt
        w -= lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
    assert _two_steps(OptimizerSpec("adam", lr), 0.0, [1.0, 0.5])[-1] == pytest.approx(w, rel=1e-5)


def test_adagrad_default_accumulator() -> None:
    # a = 0.1 + 4 = 4.1; w = 0 - 0.5 * (-2) / sqrt(4.1)
    (w1,) = _two_steps(OptimizerSpec("adagrad", 0.5), 0.0, [2.0])
    assert w1 == pytest.approx(1.0 / np.sqrt(4.1), rel=1e-5)


def test_yogi_sign_update() -> None:
    # v0 = 1e-6; g = -2 → g² = 4; v1 = v0 - (1-β2)·sign(v0-4)·4 = 1e-6 + 0.004
    b2 = 0.999
    v1 = 1e-6 + (1 - b2) * 4.0
    m1 = 0.1 * -2.0
    lr_t = 0.1 * np.sqrt(1 - b2) / (1 - 0.9)
    expected = -lr_t * m1 / (np.sqrt(v1) + 1e-3)
    (w1,) = _two_steps(OptimizerSpec("yogi", 0.1), 0.0, [2.0])
    assert w1 == pytest.approx(expected, rel=1e-5)


def test_unknown_optimizer_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown server optimizer"):
        ServerOptimizer(OptimizerSpec("lamb", 0.1))
