"""The per-report digest and finiteness check of the coordinator's hot path (``server.update_checks``)."""

from __future__ import annotations

import numpy as np

from fedrecon.core.compression import RowSparse
from fedrecon.server.update_checks import DIGEST_PREFIX, all_finite, update_digest


def test_the_digest_tells_identical_updates_from_different_ones() -> None:
    delta = [np.arange(12, dtype=np.float32).reshape(3, 4), np.float32(0.5) * np.ones(3, np.float32)]
    same = [d.copy() for d in delta]
    digest = update_digest(2.0, delta)
    assert digest.startswith(DIGEST_PREFIX) and len(digest) == len(DIGEST_PREFIX) + 32
    assert update_digest(2.0, same) == digest  # a retry: same weight, same values
    assert update_digest(3.0, delta) != digest  # another weight
    changed = [delta[0].copy(), delta[1]]
    changed[0][2, 3] = np.nextafter(changed[0][2, 3], np.float32(100))  # one ulp in one value
    assert update_digest(2.0, changed) != digest
    # A non-contiguous view digests as its values (no copy needed by the caller).
    assert update_digest(2.0, [np.asfortranarray(delta[0]), delta[1]]) == digest


def test_a_row_sparse_tensor_digests_by_rows_and_values() -> None:
    values = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    a = RowSparse((5, 2), np.array([0, 3], np.int32), values)
    b = RowSparse((5, 2), np.array([0, 4], np.int32), values)
    assert update_digest(1.0, [a]) == update_digest(1.0, [RowSparse((5, 2), np.array([0, 3]), values.copy())])
    assert update_digest(1.0, [a]) != update_digest(1.0, [b])


def test_all_finite_is_exact_even_where_the_sum_of_squares_overflows() -> None:
    assert all_finite(np.zeros((4, 3), np.float32))
    assert all_finite(np.array([], np.float32))
    huge = np.full(10, 3e38, np.float32)  # finite, but its sum of squares overflows float32
    assert all_finite(huge)
    for bad in (np.nan, np.inf, -np.inf):
        x = np.ones((5, 5), np.float32)
        x[4, 2] = bad
        assert not all_finite(x)
    mixed = huge.copy()
    mixed[3] = np.nan
    assert not all_finite(mixed)
    assert all_finite(np.float32(1.5)) and not all_finite(np.float32(np.inf))


def test_a_report_is_decoded_checked_and_folded_without_a_model_sized_copy() -> None:
    """The coordinator's per-report path (chunk read from the received message, digest, finiteness, fold
    into the running sum) allocates far less than the update itself: no protobuf copy of the tensor, no
    dense or float64 temporary of the model's size (tracemalloc sees numpy's and Python's allocations)."""
    import tracemalloc

    from fedrecon.core.aggregation import AggregationConfig, build_aggregator
    from fedrecon.tensors import TensorAssembler, TensorLayout, chunk_view
    from fedrecon.v1 import coordinator_pb2 as pb

    shape = (2047, 256)  # 2 MiB of float32 (4 MiB as float64) in one chunk; protobuf's framing leaves the
    # tensor bytes 8-byte aligned in the message (see ``TensorAssembler``)
    update = np.random.default_rng(0).normal(0.0, 1e-3, shape).astype(np.float32)
    message = pb.ReportUpdateRequest(chunk=pb.TensorChunk(data=update.tobytes())).SerializeToString()
    aggregator = build_aggregator(AggregationConfig(), [shape], weight_cap=100.0, max_clients=10)
    dense_bytes = update.nbytes
    tracemalloc.start()
    try:
        assembler = TensorAssembler([TensorLayout("t", np.dtype("<f4"), shape)])
        chunk = chunk_view(message)
        assert chunk is not None
        assembler.add(chunk)
        delta = assembler.finish()
        digest = update_digest(3.0, delta)
        finite = all_finite(delta[0])
        folded = aggregator.fold_one(delta, 3.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert finite and digest.startswith(DIGEST_PREFIX) and not folded.refused
    # What remains is the fold's fixed scratch block (``compression.FOLD_BLOCK``), whatever the model's size.
    assert peak < dense_bytes / 3, f"{peak} bytes allocated for a {dense_bytes}-byte update"
    np.testing.assert_allclose(aggregator.mean()[0], update, rtol=1e-6)  # type: ignore[index]
