"""Property-based fuzzing of the wire decoding and of ``ReportUpdate``: malformed input is refused cleanly.

Two families of properties:

* Tensor decoding (``fedrecon.tensors``): random manifests, random chunk sequences and mutations of valid
  streams raise nothing but ``TensorDecodeError``; a chunk sequence is accepted exactly when a small
  reference model of the framing rules accepts it, with the very bytes it carried; valid streams round-trip
  exactly.
* ``ReportUpdate`` over real gRPC against a running coordinator: random and mutated report streams only
  ever end in a documented refusal (never UNKNOWN or INTERNAL), a report is accepted exactly when every
  rule holds, and a refused report never changes the open round's aggregate or the model version; a valid
  report is folded exactly once.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedrecon.core.aggregation import AggregationConfig
from fedrecon.core.config import FedReconConfig, OptimizerSpec
from fedrecon.protocol import Assignment
from fedrecon.server.app import start_server
from fedrecon.server.clock import ManualClock
from fedrecon.server.coordinator import MAX_METRIC_KEY_CHARS, MAX_METRICS, MAX_WEIGHT, Coordinator
from fedrecon.server.store import SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec
from fedrecon.tensors import (
    TensorDecodeError,
    chunks,
    decode_tensor_stream,
    layouts_from_manifest,
    manifest,
    tensor_stream,
)
from fedrecon.v1 import coordinator_pb2 as pb
from fedrecon.v1 import coordinator_pb2_grpc as pb_grpc

FAST = settings(max_examples=150, deadline=None)
INT64 = (-(2**63), 2**63 - 1)
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
WIRE_DTYPES = [np.dtype("<f4"), np.dtype("<f8"), np.dtype("<i4"), np.dtype("<i8"),
               np.dtype(">f4"), np.dtype(">i8")]
ITEMSIZE = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT64: 8, pb.DTYPE_INT32: 4, pb.DTYPE_INT64: 8}


# ----- tensor decoding ----------------------------------------------------------------------------------

def _dims() -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(0, 8),
        st.integers(-3, -1),
        st.sampled_from([2**31, 2**32, 2**62, 2**63 - 1, -(2**63), 10**6]),
        st.integers(*INT64),
    )


@st.composite
def _random_manifests(draw: st.DrawFn) -> pb.TensorManifest:
    specs = draw(st.lists(st.builds(
        pb.TensorSpec,
        name=st.one_of(st.text(max_size=12), st.sampled_from(["item_embedding", "user_embedding", ""])),
        dtype=st.one_of(st.sampled_from(list(ITEMSIZE)), st.integers(-(2**31), 2**31 - 1)),
        shape=st.lists(_dims(), max_size=5),
    ), max_size=4))
    return pb.TensorManifest(tensors=specs)


def _random_chunks(max_index: int = 4) -> st.SearchStrategy[list[pb.TensorChunk]]:
    return st.lists(st.builds(
        pb.TensorChunk,
        tensor_index=st.one_of(st.integers(0, max_index), st.integers(0, UINT32_MAX)),
        offset=st.one_of(st.integers(0, 64), st.integers(0, UINT64_MAX)),
        data=st.binary(max_size=48),
    ), max_size=8)


def _reference_decode(sizes: Sequence[int], stream: Sequence[pb.TensorChunk]) -> list[bytes] | None:
    """The framing rules, spelled out: the tensors' bytes, or None for a stream that must be refused.

    Tensors are filled in manifest order (empty ones send nothing); each chunk names the tensor being
    filled, starts where the previous one stopped, carries at least one byte and fits; every byte arrives.
    """
    filled = [b""] * len(sizes)
    current = 0
    for c in stream:
        while current < len(sizes) and len(filled[current]) == sizes[current]:
            current += 1
        if current == len(sizes) or c.tensor_index != current or c.offset != len(filled[current]):
            return None
        if not c.data:
            return None
        if len(filled[current]) + len(c.data) > sizes[current]:
            return None
        filled[current] += c.data
    if any(len(f) != s for f, s in zip(filled, sizes, strict=True)):
        return None
    return filled


def _decode_like_reference(layout_manifest: pb.TensorManifest, stream: Sequence[pb.TensorChunk]) -> None:
    """Decode; it must raise only TensorDecodeError, and succeed exactly when the reference model does."""
    sizes = [layout.num_bytes for layout in layouts_from_manifest(layout_manifest)]
    expected = _reference_decode(sizes, stream)
    messages = [pb.TensorStreamMessage(manifest=layout_manifest),
                *(pb.TensorStreamMessage(chunk=c) for c in stream)]
    try:
        _, arrays = decode_tensor_stream(messages)
    except TensorDecodeError:
        assert expected is None, "a well-framed stream was refused"
        return
    assert expected is not None, "a malformed stream was accepted"
    assert [a.tobytes() for a in arrays] == expected


@st.composite
def _named_arrays(draw: st.DrawFn, max_tensors: int = 4) -> tuple[list[str], list[np.ndarray]]:
    n = draw(st.integers(0, max_tensors))
    arrays = [draw(hnp.arrays(draw(st.sampled_from(WIRE_DTYPES)),
                              hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))
              for _ in range(n)]
    return [f"t{i}" for i in range(n)], arrays


@FAST
@given(_random_manifests(), st.integers(0, 10**6), _random_chunks())
def test_random_manifests_only_raise_decode_errors(m: pb.TensorManifest, max_bytes: int,
                                                   stream: list[pb.TensorChunk]) -> None:
    messages = [pb.TensorStreamMessage(manifest=m), *(pb.TensorStreamMessage(chunk=c) for c in stream)]
    try:
        layouts = layouts_from_manifest(m, max_bytes=max_bytes)
    except TensorDecodeError:
        with pytest.raises(TensorDecodeError):
            decode_tensor_stream(messages, max_bytes=max_bytes)
        return
    # Accepted: every dtype known, no negative dims, and the real total within the limit.
    assert all(s.dtype in ITEMSIZE and min(s.shape, default=0) >= 0 for s in m.tensors)
    assert sum(math.prod(s.shape) * ITEMSIZE[s.dtype] for s in m.tensors) <= max_bytes
    assert [la.shape for la in layouts] == [tuple(s.shape) for s in m.tensors]
    with contextlib.suppress(TensorDecodeError):
        decode_tensor_stream(messages, max_bytes=max_bytes)


@FAST
@given(st.lists(st.one_of(
    st.builds(pb.TensorStreamMessage, manifest=_random_manifests()),
    st.builds(pb.TensorStreamMessage, chunk=st.builds(pb.TensorChunk, tensor_index=st.integers(0, 3),
                                                      offset=st.integers(0, 16), data=st.binary(max_size=8))),
    st.just(pb.TensorStreamMessage()),
), max_size=6))
def test_random_message_sequences_only_raise_decode_errors(messages: list[pb.TensorStreamMessage]) -> None:
    manifests = [m.manifest for m in messages if m.WhichOneof("kind") == "manifest"]
    try:
        decode_tensor_stream(messages, max_bytes=4096)
    except TensorDecodeError:
        return
    assert messages and messages[0].WhichOneof("kind") == "manifest" and len(manifests) == 1


@FAST
@given(_named_arrays(), _random_chunks())
def test_random_chunk_sequences_against_a_valid_manifest(named: tuple[list[str], list[np.ndarray]],
                                                         stream: list[pb.TensorChunk]) -> None:
    names, arrays = named
    _decode_like_reference(manifest(names, arrays), stream)


MUTATIONS = ["drop", "duplicate", "reorder", "truncate", "flip", "offset", "index", "shorten", "lengthen"]


def _mutate(draw: st.DrawFn, stream: list[pb.TensorChunk], kind: str) -> list[pb.TensorChunk]:
    """``stream`` with one mutation of ``kind`` applied to a randomly chosen chunk (unchanged if empty)."""
    stream = list(stream)
    if not stream or kind not in MUTATIONS:
        return stream
    i = draw(st.integers(0, len(stream) - 1))
    c = pb.TensorChunk()
    c.CopyFrom(stream[i])
    if kind in ("flip", "shorten") and not c.data:  # a random chunk may carry no byte to flip or cut
        return stream
    if kind == "drop":
        del stream[i]
    elif kind == "duplicate":
        stream.insert(draw(st.integers(0, len(stream))), c)
    elif kind == "reorder":
        stream = draw(st.permutations(stream))
    elif kind == "truncate":
        stream = stream[:i]
    else:
        if kind == "flip":
            data = bytearray(c.data)
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
            c.data = bytes(data)
        elif kind == "offset":
            c.offset = draw(st.one_of(st.integers(0, 200), st.integers(0, UINT64_MAX)))
        elif kind == "index":
            c.tensor_index = draw(st.one_of(st.integers(0, 5), st.integers(0, UINT32_MAX)))
        elif kind == "shorten":
            c.data = c.data[:draw(st.integers(0, len(c.data) - 1))]
        else:
            c.data = c.data + draw(st.binary(min_size=1, max_size=8))
        stream[i] = c
    return stream


@st.composite
def _mutated_streams(draw: st.DrawFn) -> tuple[pb.TensorManifest, list[pb.TensorChunk], str]:
    names, arrays = draw(_named_arrays())
    kind = draw(st.sampled_from([*MUTATIONS, "none"]))
    stream = _mutate(draw, list(chunks(arrays, chunk_bytes=draw(st.integers(1, 40)))), kind)
    return manifest(names, arrays), stream, kind


@FAST
@given(_mutated_streams())
def test_mutated_valid_streams_are_refused_or_decoded_exactly(case: tuple[pb.TensorManifest,
                                                                          list[pb.TensorChunk], str]) -> None:
    m, stream, kind = case
    _decode_like_reference(m, stream)
    if kind in ("drop", "duplicate", "truncate", "shorten", "lengthen") and any(
            layout.num_bytes for layout in layouts_from_manifest(m)):
        with pytest.raises(TensorDecodeError):
            decode_tensor_stream([pb.TensorStreamMessage(manifest=m),
                                  *(pb.TensorStreamMessage(chunk=c) for c in stream)])


@FAST
@given(_named_arrays(max_tensors=5), st.integers(1, 64))
def test_valid_streams_round_trip_exactly(named: tuple[list[str], list[np.ndarray]],
                                          chunk_bytes: int) -> None:
    names, arrays = named
    messages = list(tensor_stream(names, arrays, chunk_bytes))
    assert all(0 < len(m.chunk.data) <= chunk_bytes for m in messages[1:])
    got_names, got = decode_tensor_stream(messages, max_bytes=sum(a.nbytes for a in arrays))
    assert got_names == names
    for a, b in zip(arrays, got, strict=True):
        assert b.dtype == a.dtype.newbyteorder("=") and b.shape == a.shape
        assert b.tobytes() == a.astype(a.dtype.newbyteorder("=")).tobytes()  # bit-exact, NaN payloads too
        np.testing.assert_array_equal(a, b)


def _decode_single(shape: list[int], max_bytes: int = 1 << 20) -> None:
    m = pb.TensorManifest(tensors=[pb.TensorSpec(name="x", dtype=pb.DTYPE_FLOAT32, shape=shape)])
    decode_tensor_stream([pb.TensorStreamMessage(manifest=m)], max_bytes=max_bytes)


# Regressions found by the properties above: element counts used to wrap around in int64.
def test_shape_whose_element_count_overflows_int64_is_refused() -> None:
    with pytest.raises(TensorDecodeError):
        _decode_single([2**32, 2**32])


def test_shape_whose_element_count_wraps_negative_is_refused() -> None:
    with pytest.raises(TensorDecodeError):
        _decode_single([2**62, 2], max_bytes=0)


@pytest.mark.parametrize("shape", [[2**40, 0, 2**40], [1] * 65], ids=["zero-size-huge", "65-dims"])
def test_shape_numpy_cannot_hold_is_refused(shape: list[int]) -> None:
    m = pb.TensorManifest(tensors=[pb.TensorSpec(name="x", dtype=pb.DTYPE_FLOAT32, shape=shape)])
    stream = [pb.TensorStreamMessage(manifest=m)]
    if 0 not in shape:
        stream.append(pb.TensorStreamMessage(chunk=pb.TensorChunk(tensor_index=0, offset=0, data=b"\0" * 4)))
    with pytest.raises(TensorDecodeError):
        decode_tensor_stream(stream, max_bytes=1 << 20)


# ----- ReportUpdate through the servicer ----------------------------------------------------------------

TASK = "movies"
MODEL = {"kind": "matrix_factorization", "num_items": 6, "num_factors": 2}
NORM_BOUND = 50.0
DELTA_SHAPE = (6, 2)


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


# A claimed weight counts at most batch_size × post_recon_steps_max (the default cap; test_aggregation.py).
WEIGHT_CAP = 5 * 50


class Harness:
    """One coordinator whose round stays open for the whole module: selection never ends (the clock
    stands still) and the goal is far away, so no refusal can close the round and commit it."""

    def __init__(self, store: SqlStore) -> None:
        rounds = RoundSettings(clients_per_round=100_000, over_selection=1.0, min_reports=1,
                               selection_timeout_s=1e6, reporting_timeout_s=1e6, retry_delay_s=(1.0, 3.0),
                               # every fuzz client checks in from one address while the clock stands still
                               max_check_ins_per_minute_per_peer=1e12)
        task = TaskSpec(name=TASK, model=MODEL, rounds=rounds,
                        aggregation=AggregationConfig(max_update_norm=NORM_BOUND, norm_policy="reject"),
                        training=FedReconConfig(server_optimizer=OptimizerSpec("sgd", 1.0)))
        self.coordinator = Coordinator(store, task, clock=ManualClock())
        self.server = start_server(self.coordinator)
        self.channel = grpc.insecure_channel(self.server.address)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self._ids = itertools.count()

    def assign(self) -> tuple[str, Assignment]:
        client = f"fuzz-client-{next(self._ids)}"
        result = self.coordinator.check_in(TASK, client, 1)
        assert isinstance(result, Assignment), result
        return client, result

    def state(self) -> tuple[int, float, int, int | None]:
        c = self.coordinator
        r = c._round
        assert r is not None, "the round stays open for the whole module"
        return r.aggregate.num_updates, r.aggregate.total_weight, c.version, r.round_id

    def report(self, messages: Sequence[pb.ReportUpdateRequest]) -> pb.ReportUpdateResponse:
        """One ReportUpdate call over gRPC; a refusal raises ``Aborted`` with the status the client saw."""
        try:
            return self.stub.ReportUpdate(iter(messages), timeout=60)
        except grpc.RpcError as err:
            raise Aborted(err.code(), err.details()) from None  # type: ignore[attr-defined]

    def close(self) -> None:
        self.channel.close()
        self.server.stop()


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    path: Path = tmp_path_factory.mktemp("fuzz") / "store.db"
    with SqlStore(f"sqlite:///{path}") as store:
        h = Harness(store)
        try:
            yield h
        finally:
            h.close()


def _delta_manifest() -> pb.TensorManifest:
    return manifest(["item_embedding"], [np.zeros(DELTA_SHAPE, np.float32)])


def _report_messages(client: str, a: Assignment, weight: float, delta: np.ndarray,
                     metrics: dict[str, float] | None = None, chunk_bytes: int = 16
                     ) -> list[pb.ReportUpdateRequest]:
    header = pb.ReportHeader(task_name=TASK, client_id=client, round_id=a.round_id,
                             assignment_token=a.token, weight=weight, metrics=metrics or {},
                             manifest=manifest(["item_embedding"], [delta]))
    return [pb.ReportUpdateRequest(header=header),
            *(pb.ReportUpdateRequest(chunk=c) for c in chunks([delta], chunk_bytes))]


_WEIGHTS = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, -1.0, -0.0, 0.0, 1.0, 5e-324, MAX_WEIGHT,
                     MAX_WEIGHT * (1 + 1e-15), 1e308, -1e308]),
    st.floats(0.0, 1000.0),
    st.floats(),
)
_METRICS = st.dictionaries(
    st.one_of(st.sampled_from(["loss", "post_recon_examples"]), st.text(max_size=8)),
    st.one_of(st.floats(0.0, 100.0), st.floats()),
    max_size=3)
_DELTAS = hnp.arrays(np.float32, DELTA_SHAPE, elements=st.one_of(
    st.floats(-3.0, 3.0, width=32), st.floats(width=32)))
_MANIFESTS = st.one_of(
    st.builds(pb.TensorManifest, tensors=st.lists(st.builds(
        pb.TensorSpec,
        name=st.sampled_from(["item_embedding", "user_embedding", "item_bias", "", "item_embedding "]),
        dtype=st.one_of(st.sampled_from(list(ITEMSIZE)), st.integers(-5, 99)),
        shape=st.one_of(st.just([6, 2]), st.just([2]), st.just([2, 6]), st.lists(_dims(), max_size=3)),
    ), max_size=3)),
    _random_manifests(),
)


@st.composite
def _report_cases(draw: st.DrawFn) -> dict[str, object]:
    """A report whose fields are valid (None: filled in with the real value at run time) or random.

    A fifth of the cases are entirely valid, two fifths have one field broken, two fifths are random,
    so that acceptance, each single refusal and combinations are all exercised.
    """
    valid = {"task": None, "client": None, "round": None, "token": None,
             "weight": draw(st.floats(0.0, 1000.0)),
             "metrics": draw(st.dictionaries(st.sampled_from(["loss", "post_recon_examples"]),
                                             st.floats(0.0, 100.0))),
             "manifest": None, "delta": draw(hnp.arrays(np.float32, DELTA_SHAPE,
                                                         elements=st.floats(-3.0, 3.0, width=32))),
             "chunk_bytes": draw(st.integers(1, 64)), "chunks": None, "mutation": None, "extra": None}
    mode = draw(st.sampled_from(["valid", "one-off", "one-off", "random", "random"]))
    if mode == "valid":
        return valid
    randomized = {
        "task": lambda: draw(st.text(max_size=10)),
        "client": lambda: draw(st.one_of(st.just("other"), st.just(""), st.just("x" * 257),
                                         st.text(min_size=1, max_size=10))),
        "round": lambda: draw(st.integers(*INT64)),
        "token": lambda: draw(st.one_of(st.just("other"), st.text(max_size=24))),
        "weight": lambda: draw(_WEIGHTS),
        "metrics": lambda: draw(_METRICS),
        "manifest": lambda: draw(_MANIFESTS),
        "delta": lambda: draw(_DELTAS),
        "chunks": lambda: draw(_random_chunks(max_index=2)),
        "mutation": lambda: draw(st.sampled_from(MUTATIONS)),
        "extra": lambda: draw(st.sampled_from(["header-first-missing", "empty-first", "empty-stream",
                                               "second-header", "empty-message-after"])),
    }
    if mode == "one-off":
        field = draw(st.sampled_from(sorted(randomized)))
        return {**valid, field: randomized[field]()}
    return {**valid, **{k: make() for k, make in randomized.items() if draw(st.booleans())}}


def _norm(delta: np.ndarray) -> float:
    return float(np.sqrt(float(np.sum(np.square(delta, dtype=np.float64)))))


@settings(max_examples=300, deadline=None)
@given(_report_cases(), st.data())
def test_report_update_refuses_cleanly_and_never_touches_the_aggregate(
        harness: Harness, case: dict[str, object], data: st.DataObject) -> None:
    client, a = harness.assign()
    other_client, other = harness.assign()
    delta: np.ndarray = case["delta"]  # type: ignore[assignment]
    weight: float = case["weight"]  # type: ignore[assignment]
    metrics: dict[str, float] = case["metrics"]  # type: ignore[assignment]
    client_id = {None: client, "other": other_client}.get(case["client"], case["client"])  # type: ignore[call-overload]
    token = {None: a.token, "other": other.token}.get(case["token"], case["token"])  # type: ignore[call-overload]
    header = pb.ReportHeader(
        task_name=TASK if case["task"] is None else case["task"], client_id=client_id,
        round_id=a.round_id if case["round"] is None else case["round"], assignment_token=token,
        weight=weight, metrics=metrics,
        manifest=_delta_manifest() if case["manifest"] is None else case["manifest"])
    stream = list(chunks([delta], case["chunk_bytes"])) if case["chunks"] is None else case["chunks"]
    if case["mutation"] is not None:
        stream = _mutate(data.draw, stream, case["mutation"])  # type: ignore[arg-type]
    messages = [pb.ReportUpdateRequest(header=header), *(pb.ReportUpdateRequest(chunk=c) for c in stream)]
    extra = case["extra"]
    if extra == "header-first-missing":
        messages = messages[1:]
    elif extra == "empty-first":
        messages.insert(0, pb.ReportUpdateRequest())
    elif extra == "empty-stream":
        messages = []
    elif extra == "second-header":
        messages.append(pb.ReportUpdateRequest(header=header))
    elif extra == "empty-message-after":
        messages.append(pb.ReportUpdateRequest())

    # What the rules say: the report is accepted exactly when everything about it is right.
    owner = (client_id, token) in ((client, a.token), (other_client, other.token))
    well_framed = (extra is None and header.task_name == TASK and header.round_id == a.round_id
                   and header.manifest == _delta_manifest()
                   and _reference_decode([delta.nbytes], stream) is not None)
    sent = delta
    if well_framed:
        sent = np.frombuffer(b"".join(c.data for c in stream), np.float32).reshape(DELTA_SHAPE)
    valid = (owner and well_framed and math.isfinite(weight) and 0 <= weight <= MAX_WEIGHT
             and all(math.isfinite(v) for v in metrics.values()) and bool(np.isfinite(sent).all())
             and len(metrics) <= MAX_METRICS and all(1 <= len(k) <= MAX_METRIC_KEY_CHARS for k in metrics)
             and _norm(sent) <= NORM_BOUND)

    before = harness.state()
    try:
        response = harness.report(messages)
    except Aborted as aborted:
        event(f"aborted {aborted.code.name}")
        assert aborted.code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), aborted
        assert aborted.details
        assert not valid, f"a valid report was refused: {aborted}"
        assert harness.state() == before, "a refused report changed the aggregate or the model"
        return
    event("accepted")
    assert valid, f"an invalid report was accepted: {response}"
    assert response.accepted
    updates, total, version, round_id = before
    assert harness.state() == (updates + 1, total + min(weight, WEIGHT_CAP), version, round_id)


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float32, DELTA_SHAPE, elements=st.floats(-3.0, 3.0, width=32)),
       st.floats(0.0, 1000.0), st.integers(1, 64), st.integers(1, 64))
def test_valid_report_is_folded_exactly_once(harness: Harness, delta: np.ndarray, weight: float,
                                             chunk_bytes: int, retry_chunk_bytes: int) -> None:
    client, a = harness.assign()
    metrics = {"loss": 0.5, "post_recon_examples": weight}
    updates, total, version, round_id = harness.state()

    first = harness.report(_report_messages(client, a, weight, delta, metrics, chunk_bytes))
    assert first.accepted
    folded = (updates + 1, total + min(weight, WEIGHT_CAP), version, round_id)
    assert harness.state() == folded

    # The same update again (even chunked differently) is an idempotent retry: answered, not folded.
    again = harness.report(_report_messages(client, a, weight, delta, metrics, retry_chunk_bytes))
    assert not again.accepted
    assert harness.state() == folded

    # A different update from the same client is refused, and changes nothing either.
    with pytest.raises(Aborted) as caught:
        harness.report(_report_messages(client, a, weight + 1.0, delta, metrics, chunk_bytes))
    assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert harness.state() == folded


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["nan_weight", "nan_metric", "nan_delta", "norm", "local_manifest", "wrong_shape"]),
       st.integers(1, 64))
def test_refused_client_stays_refused_and_never_folds(harness: Harness, problem: str,
                                                      chunk_bytes: int) -> None:
    """A report refused for its content is the client's answer: a corrected retry is refused as well."""
    client, a = harness.assign()
    delta = np.full(DELTA_SHAPE, 0.5, np.float32)
    weight, metrics = 1.0, {"loss": 0.5}
    bad = delta.copy()
    if problem == "nan_weight":
        weight = math.nan
    elif problem == "nan_metric":
        metrics = {"loss": math.nan}
    elif problem == "nan_delta":
        bad[0, 0] = np.nan
    elif problem == "norm":
        bad[:] = 100.0
    messages = _report_messages(client, a, weight, bad, metrics, chunk_bytes)
    if problem == "local_manifest":
        messages[0].header.manifest.tensors[0].name = "user_embedding"
    elif problem == "wrong_shape":
        messages[0].header.manifest.tensors[0].ClearField("shape")
        messages[0].header.manifest.tensors[0].shape.extend([2, 6])
    before = harness.state()
    with pytest.raises(Aborted) as caught:
        harness.report(messages)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert harness.state() == before
    retry = _report_messages(client, a, 1.0, delta, {"loss": 0.5}, chunk_bytes)
    if problem in ("local_manifest", "wrong_shape"):  # refused while decoding: not an answer for the round
        assert harness.report(retry).accepted
        assert harness.state()[:2] == (before[0] + 1, before[1] + 1.0)
        return
    with pytest.raises(Aborted) as caught:
        harness.report(retry)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert harness.state() == before
