"""Proof that local variables stay on the device (issue 13), from the bytes on the wire.

A real client takes part in a real round against a real coordinator over loopback, through a TCP relay on
127.0.0.1 (``simulations.wire_tap``) that records every byte the client sends (HTTP/2 frames as they leave
the client's socket: not the client's own bookkeeping, not an interceptor). The client's local variables
are then recomputed from the same seed (their fresh draw, and the values reconstruction made of them; the
recomputed update is checked against the model version the coordinator committed from the client's
report) and every 8-byte window of their float32 values, and each value as a float64, is searched for in
the captured bytes: none may be there. The positive control runs the same search for the update the
client uploaded, which must be found, so the search is not blind.

Matrix factorization runs against the coordinator, with plain and with row-sparse uploads. A Keras model
with a local layer cannot be served by the coordinator (a task describes its model as matrix-factorization
JSON; Keras models are Python objects that do not travel), so for Keras the client library's own transport
sends the client step's update through the same relay to a loopback endpoint that only reads
``ReportUpdate`` streams, and the same search runs on those bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import grpc
import keras
import numpy as np
import pytest

from fedrecon.client import FederatedClient
from fedrecon.client.participant import client_step_for
from fedrecon.client.transport import CoordinatorChannel
from fedrecon.core.aggregation import AggregationConfig
from fedrecon.core.batching import ClientExamples
from fedrecon.core.client_work import ClientStep, client_update
from fedrecon.core.compression import UploadCodec
from fedrecon.core.config import FedReconConfig, OptimizerSpec
from fedrecon.core.keras_model import KerasReconstructionModel
from fedrecon.protocol import Assignment
from fedrecon.server.app import start_server
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.store import SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec
from fedrecon.simulations.ratings import load_dataset
from fedrecon.simulations.wire_tap import WireTap
from fedrecon.v1 import coordinator_pb2 as pb
from fedrecon.v1 import coordinator_pb2_grpc as pb_grpc

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


# ----- matrix factorization against the coordinator -----------------------------------------------------
@pytest.mark.parametrize("codec", [UploadCodec.NONE, UploadCodec.ROWSPARSE])
def test_a_real_round_sends_no_local_value(codec: UploadCodec, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = load_dataset("synthetic", seed=42)
    user = sorted(data.train)[0]
    examples = data.train[user]
    task = TaskSpec(name="home", model={"kind": "matrix_factorization", "num_items": data.num_items,
                                        "num_factors": 16, "use_biases": True,
                                        "initial_offset": round(data.mean_rating, 3)},
                    training=FedReconConfig(client_optimizer=OptimizerSpec("sgd", 0.5)),
                    aggregation=AggregationConfig(upload_codec=codec, norm_policy="none"),
                    rounds=RoundSettings(clients_per_round=1, min_reports=1, selection_timeout_s=60,
                                         reporting_timeout_s=60))
    assigned: list[Assignment] = []

    def rng_for(a: Assignment) -> np.random.Generator:
        assigned.append(a)
        return np.random.default_rng(SEED)

    with SqlStore(f"sqlite:///{tmp_path / 'coordinator.db'}") as store, \
            start_server(Coordinator(store, task)) as server, WireTap(server.port) as relay, \
            FederatedClient(relay.address, "home", f"user-{user}", examples) as client:
        report = client.participate(rng_for=rng_for, max_wait_s=30)
        assert report.accepted and report.status == "OK"
        assert server.coordinator.wait_for_version(1, timeout=30)
        stream = relay.sent()
        a = assigned[0]
        _, globals_ = client.globals_for(a.model_version)
        model_examples = client.model_examples()
        _, after = client.globals_for(1)
    assert a.upload_codec == codec.value
    step = client_step_for(a.model_spec_json, a.training_config_json)
    assert [v.name for v in step.model.local_variables] == ["user_embedding", "user_bias"]
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


# ----- a Keras model with a local layer, at the client library's transport ------------------------------
class UserVector(keras.layers.Layer):
    """The user's embedding as a layer (local): scores item vectors against one vector."""

    def __init__(self, dim: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.dim = dim
        self.embedding_initializer = keras.initializers.RandomUniform(-0.5, 0.5)

    def build(self, input_shape: tuple[int, ...]) -> None:
        self.embedding = self.add_weight(shape=(self.dim,), initializer=self.embedding_initializer,
                                         name="embedding")

    def call(self, item_vectors):  # type: ignore[no-untyped-def]
        return keras.ops.sum(item_vectors * self.embedding, axis=-1)


class ReportSink(pb_grpc.CoordinatorServicer):
    """Reads ``ReportUpdate`` streams to the end and accepts them: the other end of the Keras case."""

    def __init__(self) -> None:
        self.reports = 0

    def ReportUpdate(self, request_iterator, context):  # type: ignore[no-untyped-def]
        for _ in request_iterator:
            pass
        self.reports += 1
        return pb.ReportUpdateResponse(accepted=True, message="read")


def test_a_keras_update_with_a_local_layer_sends_no_local_value() -> None:
    keras.utils.set_random_seed(0)
    num_items, factors = 40, 16
    items = keras.Input(shape=(), dtype="int32")
    item_vectors = keras.layers.Embedding(num_items, factors, name="items")(items)
    user = UserVector(factors, name="user")
    model = KerasReconstructionModel(keras.Model(items, user(item_vectors)), [user])
    assert [v.name for v in model.local_variables] == ["user/embedding"]
    step = ClientStep(model, FedReconConfig(client_optimizer=OptimizerSpec("sgd", 0.5)))
    rng = np.random.default_rng(5)
    examples = ClientExamples(x=rng.choice(num_items, 30, replace=False).astype(np.int32),
                              y=rng.integers(1, 6, 30).astype(np.float32))
    globals_ = model.initial_globals(0)
    update = client_update(step, globals_, examples, batch_size=5, rng=np.random.default_rng(SEED))
    assert {f.name for f in dataclasses.fields(update)} == {"delta", "weight", "metrics"}
    fresh = model.initial_locals(np.random.default_rng(SEED))
    reconstructed = step.reconstruct(globals_, examples, batch_size=5, rng=np.random.default_rng(SEED),
                                     use_all_batches=False)
    assert not np.allclose(fresh[0], reconstructed[0])

    sink = ReportSink()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_CoordinatorServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with WireTap(port) as relay:
            channel = CoordinatorChannel(relay.address)
            assignment = Assignment(task_name="keras", round_id=1, round_num=1, model_version=0, token="t",
                                    deadline=datetime.now(UTC), model_spec_json="{}",
                                    training_config_json="{}", batch_size=5)
            trainable = [model.global_variables[i].name for i in model.global_trainable]
            outcome = channel.report(assignment, "keras-user", trainable, update.delta, update.weight,
                                     update.metrics)
            channel.close()
            stream = relay.sent()
    finally:
        server.stop(grace=None)
    assert outcome.accepted and sink.reports == 1
    assert_locals_absent_and_update_present(stream, [*fresh, *reconstructed], update.delta)
