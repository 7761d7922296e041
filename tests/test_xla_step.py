"""The XLA-compiled client step is the same computation: equal rounds, bounded compilations."""

from __future__ import annotations

import numpy as np

from fedrecon.core.algorithm import FedRecon
from fedrecon.core.batching import pack_clients
from fedrecon.core.config import FedReconConfig
from fedrecon.core.matrix_factorization import MatrixFactorization
from fedrecon.simulations.ratings import load_dataset
from fedrecon.simulations.runner import Simulation, SimulationSettings, local_rng


def _run(xla: bool, rounds: int = 2) -> list[np.ndarray]:
    data = load_dataset("synthetic")
    model = MatrixFactorization(data.num_items, 8, use_biases=True, initial_offset=data.mean_rating)
    algorithm = FedRecon(model, FedReconConfig())
    sim = Simulation(algorithm, data.train, SimulationSettings(rounds=rounds, clients_per_round=20, seed=3,
                                                               xla=xla))
    assert algorithm.client_step_for(xla=xla).xla is xla
    state = algorithm.initial_state(3)
    for _ in range(rounds):
        state, _ = sim.run_round(state)
    return state.globals


def test_xla_rounds_equal_the_graph_rounds() -> None:
    graph, xla = _run(False), _run(True)
    assert not all(np.array_equal(a, b) for a, b in zip(graph, _run(False, rounds=1), strict=True))
    for a, b in zip(graph, xla, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_padding_steps_is_an_exact_no_op() -> None:
    data = load_dataset("synthetic")
    model = MatrixFactorization(data.num_items, 8)
    algorithm = FedRecon(model, FedReconConfig())
    users = sorted(data.train)[:7]
    globals_ = algorithm.initial_state(0).globals
    results = []
    for multiple in (1, 8):
        packed = pack_clients(model, [data.train[u] for u in users], algorithm.config, batch_size=5,
                              local_rngs=[local_rng(0, 1, u) for u in users], step_multiple=multiple)
        assert packed.post_reconstruction.num_steps % multiple == 0
        results.append(algorithm.client_step.train(globals_, packed))
    plain, padded = results
    assert plain.weights.tolist() == padded.weights.tolist()
    for a, b in zip(plain.weighted_delta_sum, padded.weighted_delta_sum, strict=True):
        np.testing.assert_array_equal(a, b)
