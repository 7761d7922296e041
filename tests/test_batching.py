"""Packing clients into step-major batches, and matrix factorization's ragged views.

The packer gathers every client's batches in one vectorised pass; these tests hold it to the obvious
per-client loop, and hold the ragged, row-bucketed views to the numbers of a tiny hand-made round.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedrecon.core.batching import ClientExamples, _pack_steps, pack_clients
from fedrecon.core.config import FedReconConfig
from fedrecon.core.matrix_factorization import MatrixFactorization


def _reference_pack(xs, ys, schedules, batch_size, num_steps):
    """The per-client loop the vectorised packer replaced (padding slots repeat the client's first
    feature; slots past a client's data repeat its last example with target 0 and mask 0)."""
    feature_shape, target_shape = xs[0].shape[1:], ys[0].shape[1:]
    x = np.zeros((num_steps, len(xs), batch_size, *feature_shape), xs[0].dtype)
    y = np.zeros((num_steps, len(xs), batch_size, *target_shape), np.float32)
    mask = np.zeros((num_steps, len(xs), batch_size), np.float32)
    for c, (cx, cy, steps) in enumerate(zip(xs, ys, schedules, strict=True)):
        if len(cx):
            x[:, c] = cx[0]
        for s, b in enumerate(steps):
            for j in range(batch_size):
                pos = b * batch_size + j
                if pos < len(cy):
                    x[s, c, j], y[s, c, j], mask[s, c, j] = cx[pos], cy[pos], 1.0
                else:
                    x[s, c, j] = cx[len(cy) - 1]
    return x, y, mask


@pytest.mark.parametrize("sequences", [False, True])
def test_vectorised_packing_equals_the_per_client_loop(sequences: bool) -> None:
    rng = np.random.default_rng(3)
    sizes = [7, 0, 1, 12, 5]
    feature = (4,) if sequences else ()
    xs = [rng.integers(0, 50, (n, *feature)).astype(np.int32) for n in sizes]
    ys = [rng.normal(size=(n, *feature)).astype(np.float32) for n in sizes]
    batch_size = 3
    schedules = [(0, 2, 1, 0), (), (0,), (3, 1, 2, 0, 1), (1, 0)]
    packed = _pack_steps(xs, ys, schedules, batch_size)
    x, y, mask = _reference_pack(xs, ys, schedules, batch_size, 5)
    np.testing.assert_array_equal(packed.x, x)
    np.testing.assert_array_equal(packed.y, y)
    np.testing.assert_array_equal(packed.mask, mask)


def test_step_padding_stops_at_the_cap() -> None:
    xs = [np.arange(40, dtype=np.int32)]
    ys = [np.ones(40, np.float32)]
    # 9 steps pad to 16 with a multiple of 8, but never past a cap of 10 (no schedule can be longer)
    assert _pack_steps(xs, ys, [tuple(range(9))], 4, step_multiple=8).num_steps == 16
    capped = _pack_steps(xs, ys, [tuple(range(9))], 4, step_multiple=8, step_cap=10)
    assert capped.num_steps == 10
    assert capped.mask[9:].sum() == 0 and capped.mask[:9].sum() == 36


def test_views_are_ragged_rows_in_client_order() -> None:
    model = MatrixFactorization(num_items=5, num_factors=2)
    views = model.build_views([np.array([3, 1, 3]), np.array([], np.int64), np.array([2, 4])])
    # rows: client 0's items 1 and 3, then client 2's items 2 and 4; the second row tags the owner
    np.testing.assert_array_equal(views.index, [[1, 3, 2, 4], [0, 0, 2, 2]])
    assert [v.tolist() for v in views.x] == [[1, 0, 1], [], [2, 3]]
    with pytest.raises(ValueError, match="out of range"):
        model.build_views([np.array([5])])


def test_bucketed_rows_are_bounded_and_change_nothing() -> None:
    """Padded view rows (item 0, client 0, read by no example) give the same deltas, norms and sums."""
    model = MatrixFactorization(num_items=300, num_factors=4)
    config = FedReconConfig()
    rng = np.random.default_rng(0)
    clients = [ClientExamples(rng.integers(0, 300, n), rng.uniform(1, 5, n).astype(np.float32))
               for n in (30, 41, 12, 55, 23)]
    plain = model.build_views([c.x for c in clients])
    bucketed = model.build_views([c.x for c in clients], bucket_rows=True)
    rows = plain.index.shape[1]
    padded = bucketed.index.shape[1]
    assert rows <= padded <= 1.25 * rows
    assert padded % (1 << ((rows - 1).bit_length() - 3)) == 0  # four sizes per power of two
    np.testing.assert_array_equal(bucketed.index[:, rows:], 0)

    from fedrecon.core.client_work import ClientStep

    step = ClientStep(model, config)
    globals_ = model.initial_globals(1)
    results = []
    for bucket in (False, True):
        packed = pack_clients(model, clients, config, batch_size=4, bucket_rows=bucket,
                              local_rngs=[np.random.default_rng(i) for i in range(len(clients))])
        trained = step.train_clients(globals_, packed)
        results.append((trained.deltas.norms(), trained.deltas.weighted_sum(trained.weights),
                        trained.deltas.stacked(), trained.loss_sum))
    (n0, s0, d0, l0), (n1, s1, d1, l1) = results
    np.testing.assert_allclose(n1, n0, rtol=1e-6)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(s0, s1, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    for a, b in zip(d0, d1, strict=True):
        np.testing.assert_array_equal(b, a)
    # each client's dense delta is non-zero only on the items it rated
    for c, client in enumerate(clients):
        touched = np.flatnonzero(np.abs(d0[0][c]).sum(axis=1))
        assert set(touched) <= set(np.unique(client.x).tolist())
        assert np.isclose(np.linalg.norm(d0[0][c]), n0[c], rtol=1e-5)
