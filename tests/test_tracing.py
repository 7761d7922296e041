"""The client step is traced once for any client size: no TensorFlow retracing (nor its warning) when a
process runs many clients of different sizes, each through a new ``ClientStep`` as the client library does."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from fedrecon.core.batching import ClientExamples, pack_clients
from fedrecon.core.client_work import ClientStep, client_update
from fedrecon.core.config import FedReconConfig
from fedrecon.core.matrix_factorization import MatrixFactorization

SIZES = [7, 13, 30, 55, 120, 200, 3, 41]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def tf_warnings():  # type: ignore[no-untyped-def]
    handler = _Records()
    tf.get_logger().addHandler(handler)
    yield handler.messages
    tf.get_logger().removeHandler(handler)


def _client(rng: np.random.Generator, n: int, num_items: int) -> ClientExamples:
    return ClientExamples(rng.choice(num_items, n, replace=False).astype(np.int32),
                          rng.integers(1, 6, n).astype(np.float32))


def test_client_runs_of_different_sizes_trace_once(tf_warnings: list[str]) -> None:
    model = MatrixFactorization(300, 6, use_biases=True)
    config = FedReconConfig(recon_epochs=2, recon_steps_max=7)  # a configuration no other test uses
    globals_ = model.initial_globals(0)
    rng = np.random.default_rng(0)
    steps = []
    for n in SIZES:
        step = ClientStep(model, config)  # a fresh step per run, as a device process would build it
        steps.append(step)
        update = client_update(step, globals_, _client(rng, n, 300), batch_size=5, rng=rng)
        assert update.weight > 0 or n <= 5
        packed = pack_clients(model, [_client(rng, n, 300)], config, batch_size=5, local_rngs=[rng],
                              evaluation=True)
        step.evaluate(globals_, packed)
    # One trace of the device's training graph and one of evaluation, for all eight sizes and steps.
    assert steps[-1].tracing_count() == 2
    _no_retracing_warning_in_a_fresh_process(tf_warnings, "test_client_runs_of_different_sizes_trace_once")


def _no_retracing_warning_in_a_fresh_process(tf_warnings: list[str], test: str) -> None:
    """Assert TensorFlow did not warn about retracing, in a process of its own.

    TensorFlow's retracing warning counts traces of a Python function over the whole process, across every
    ``tf.function`` wrapping it (a bound method counts for all instances), so earlier tests' own models and
    configurations, each traced once, would raise it here. A device or a simulation runs one task per
    process: check the warning where they would see it, in a fresh process running only ``test``."""
    if os.environ.get("FEDRECON_TRACING_CHILD"):
        assert not [m for m in tf_warnings if "retracing" in m], tf_warnings
        return
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{Path(__file__)}::{test}"],
        env={**os.environ, "FEDRECON_TRACING_CHILD": "1"}, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]


def test_simulated_rounds_of_different_group_sizes_trace_once(tf_warnings: list[str]) -> None:
    model = MatrixFactorization(300, 5)
    config = FedReconConfig(post_recon_steps_max=9)
    step = ClientStep(model, config)
    globals_ = model.initial_globals(0)
    rng = np.random.default_rng(1)
    for count in (3, 8, 1, 5):
        clients = [_client(rng, int(n), 300) for n in rng.integers(6, 150, count)]
        packed = pack_clients(model, clients, config, batch_size=5, local_rngs=[rng] * count)
        result = step.train_clients(globals_, packed)
        result.deltas.weighted_sum(result.weights)
        result.deltas.stacked()
    assert step.tracing_count() == 3  # client work, weighted sum, dense per-client deltas
    _no_retracing_warning_in_a_fresh_process(tf_warnings,
                                             "test_simulated_rounds_of_different_group_sizes_trace_once")


def test_clients_starting_together_in_threads_trace_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several clients of one process (the fault drill's, an app serving users) start their first round at
    the same moment: they share one trace instead of racing to build one each (on a busy machine ten
    concurrent traces took longer than a round's reporting window)."""
    model = MatrixFactorization(310, 4)
    config = FedReconConfig(recon_epochs=3, recon_steps_max=5)  # a configuration no other test uses
    globals_ = model.initial_globals(0)
    seeds = list(range(8))
    barrier = threading.Barrier(len(seeds))
    errors: list[BaseException] = []
    steps: list[ClientStep] = []
    lock = threading.Lock()
    traced: list[int] = []  # the Python body runs once per trace
    original = ClientStep._train_reduced

    def counting(self: ClientStep, *args: object) -> object:
        traced.append(1)
        return original(self, *args)

    monkeypatch.setattr(ClientStep, "_train_reduced", counting)

    def run(seed: int) -> None:
        try:
            rng = np.random.default_rng(seed)
            barrier.wait(timeout=120)
            step = ClientStep(model, config)
            with lock:
                steps.append(step)
            client_update(step, globals_, _client(rng, 20 + 9 * seed, 310), batch_size=5, rng=rng)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len(steps) == len(seeds)
    # Every step got the process's one set of graphs, and its training graph was traced exactly once.
    assert len({id(s.graphs["train_reduced"]) for s in steps}) == 1
    assert steps[0].graphs["train_reduced"].tracing_count() == 1
    assert len(traced) == 1
