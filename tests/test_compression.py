"""Compressed uploads (issue 13, "Compression"): the codecs' numbers, their strict decoding over real gRPC on
loopback, the coordinator folding what it decoded, and simulate applying the same code in either transport.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from typer.testing import CliRunner

from fedrecon.cli import app
from fedrecon.client.transport import CoordinatorChannel
from fedrecon.core.aggregation import AggregationConfig, StackedDeltas, build_aggregator
from fedrecon.core.algorithm import FedRecon
from fedrecon.core.compression import (
    CodecError,
    DecodedUpdates,
    EncodedTensor,
    RowSparse,
    UploadCodec,
    add_scaled_into,
    decode,
    encode,
    encode_update,
    encoded_size,
    roundtrip,
)
from fedrecon.core.config import FedReconConfig
from fedrecon.core.matrix_factorization import MatrixFactorization
from fedrecon.protocol import Assignment
from fedrecon.server.app import RunningServer, start_server
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.store import SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec
from fedrecon.tensors import TensorDecodeError, TensorLayout, chunks, manifest
from fedrecon.update_encoding import UpdateAssembler, tensor_encoding
from fedrecon.v1 import coordinator_pb2 as pb
from fedrecon.v1 import coordinator_pb2_grpc as pb_grpc

ROWS, COLS = 6, 2
REPO = Path(__file__).resolve().parents[1]


# ----- the codecs' numbers -----------------------------------------------------------------------------
def test_q8_scale_is_per_row_and_rounding_is_unbiased() -> None:
    x = np.array([[1.27, 0.005], [0.0, 0.0], [-0.254, 0.1]], np.float32)
    e = encode(x, UploadCodec.Q8, np.random.default_rng(0))
    np.testing.assert_allclose(e.scales, [0.01, 0.0, 0.002], rtol=1e-6)  # max|row| / 127
    assert e.values.dtype == np.int8 and e.values[0, 0] == 127 and e.values[2, 0] == -127
    assert (e.values[1] == 0).all()
    # 0.005 / 0.01 = 0.5: rounded to 0 or 1 with probability 1/2 each, so the mean of many draws is 0.005.
    rng = np.random.default_rng(1)
    draws = np.array([decode(encode(x, UploadCodec.Q8, rng))[0, 1] for _ in range(4000)])
    assert set(np.round(draws / 0.01).astype(int)) == {0, 1}
    assert abs(draws.mean() - 0.005) < 4 * 0.005 / np.sqrt(4000)  # four standard errors


@pytest.mark.parametrize("codec", [UploadCodec.Q16, UploadCodec.Q8])
def test_quantisation_error_is_below_one_step(codec: UploadCodec) -> None:
    x = np.random.default_rng(2).normal(size=(50, 8)).astype(np.float32)
    e = encode(x, codec, np.random.default_rng(3))
    err = np.abs(decode(e) - x)
    assert (err <= e.scales[:, None] * (1 + 1e-6)).all()
    assert e.values.dtype == codec.value_dtype


def test_a_rank_one_tensor_has_one_scale_and_a_scalar_stays_float32() -> None:
    bias = np.array([0.5, -0.25, 0.0], np.float32)
    e = encode(bias, UploadCodec.Q8, np.random.default_rng(0))
    assert e.scales is not None and e.scales.shape == (1,)
    assert e.scales[0] == pytest.approx(0.5 / 127)
    scalar = encode(np.float32(0.3), UploadCodec.ROWSPARSE_Q8, np.random.default_rng(0))
    assert scalar.values.dtype == np.float32 and scalar.rows is None and scalar.scales is None
    assert len(scalar.payload()) == 4


def test_rowsparse_sends_only_touched_rows_and_is_lossless() -> None:
    x = np.zeros((ROWS, COLS), np.float32)
    x[1], x[4] = [0.5, -1.0], [0.0, 2.0]
    e = encode(x, UploadCodec.ROWSPARSE, np.random.default_rng(0))
    assert e.rows is not None and e.rows.tolist() == [1, 4]
    assert len(e.payload()) == 2 * 4 + 2 * COLS * 4  # two int32 indices, two float32 rows
    back = decode(e)
    assert isinstance(back, RowSparse)
    np.testing.assert_array_equal(back.dense(), x)
    q = encode(x, UploadCodec.ROWSPARSE_Q8, np.random.default_rng(0))
    assert len(q.payload()) == 2 * 4 + 2 * 4 + 2 * COLS  # indices, a scale per row, one byte per value


@pytest.mark.parametrize("codec", list(UploadCodec))
def test_an_all_zero_update_travels_under_every_codec(codec: UploadCodec) -> None:
    """A client with no post-reconstruction examples reports zeros (weight 0): nothing to send sparsely."""
    zeros = [np.zeros((ROWS, COLS), np.float32), np.zeros(ROWS, np.float32), np.float32(0)]
    back = roundtrip(zeros, codec, np.random.default_rng(0))
    for b, z in zip(back, zeros, strict=True):
        np.testing.assert_array_equal(b.dense() if isinstance(b, RowSparse) else b, z)
    if codec.row_sparse:
        assert isinstance(back[0], RowSparse) and len(back[0].indices) == 0


def _sparse(rows: list[int], sent: int | None = None) -> EncodedTensor:
    values = np.zeros((len(rows) if sent is None else sent, COLS), np.float32)
    return EncodedTensor((ROWS, COLS), values, np.array(rows, np.int32))


def _q8(values: int, scale: float, scales: int = ROWS) -> EncodedTensor:
    return EncodedTensor((ROWS, COLS), np.full((ROWS, COLS), values, np.int8), None,
                         np.full(scales, scale, np.float32))


@pytest.mark.parametrize(("encoded", "says"), [
    (_sparse([3, 3]), "row 3 is sent twice"),
    (_sparse([4, 1]), "strictly increasing"),
    (_sparse([6]), "row index 6 is out of range"),
    (_sparse([-1]), "row index -1"),
    (_sparse([1], sent=2), "values of shape [2, 2]"),
    (_q8(0, 0.1, scales=ROWS - 1), "need 6 scales"),
    (_q8(-128, 0.1), "outside [-127, 127]"),
    (_q8(0, np.nan), "finite and non-negative"),
])
def test_decoding_refuses_what_no_encoder_makes(encoded: EncodedTensor, says: str) -> None:
    with pytest.raises(CodecError, match=says.replace("[", r"\[").replace("]", r"\]")):
        decode(encoded)


def test_row_sparse_folds_as_the_dense_update_does() -> None:
    """The coordinator adds a row-sparse update's rows into the running sum: same mean as dense."""
    rng = np.random.default_rng(4)
    dense = [np.zeros((ROWS, COLS), np.float32) for _ in range(3)]
    for i, d in enumerate(dense):
        d[[i, i + 2]] = rng.normal(size=(2, COLS))
    weights = [2.0, 1.0, 5.0]
    sparse_agg = build_aggregator(AggregationConfig(), [(ROWS, COLS)], weight_cap=10, max_clients=3)
    dense_agg = build_aggregator(AggregationConfig(), [(ROWS, COLS)], weight_cap=10, max_clients=3)
    for d, w in zip(dense, weights, strict=True):
        sparse = roundtrip([d], UploadCodec.ROWSPARSE, np.random.default_rng(0))
        assert isinstance(sparse[0], RowSparse)
        sparse_agg.fold_one(sparse, w)
        dense_agg.fold_one([d], w)
    got, want = sparse_agg.mean(), dense_agg.mean()
    assert got is not None and want is not None
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(want[0], sum(w * d for w, d in zip(weights, dense, strict=True)) / 8.0,
                               rtol=1e-6)
    decoded = DecodedUpdates([roundtrip([d], UploadCodec.ROWSPARSE, np.random.default_rng(0))
                              for d in dense])
    np.testing.assert_allclose(decoded.norms(), StackedDeltas([np.stack(dense)]).norms(), rtol=1e-6)


def test_a_round_records_that_its_updates_arrived_encoded() -> None:
    model = MatrixFactorization(ROWS, COLS)
    plain = FedRecon(model, FedReconConfig()).new_aggregate(max_clients=3, batch_size=5)
    coded = FedRecon(model, FedReconConfig(), aggregation=AggregationConfig(upload_codec=UploadCodec.Q8))
    stages = coded.new_aggregate(max_clients=3, batch_size=5).report.stages
    assert stages == ("upload_q8", *plain.report.stages)


def test_the_codec_is_a_task_setting() -> None:
    task = TaskSpec.from_dict({"name": "t", "model": {"kind": "matrix_factorization", "num_items": 3},
                               "aggregation": {"upload_codec": "rowsparse_q8"}})
    assert task.aggregation.upload_codec == UploadCodec.ROWSPARSE_Q8
    assert task.to_dict()["aggregation"]["upload_codec"] == "rowsparse_q8"
    assert AggregationConfig().upload_codec == UploadCodec.NONE
    with pytest.raises(ValueError, match="upload_codec 'q4' is not one of none, q16, q8"):
        AggregationConfig(upload_codec="q4")  # type: ignore[arg-type]


# ----- over real gRPC on loopback ----------------------------------------------------------------------
def _task(codec: UploadCodec, clients: int = 50) -> TaskSpec:
    return TaskSpec(name="compressed", model={"kind": "matrix_factorization", "num_items": ROWS,
                                              "num_factors": COLS},
                    aggregation=AggregationConfig(upload_codec=codec, norm_policy="none"),
                    rounds=RoundSettings(clients_per_round=clients, min_reports=1, selection_timeout_s=600,
                                         reporting_timeout_s=600, max_check_ins_per_minute=1e6))


@contextlib.contextmanager
def _serving(task: TaskSpec, tmp_path: Path) -> Iterator[RunningServer]:
    with SqlStore(f"sqlite:///{tmp_path / 'coordinator.db'}") as store, \
            start_server(Coordinator(store, task)) as server:
        yield server


def _assigned(channel: CoordinatorChannel, client: str) -> Assignment:
    a = channel.check_in("compressed", client)
    assert isinstance(a, Assignment)
    return a


def _raw_report(stub: pb_grpc.CoordinatorStub, a: Assignment, client: str,
                encodings: list[pb.TensorEncoding], payload: bytes, *, cut: int = 0
                ) -> tuple[grpc.StatusCode, str]:
    """Send an item_embedding report with ``encodings`` and ``payload`` as its bytes (less ``cut`` bytes)."""
    header = pb.ReportHeader(task_name="compressed", client_id=client, round_id=a.round_id,
                             assignment_token=a.token, weight=1.0,
                             manifest=manifest(["item_embedding"], [np.zeros((ROWS, COLS), np.float32)]),
                             encodings=encodings)
    data = np.frombuffer(payload[:len(payload) - cut], np.uint8)
    messages = [pb.ReportUpdateRequest(header=header),
                *(pb.ReportUpdateRequest(chunk=c) for c in chunks([data]))]
    try:
        stub.ReportUpdate(iter(messages), timeout=30)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, ""


def _rows(*rows: int) -> bytes:
    return np.array(rows, "<i4").tobytes()


def _floats(n: int, value: float = 0.25) -> bytes:
    return np.full(n, value, "<f4").tobytes()


SPARSE = pb.TensorEncoding(row_sparse=True, num_rows=2)
HOSTILE = {
    "duplicate rows": ([SPARSE], _rows(2, 2) + _floats(2 * COLS), "row 2 is sent twice"),
    "unsorted rows": ([SPARSE], _rows(3, 1) + _floats(2 * COLS), "strictly increasing"),
    "row out of range": ([SPARSE], _rows(1, ROWS) + _floats(2 * COLS), f"row index {ROWS} is out of range"),
    "negative row": ([SPARSE], _rows(-5, 1) + _floats(2 * COLS), "row index -5 is out of range"),
    "more rows than the tensor": ([pb.TensorEncoding(row_sparse=True, num_rows=ROWS + 1)],
                                  _rows(*range(ROWS + 1)) + _floats((ROWS + 1) * COLS), "7 rows announced"),
    "payload too long": ([SPARSE], _rows(1, 2) + _floats(2 * COLS + 1), "does not fit"),
    "two encodings for one tensor": ([SPARSE, SPARSE], _rows(1, 2) + _floats(2 * COLS),
                                     "2 tensor encodings for 1 tensors"),
    "unknown value encoding": ([pb.TensorEncoding(values=7)], _floats(ROWS * COLS),  # type: ignore[arg-type]
                               "unknown value encoding 7"),
    "num_rows without row_sparse": ([pb.TensorEncoding(num_rows=2)], _floats(ROWS * COLS), "not row-sparse"),
    "int8 out of range": ([pb.TensorEncoding(values=pb.VALUE_ENCODING_INT8)],
                          _floats(ROWS, 0.1) + np.full(ROWS * COLS, -128, "<i1").tobytes(),
                          "outside [-127, 127]"),
    "infinite scale": ([pb.TensorEncoding(values=pb.VALUE_ENCODING_INT16)],
                       _floats(ROWS, np.inf) + np.zeros(ROWS * COLS, "<i2").tobytes(),
                       "finite and non-negative"),
    "non-finite values": ([SPARSE], _rows(1, 2) + _floats(2 * COLS, np.nan), "NaN or infinite"),
}


def test_hostile_encoded_reports_are_invalid_argument_with_the_reason(tmp_path: Path) -> None:
    with _serving(_task(UploadCodec.ROWSPARSE), tmp_path) as server:
        channel = CoordinatorChannel(server.address)
        stub = pb_grpc.CoordinatorStub(channel.channel)
        for i, (name, (encodings, payload, says)) in enumerate(HOSTILE.items()):
            client = f"hostile-{i}"
            code, details = _raw_report(stub, _assigned(channel, client), client, encodings, payload)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, details)
            assert says in details, (name, details)
        # A stream that ends early: the bytes announced by the encoding never all arrive.
        code, details = _raw_report(stub, _assigned(channel, "short"), "short", [SPARSE],
                                    _rows(1, 2) + _floats(2 * COLS), cut=3)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "stream ended after" in details
        assert server.coordinator.reports_accepted == 0  # nothing hostile was folded
        # The same stub and assignment machinery do get a well-formed sparse report folded.
        code, _ = _raw_report(stub, _assigned(channel, "honest"), "honest", [SPARSE],
                              _rows(1, 4) + _floats(2 * COLS))
        assert code == grpc.StatusCode.OK and server.coordinator.reports_accepted == 1
        channel.close()


@pytest.mark.parametrize("codec", [UploadCodec.ROWSPARSE, UploadCodec.Q8, UploadCodec.ROWSPARSE_Q16])
def test_the_coordinator_folds_what_the_client_encoded(codec: UploadCodec, tmp_path: Path) -> None:
    """One client, one round (server SGD with learning rate 1): the new model is the old plus exactly the
    decoded update; the assignment named the task's codec; the old client's plain float32 still works."""
    delta = np.zeros((ROWS, COLS), np.float32)
    delta[[0, 3]] = [[0.5, -0.125], [0.03, 0.0]]
    with _serving(_task(codec, clients=2), tmp_path) as server:
        channel = CoordinatorChannel(server.address)
        a = _assigned(channel, "new")
        assert a.upload_codec == codec.value
        _, before = channel.download("compressed", 0)
        sent = channel.bytes_uploaded
        channel.report(a, "new", ["item_embedding"], [delta], 1.0, {}, rng=np.random.default_rng(9))
        compressed = channel.bytes_uploaded - sent
        # An old client ignores the codec and sends plain float32: accepted all the same.
        old = _assigned(channel, "old")
        sent = channel.bytes_uploaded
        channel.report(dataclasses.replace(old, upload_codec="none"), "old", ["item_embedding"],
                       [np.zeros_like(delta)], 1.0, {})
        plain = channel.bytes_uploaded - sent
        assert server.coordinator.wait_for_version(1, timeout=30)
        _, after = channel.download("compressed", 1)
        channel.close()
    decoded = roundtrip([delta], codec, np.random.default_rng(9))[0]
    expected = before[0] + (decoded.dense() if isinstance(decoded, RowSparse) else decoded) / 2.0
    np.testing.assert_allclose(after[0], expected, rtol=0, atol=1e-7)
    assert compressed < plain  # the same report messages, fewer bytes


# ----- simulate ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["q8", "rowsparse_q8"])
def test_simulate_upload_codec_is_the_same_in_process_and_over_grpc(codec: str, tmp_path: Path) -> None:
    args = ["simulate", "--data", "synthetic", "--rounds", "2", "--clients-per-round", "10", "--factors", "8",
            "--eval-every", "2", "--upload-codec", codec]
    runs = {}
    for transport in ("inprocess", "grpc"):
        out = tmp_path / transport
        result = CliRunner().invoke(app, [*args, "--transport", transport, "--out", str(out)])
        assert result.exit_code == 0, result.output
        runs[transport] = json.loads((out / "metrics.json").read_text())
    assert runs["inprocess"]["spec"]["aggregation"]["upload_codec"] == codec
    assert abs(runs["inprocess"]["test"]["rmse"] - runs["grpc"]["test"]["rmse"]) < 1e-4
    plain = CliRunner().invoke(app, [*args[:-2], "--out", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    plain_rmse = json.loads((tmp_path / "plain" / "metrics.json").read_text())["test"]["rmse"]
    assert plain_rmse != runs["inprocess"]["test"]["rmse"]  # the codec did act: q8 rounding moved it


def test_simulate_refuses_an_unknown_codec() -> None:
    result = CliRunner().invoke(app, ["simulate", "--upload-codec", "q4"])
    assert result.exit_code == 2
    assert "q4" in result.output


# ----- the wire decoding, fuzzed -----------------------------------------------------------------------
LAYOUTS = [TensorLayout("table", np.dtype(np.float32), (ROWS, COLS)),
           TensorLayout("bias", np.dtype(np.float32), (ROWS,)),
           TensorLayout("offset", np.dtype(np.float32), ())]


def _assemble(encodings: list[pb.TensorEncoding], payloads: list[bytes]) -> list:
    assembler = UpdateAssembler(LAYOUTS, encodings)
    for c in chunks([np.frombuffer(p, np.uint8) for p in payloads], 7):
        assembler.add(c)
    return assembler.finish()


_ENCODING = st.builds(pb.TensorEncoding, values=st.integers(0, 3), row_sparse=st.booleans(),
                      num_rows=st.integers(0, ROWS + 1))


def _framed(values: int, sparse: bool, rows: int) -> pb.TensorEncoding:
    return pb.TensorEncoding(values=values, row_sparse=sparse, num_rows=rows if sparse else 0)


# Encodings the framing accepts (so random bytes meet the indices, scales and values checks), or anything.
_WELL_FRAMED = st.tuples(*(st.builds(_framed, st.integers(0, 2), st.booleans() if rank else st.just(False),
                                     st.integers(0, ROWS)) for rank in (2, 1, 0))).map(list)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_WELL_FRAMED, st.lists(_ENCODING, max_size=4)), st.data())
def test_random_encodings_and_bytes_only_raise_decode_errors(encodings: list[pb.TensorEncoding],
                                                             data: st.DataObject) -> None:
    """Random bytes, mostly of the length the encodings announce (so decoding gets past the framing and
    meets random indices, scales and values): decoded into the right shapes, or a ``TensorDecodeError``."""
    payloads = []
    for i, layout in enumerate(LAYOUTS):
        size = layout.num_bytes
        if i < len(encodings) and encodings[i].values <= 2:
            e = encodings[i]
            dtype = np.dtype({0: "<f4", 1: "<i2", 2: "<i1"}[e.values])
            size = encoded_size(layout.shape, dtype, e.num_rows if e.row_sparse else None)
        size += data.draw(st.sampled_from([0, 0, 0, 1, -1]))
        payloads.append(data.draw(st.binary(min_size=max(size, 0), max_size=max(size, 0))))
    try:
        out = _assemble(encodings, payloads)
    except TensorDecodeError as err:
        event(str(err).split(":")[-1][:30])
        return
    event("decoded")
    assert [tuple(t.shape) for t in out] == [layout.shape for layout in LAYOUTS]
    assert all(t.dtype == np.float32 for t in out)


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float32, (ROWS, COLS), elements=st.floats(-4, 4, width=32)),
       st.lists(st.booleans(), min_size=ROWS, max_size=ROWS), st.sampled_from(list(UploadCodec)),
       st.integers(0, 2**32))
def test_the_wire_decodes_exactly_what_the_simulator_decodes(table: np.ndarray, zero_rows: list[bool],
                                                               codec: UploadCodec, seed: int) -> None:
    """Encoded, sent as bytes and decoded by the coordinator's assembler = ``roundtrip`` (the simulator)."""
    table = np.where(np.array(zero_rows)[:, None], np.float32(0), table)
    delta = [table, table[:, 0].copy(), np.float32(0.5)]
    expected = roundtrip(delta, codec, np.random.default_rng(seed))
    if codec == UploadCodec.NONE:
        payloads, encodings = [np.asarray(d, "<f4").tobytes() for d in delta], []
    else:
        encoded = encode_update(delta, codec, np.random.default_rng(seed))
        payloads, encodings = [e.payload() for e in encoded], [tensor_encoding(e) for e in encoded]
    for got, want in zip(_assemble(encodings, payloads), expected, strict=True):
        assert type(got) is type(want)
        dense = got.dense() if isinstance(got, RowSparse) else got
        np.testing.assert_array_equal(dense, want.dense() if isinstance(want, RowSparse) else want)


def test_compression_table_smoke_writes_the_documented_json(tmp_path: Path) -> None:
    """Two clients' bytes and two training rounds per codec, on the embedded synthetic data."""
    out = tmp_path / "compression.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "compression_table.py"), "--data", "synthetic",
         "--rounds", "2", "--clients-per-round", "10", "--byte-clients", "2", "--codecs", "none,rowsparse_q8",
         "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["codec"]: r for r in json.loads(out.read_text())["compression"]}
    assert set(rows) == {"none", "rowsparse_q8"}
    trainable_bytes = (600 * 50 + 600 + 1) * 4  # tuned model, 600 synthetic items: table, biases, offset
    assert trainable_bytes < rows["none"]["upload_bytes_per_client"] < trainable_bytes + 3000
    assert rows["rowsparse_q8"]["upload_bytes_per_client"] < trainable_bytes / 10
    for r in rows.values():
        assert {"codec", "upload_bytes_per_client", "rmse"} <= set(r) and 0.5 < r["rmse"] < 4.0
        assert r["connections"] == 2  # one per client: the bytes are each client's own


def test_a_retried_compressed_report_is_idempotent(tmp_path: Path) -> None:
    """The same encoded update again (same rounding) is "already accepted"; other rounding of the same delta
    is a different update (ALREADY_EXISTS), as for plain reports."""
    delta = np.zeros((ROWS, COLS), np.float32)
    delta[[1, 5]] = [[0.3, -0.7], [0.01, 0.02]]
    with _serving(_task(UploadCodec.ROWSPARSE_Q8), tmp_path) as server:
        channel = CoordinatorChannel(server.address)
        a = _assigned(channel, "c")
        first = channel.report(a, "c", ["item_embedding"], [delta], 1.0, {}, rng=np.random.default_rng(1))
        again = channel.report(a, "c", ["item_embedding"], [delta], 1.0, {}, rng=np.random.default_rng(1))
        with pytest.raises(grpc.RpcError) as other:
            channel.report(a, "c", ["item_embedding"], [delta], 1.0, {}, rng=np.random.default_rng(2))
        channel.close()
    assert first.accepted and not again.accepted and "already accepted" in again.message
    assert other.value.code() == grpc.StatusCode.ALREADY_EXISTS  # type: ignore[attr-defined]


@pytest.mark.parametrize(("shape", "touched", "row_by_row"), [
    ((3615, 51), 150, True), ((40, 3, 4), 5, True), ((64, 8), 16, True), ((64, 8), 17, False),
    ((64, 8), 0, True), ((2047, 256), 2047, False), ((300,), 10, False)])
def test_folding_a_mostly_zero_update_row_by_row_gives_the_dense_sums_bit_for_bit(
        shape: tuple[int, ...], touched: int, row_by_row: bool) -> None:
    """``add_scaled_into`` adds only the non-zero rows of a matrix whose rows are mostly zero (at most
    ``SPARSE_ROW_SHARE``: 16 of 64 rows here, not 17): successive folds, one with a row of -0.0, match
    ``acc += float64(x) * a`` exactly, whichever path each took."""
    from fedrecon.core.compression import _non_zero_rows

    rng = np.random.default_rng(touched)
    acc, expected = np.zeros(shape), np.zeros(shape)
    for fold in range(4):
        x = np.zeros(shape, np.float32)
        rows = rng.choice(shape[0], touched, replace=False)
        x[rows] = rng.normal(0.0, 1.0, (touched, *shape[1:]))
        if fold == 2:
            x[rows[:1] if touched else 0] = -0.0
        assert (_non_zero_rows(x) is not None) == row_by_row
        a = float(rng.uniform(0.0, 100.0))
        add_scaled_into(acc, x, a)
        expected += x.astype(np.float64) * np.float64(a)
        assert acc.tobytes() == expected.tobytes()
