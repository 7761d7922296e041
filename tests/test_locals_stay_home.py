"""Proof that local variables stay on the device (issue 13), from the bytes on the wire.

A real client takes part in a real round against a real coordinator over loopback, through a TCP relay on
127.0.0.1 (``simulations.wire_tap``) that records every byte the client sends (HTTP/2 frames as they leave
the client's socket: not the client's own bookkeeping, not an interceptor). The client's local variables
are then recomputed from the same seed (their fresh draw, and the values reconstruction made of them; the
recomputed update is checked against the model version the coordinator committed from the client's
report) and every 8-byte window of their float32 values, and each value as a float64, is searched for in
the captured bytes: none may be there. The positive control runs the same search for the update the
client uploaded, which must be found, so the search is not blind.

Both model families run against the coordinator: matrix factorization with plain and with row-sparse
uploads, and a Keras task (served from its description, rebuilt by the device) with a local layer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import pytest

from fedrecon.client import FederatedClient
from fedrecon.client.participant import client_step_for
from fedrecon.core.aggregation import AggregationConfig
from fedrecon.core.batching import ClientExamples
from fedrecon.core.client_work import client_update
from fedrecon.core.compression import UploadCodec
from fedrecon.core.config import FedReconConfig, OptimizerSpec
from fedrecon.protocol import Assignment
from fedrecon.server.app import start_server
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.store import SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec
from fedrecon.simulations.ratings import load_dataset
from fedrecon.simulations.wire_tap import WireTap

SEED = 1234
WINDOW = 8  # bytes: two consecutive float32 values


ZEROS = bytes(WINDOW)  # zeros say nothing about anyone (a bias starts at 0.0): not a pattern to look for


def windows(values: Sequence[np.ndarray]) -> set[bytes]:
    """Every 8-byte window of each array's float32 bytes, at every float boundary (two consecutive values)."""
    out = set()
    for v in values:
        raw = np.asarray(v, "<f4").reshape(-1).tobytes()
        out |= {raw[i:i + WINDOW] for i in range(0, len(raw) - WINDOW + 1, 4)}
    return out - {ZEROS}


def doubles(values: Sequence[np.ndarray]) -> set[bytes]:
    """Each value as a float64 (how a metric would carry it)."""
    return {x.tobytes() for v in values for x in np.asarray(v, "<f8").reshape(-1)} - {ZEROS}


def found(stream: bytes, patterns: set[bytes]) -> set[bytes]:
    return {p for p in patterns if p in stream}


def touched_rows(delta: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The non-zero rows of the update's tables, one array each: what travels contiguously whether the
    upload is dense or row-sparse (windows never span two rows)."""
    return [row for d in delta if d.ndim == 2 for row in d[np.any(d != 0, axis=1)]]


def assert_locals_absent_and_update_present(stream: bytes, locals_: Sequence[np.ndarray],
                                            update: Sequence[np.ndarray]) -> None:
    local_patterns = windows(locals_) | doubles(locals_)
    assert len(windows(locals_)) >= 8  # enough to search for
    assert not found(stream, local_patterns), "a local variable's values were sent"
    # Positive control: the same search finds the uploaded update in the very same bytes.
    update_patterns = windows(touched_rows(update))
    assert len(update_patterns) >= 20
    hit = len(found(stream, update_patterns)) / len(update_patterns)
    assert hit > 0.95, f"only {hit:.0%} of the update's windows were found: the search is blind"


# ----- a real round against the coordinator ------------------------------------------------------------
def _round_sends_no_local_value(task: TaskSpec, examples: ClientExamples, tmp_path: Path,
                                local_names: list[str]) -> Assignment:
    """One client, one real round through the relay; then the search. Returns the assignment."""
    assigned: list[Assignment] = []

    def rng_for(a: Assignment) -> np.random.Generator:
        assigned.append(a)
        return np.random.default_rng(SEED)

    with SqlStore(f"sqlite:///{tmp_path / 'coordinator.db'}") as store, \
            start_server(Coordinator(store, task)) as server, WireTap(server.port) as relay, \
            FederatedClient(relay.address, task.name, "user-1", examples) as client:
        report = client.participate(rng_for=rng_for, max_wait_s=60)
        assert report.accepted and report.status == "OK"
        assert server.coordinator.wait_for_version(1, timeout=60)
        stream = relay.sent()
        a = assigned[0]
        _, globals_ = client.globals_for(a.model_version)
        model_examples = client.model_examples()
        _, after = client.globals_for(1)
    step = client_step_for(a.model_spec_json, a.training_config_json)
    assert [v.name for v in step.model.local_variables] == local_names
    update = client_update(step, globals_, model_examples, batch_size=a.batch_size,
                           rng=np.random.default_rng(SEED))
    # The coordinator's new version is the old plus exactly this update (one client, server SGD with
    # learning rate 1, no clipping): the recomputation is the client's own update, bit for bit in effect.
    for i, d in zip(step.model.global_trainable, update.delta, strict=True):
        np.testing.assert_allclose(after[i], globals_[i] + d, rtol=0, atol=1e-6)
    fresh = step.model.initial_locals(np.random.default_rng(SEED))
    reconstructed = step.reconstruct(globals_, model_examples, batch_size=a.batch_size,
                                     rng=np.random.default_rng(SEED), use_all_batches=False)
    assert not np.allclose(fresh[0], reconstructed[0])  # reconstruction moved them: two sets to look for
    assert_locals_absent_and_update_present(stream, [*fresh, *reconstructed], update.delta)
    return a


def _rounds(clients: int = 1) -> RoundSettings:
    return RoundSettings(clients_per_round=clients, min_reports=clients, selection_timeout_s=60,
                         reporting_timeout_s=60)


@pytest.mark.parametrize("codec", [UploadCodec.NONE, UploadCodec.ROWSPARSE])
def test_a_real_round_sends_no_local_value(codec: UploadCodec, tmp_path: Path) -> None:
    """Matrix factorization: the user's embedding and bias stay home, dense or row-sparse uploads."""
    data = load_dataset("synthetic", seed=42)
    user = sorted(data.train)[0]
    task = TaskSpec(name="home", model={"kind": "matrix_factorization", "num_items": data.num_items,
                                        "num_factors": 16, "use_biases": True,
                                        "initial_offset": round(data.mean_rating, 3)},
                    training=FedReconConfig(client_optimizer=OptimizerSpec("sgd", 0.5)),
                    aggregation=AggregationConfig(upload_codec=codec, norm_policy="none"),
                    rounds=_rounds())
    a = _round_sends_no_local_value(task, data.train[user], tmp_path, ["user_embedding", "user_bias"])
    assert a.upload_codec == codec.value


def test_a_keras_task_with_a_local_layer_sends_no_local_value(tmp_path: Path) -> None:
    """A Keras model served by the coordinator from its description (item embeddings and a hidden layer
    global, a personal output layer local): the personal layer's values stay home."""
    keras.utils.set_random_seed(0)
    num_items = 40
    items = keras.Input(shape=(), dtype="int32", name="item")
    vectors = keras.layers.Embedding(num_items, 8, name="items")(items)
    hidden = keras.layers.Dense(16, activation="tanh", name="hidden")(vectors)
    rating = keras.layers.Dense(1, name="personal")(hidden)
    architecture = json.loads(keras.Model(items, rating).to_json())
    task = TaskSpec(name="keras-home", batch_size=5,
                    model={"kind": "keras", "architecture": architecture, "local_layers": ["personal"],
                           "objective": "mse"},
                    training=FedReconConfig(client_optimizer=OptimizerSpec("sgd", 0.5)),
                    aggregation=AggregationConfig(norm_policy="none"), rounds=_rounds())
    rng = np.random.default_rng(5)
    examples = ClientExamples(x=rng.choice(num_items, 30, replace=False).astype(np.int32),
                              y=rng.integers(1, 6, 30).astype(np.float32))
    a = _round_sends_no_local_value(task, examples, tmp_path, ["personal/kernel", "personal/bias"])
    assert json.loads(a.model_spec_json)["kind"] == "keras"
