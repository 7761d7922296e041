"""Compressed uploads: cheaper encodings of a client's delta, and their strict decoding.

A task chooses one codec (``AggregationConfig.upload_codec``); the simulator and the coordinator's clients
use these very functions, so a codec's effect on accuracy measured by ``fedrecon simulate`` is the effect
it has on a coordinator's rounds.

* ``none``: every value as float32 (the default, and what clients that predate compression send).
* ``q16`` / ``q8``: each value as a 16- or 8-bit integer q times a float32 scale s, rounded stochastically
  so that the decoded value is unbiased. With L = 32767 (q16) or 127 (q8) and s = max|x| / L over a *row*
  (the first axis: one scale per item of an embedding table) for tensors of rank >= 2, over the whole
  tensor for rank 1: q = floor(x / s + u), u ~ U[0, 1), so q is in [-L, L], E[q s] = x, and each value is
  off by less than s. Scalars (rank 0) stay float32: a scale would cost as much as the value.
* ``rowsparse``: for tensors of rank >= 1, only the rows that are not all zero (the rows a client
  touched: an item embedding's rows for the items it trained on; untouched rows of a delta are exactly
  zero) as strictly increasing int32 indices plus their float32 values. Lossless.
* ``rowsparse_q16`` / ``rowsparse_q8``: the non-zero rows, their values quantised as above (the scale of a
  rank-1 tensor is over the rows sent).

Decoding is strict (``CodecError`` says what is wrong): indices strictly increasing (no duplicates) and in
range, scales finite and non-negative, integers within [-L, L], every length exactly as announced. A
decoded row-sparse tensor stays row-sparse (``RowSparse``) so the aggregation can add its rows into the
running sum without a dense copy (``DecodedUpdates``).

Compression happens after the client step and before aggregation, so it composes with clipping and
central noise; it cannot compose with secure aggregation, which sums masked field elements of fixed,
dense layout (refused together, see ``AggregationConfig``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np


class UploadCodec(StrEnum):
    NONE = "none"
    Q16 = "q16"
    Q8 = "q8"
    ROWSPARSE = "rowsparse"
    ROWSPARSE_Q16 = "rowsparse_q16"
    ROWSPARSE_Q8 = "rowsparse_q8"

    @property
    def row_sparse(self) -> bool:
        return self in (UploadCodec.ROWSPARSE, UploadCodec.ROWSPARSE_Q16, UploadCodec.ROWSPARSE_Q8)

    @property
    def value_dtype(self) -> np.dtype:
        """What a value travels as: float32, int16 or int8."""
        if self in (UploadCodec.Q16, UploadCodec.ROWSPARSE_Q16):
            return np.dtype(np.int16)
        if self in (UploadCodec.Q8, UploadCodec.ROWSPARSE_Q8):
            return np.dtype(np.int8)
        return np.dtype(np.float32)


#: The largest integer magnitude of each quantised value type (symmetric, so zero is exact).
LEVELS = {np.dtype(np.int16): 32767, np.dtype(np.int8): 127}


class CodecError(ValueError):
    """An encoded tensor that is not a valid encoding of a tensor of its announced shape."""


@dataclass(frozen=True)
class RowSparse:
    """A tensor that is zero except in the rows ``indices`` (strictly increasing), which hold ``values``."""

    shape: tuple[int, ...]
    indices: np.ndarray  # [k] integers in [0, shape[0])
    values: np.ndarray  # [k, *shape[1:]] float32

    @property
    def dtype(self) -> np.dtype:
        return self.values.dtype

    def dense(self) -> np.ndarray:
        out = np.zeros(self.shape, self.values.dtype)
        out[self.indices] = self.values
        return out


#: One tensor of a decoded update: dense, or row-sparse.
UpdateTensor = np.ndarray | RowSparse


@dataclass(frozen=True)
class EncodedTensor:
    """One tensor as it travels: optional row indices, optional scales, then the values."""

    shape: tuple[int, ...]
    values: np.ndarray  # float32, int16 or int8: [rows sent, *shape[1:]] (rank 0: shape ())
    rows: np.ndarray | None = None  # int32 [rows sent], strictly increasing; None: every row
    # float32: [rows sent] for rank >= 2, [1] otherwise; None when the values are float32
    scales: np.ndarray | None = None

    def payload(self) -> bytes:
        """The bytes the tensor's chunks carry (see ``TensorEncoding`` in the wire contract)."""
        parts = [self.rows.astype("<i4") if self.rows is not None else None,
                 self.scales.astype("<f4") if self.scales is not None else None,
                 self.values.astype(self.values.dtype.newbyteorder("<"))]
        return b"".join(np.ascontiguousarray(p).tobytes() for p in parts if p is not None)


def scale_count(shape: Sequence[int], rows_sent: int) -> int:
    """How many scales a quantised tensor of ``shape`` carries: one per row sent for rank >= 2."""
    return rows_sent if len(shape) >= 2 else 1


def encoded_size(shape: Sequence[int], value_dtype: np.dtype, rows_sent: int | None) -> int:
    """Payload bytes of a tensor of ``shape`` sent with ``rows_sent`` rows (None: every row)."""
    row_size = math.prod(shape[1:]) if shape else 1
    n_rows = rows_sent if rows_sent is not None else (shape[0] if shape else 1)
    size = n_rows * row_size * value_dtype.itemsize
    if rows_sent is not None:
        size += 4 * rows_sent
    if value_dtype != np.float32:
        size += 4 * scale_count(shape, n_rows)
    return size


def encode(delta: np.ndarray, codec: UploadCodec, rng: np.random.Generator) -> EncodedTensor:
    """``delta`` (float32) as ``codec`` sends it; ``rng`` draws the stochastic rounding (none otherwise)."""
    x = np.asarray(delta, np.float32)
    shape = tuple(x.shape)
    if x.ndim == 0:  # a scalar: float32 whatever the codec
        return EncodedTensor(shape, x.copy())
    rows = None
    row_size = math.prod(shape[1:])  # explicit: a reshape to (0, -1) is ambiguous for numpy
    if codec.row_sparse:
        flat = x.reshape(len(x), row_size)
        rows = np.flatnonzero(np.any(flat != 0, axis=1)).astype(np.int32)
        x = x[rows]
    target = codec.value_dtype
    if target == np.float32:
        return EncodedTensor(shape, x, rows)
    levels = LEVELS[target]
    per_row = x.ndim >= 2
    flat = x.reshape(len(x), row_size) if per_row else x.reshape(1, x.size)
    peak = np.abs(flat).max(axis=1) if flat.size else np.zeros(len(flat), np.float32)
    scales = (peak.astype(np.float64) / levels).astype(np.float32)
    # A scale rounded down to float32 could put |x / s| above L: take the next float up where it did.
    low = scales.astype(np.float64) * levels < peak
    scales[low] = np.nextafter(scales[low], np.float32(np.inf))
    # Only rows with a non-zero value have anything to round (an untouched row of a delta is exactly
    # zero), so only they draw from ``rng``: the cost follows the rows a client touched.
    q = np.zeros(flat.shape, target)
    live = np.flatnonzero(scales > 0)
    if len(live):
        part = flat[live] / scales[live].astype(np.float64)[:, None]
        q[live] = np.clip(np.floor(part + rng.random(part.shape)), -levels, levels)  # clip: a no-op
    return EncodedTensor(shape, q.reshape(x.shape), rows, scales)


def decode(encoded: EncodedTensor) -> UpdateTensor:
    """The float32 tensor ``encoded`` stands for (row-sparse when its rows were chosen); ``CodecError`` if it
    is not a valid encoding of a tensor of ``encoded.shape``."""
    shape, values = encoded.shape, encoded.values
    if not shape and encoded.rows is not None:
        raise CodecError("a scalar has no rows to send sparsely")
    rows = encoded.rows
    if rows is not None:
        _check_rows(rows, shape[0])
        n_rows = len(rows)
    else:
        n_rows = shape[0] if shape else 1
    expected = (n_rows, *shape[1:]) if shape else ()
    if tuple(values.shape) != expected:
        raise CodecError(f"values of shape {list(values.shape)} where {list(expected)} is expected")
    if values.dtype == np.float32:
        if encoded.scales is not None:
            raise CodecError("float32 values take no scales")
        dense = values
    else:
        dense = _dequantised(values, encoded.scales, shape, n_rows)
    if rows is None:
        return dense
    return RowSparse(shape, rows, dense)


def _check_rows(rows: np.ndarray, num_rows: int) -> None:
    if rows.ndim != 1:
        raise CodecError("row indices must be a list")
    if len(rows) > num_rows:
        raise CodecError(f"{len(rows)} rows sent for a tensor of {num_rows} rows")
    if len(rows) == 0:
        return
    if int(rows.min()) < 0 or int(rows.max()) >= num_rows:
        bad = int(rows[(rows < 0) | (rows >= num_rows)][0])
        raise CodecError(f"row index {bad} is out of range (the tensor has {num_rows} rows)")
    steps = np.diff(rows.astype(np.int64))
    if (steps == 0).any():
        raise CodecError(f"row {int(rows[1:][steps == 0][0])} is sent twice")
    if (steps < 0).any():
        raise CodecError("row indices must be strictly increasing")


def _dequantised(values: np.ndarray, scales: np.ndarray | None, shape: tuple[int, ...], n_rows: int
                 ) -> np.ndarray:
    levels = LEVELS.get(values.dtype)
    if levels is None:
        raise CodecError(f"values of dtype {values.dtype} cannot be quantised values")
    count = scale_count(shape, n_rows)
    if scales is None or scales.shape != (count,):
        raise CodecError(f"quantised values need {count} scales, got "
                         f"{'none' if scales is None else scales.shape[0]}")
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise CodecError("scales must be finite and non-negative")
    if values.size and int(np.abs(values.astype(np.int32)).max()) > levels:
        raise CodecError(f"a quantised value is outside [-{levels}, {levels}]")
    broadcast = scales.reshape(-1, *([1] * (len(shape) - 1))) if len(shape) >= 2 else scales[0]
    return (values.astype(np.float32) * broadcast).astype(np.float32, copy=False)


def encode_update(delta: Sequence[np.ndarray], codec: UploadCodec, rng: np.random.Generator
                  ) -> list[EncodedTensor]:
    """Every tensor of an update, in order, drawing from ``rng`` in that order (reproducible)."""
    return [encode(d, codec, rng) for d in delta]


def roundtrip(delta: Sequence[np.ndarray], codec: UploadCodec, rng: np.random.Generator
              ) -> list[UpdateTensor]:
    """What the coordinator decodes from ``delta`` sent with ``codec``: the simulator's upload."""
    if codec == UploadCodec.NONE:
        return [np.asarray(d, np.float32) for d in delta]
    return [decode(e) for e in encode_update(delta, codec, rng)]


class DecodedUpdates:
    """C decoded updates for the aggregation stages (``aggregation.ClientDeltas``): dense or row-sparse
    tensors, folded into a running sum row by row (``add_weighted_into``) without a dense copy."""

    def __init__(self, updates: Sequence[Sequence[UpdateTensor]]) -> None:
        self.updates = [list(u) for u in updates]

    @property
    def num_clients(self) -> int:
        return len(self.updates)

    def norms(self) -> np.ndarray:
        out = np.zeros(self.num_clients, np.float64)
        for c, update in enumerate(self.updates):
            for t in update:
                v = (t.values if isinstance(t, RowSparse) else np.asarray(t)).reshape(-1)
                with np.errstate(over="ignore"):
                    square = float(np.dot(v, v))  # BLAS in float32, as ``StackedDeltas`` does: fast
                if not math.isfinite(square):  # a huge finite update overflowed float32: redo exactly
                    square = float(np.square(v, dtype=np.float64).sum())
                out[c] += square
        return np.sqrt(out)

    def add_weighted_into(self, sums: Sequence[np.ndarray], coefficients: np.ndarray) -> None:
        """sums[i] += Σ_c a_c Δ_c[i] in place: a row-sparse tensor touches only its rows."""
        for a, update in zip(np.asarray(coefficients, np.float64), self.updates, strict=True):
            if a == 0:
                continue
            for acc, t in zip(sums, update, strict=True):
                if isinstance(t, RowSparse):
                    acc[t.indices] += t.values * a  # indices are unique: a plain fancy-index add is exact
                else:
                    add_scaled_into(acc, np.asarray(t), a)

    def weighted_sum(self, coefficients: np.ndarray) -> list[np.ndarray]:
        sums = [np.zeros(_shape(t), np.float64) for t in self.updates[0]] if self.updates else []
        self.add_weighted_into(sums, coefficients)
        return sums

    def stacked(self) -> list[np.ndarray]:
        if not self.updates:
            return []
        return [np.stack([_dense(u[i]) for u in self.updates]) for i in range(len(self.updates[0]))]


#: Elements per step of ``add_scaled_into``: 512 KiB of float64 scratch, which stays in cache.
FOLD_BLOCK = 1 << 16


#: A dense tensor with non-zero values in at most this share of its rows is folded row by row.
SPARSE_ROW_SHARE = 0.25


def add_scaled_into(acc: np.ndarray, x: np.ndarray, a: float | np.floating) -> None:
    """``acc += x * a`` in float64, block by block: the same values as the one-line form (each block is
    the float64 product, then the add), without a float64 temporary the size of the whole model per
    report. ``acc`` is a float64 running sum of ``x``'s shape.

    A matrix whose rows are mostly all zero (a matrix-factorization client's item embeddings: only the
    items it trained on move) has only its non-zero rows added (``_add_rows_into``), so the fold reads
    and writes a few rows of the float64 sums instead of all of them. The values are the same bit for
    bit: a zero row adds ``±0.0``, which changes no running sum (they start at ``+0.0``, and a float64 sum
    that comes back to zero is ``+0.0``)."""
    values = np.asarray(x)
    rows = _non_zero_rows(values)
    if rows is not None:
        _add_rows_into(acc.reshape(len(values), -1), values.reshape(len(values), -1), rows, a)
        return
    flat = acc.reshape(-1)  # a view: the running sums are contiguous
    values = values.reshape(-1)
    if values.size <= FOLD_BLOCK:
        flat += values * np.float64(a)
        return
    scratch = np.empty(FOLD_BLOCK, np.float64)
    for start in range(0, values.size, FOLD_BLOCK):
        end = min(start + FOLD_BLOCK, values.size)
        part = scratch[:end - start]
        np.multiply(values[start:end], np.float64(a), out=part)
        np.add(flat[start:end], part, out=flat[start:end])


def _non_zero_rows(values: np.ndarray) -> np.ndarray | None:
    """The indices of the rows of a float32 matrix (or higher) with a non-zero bit, when they are at most
    `SPARSE_ROW_SHARE` of its rows; else None (fold it densely). Read as integers (OR of each row's
    bits): a float reduction along the rows is several times slower, and -0.0 merely counts as
    non-zero."""
    if values.ndim < 2 or values.dtype != np.float32 or not values.flags.c_contiguous or len(values) < 2:
        return None
    bits = values.reshape(len(values), -1).view(np.uint32)
    if np.count_nonzero(bits) > SPARSE_ROW_SHARE * bits.size:  # surely dense: one fast pass says so
        return None
    rows = np.flatnonzero(np.bitwise_or.reduce(bits, axis=1))
    return rows if len(rows) <= SPARSE_ROW_SHARE * len(values) else None


def _add_rows_into(acc: np.ndarray, values: np.ndarray, rows: np.ndarray, a: float | np.floating) -> None:
    """``acc[rows] += values[rows] * a`` in float64 (rows unique), a block of rows at a time: temporaries of
    at most `FOLD_BLOCK` values."""
    step = max(1, FOLD_BLOCK // max(1, values.shape[1]))
    scale = np.float64(a)
    for start in range(0, len(rows), step):
        block = rows[start:start + step]
        acc[block] += np.multiply(values[block], scale, dtype=np.float64)


def _shape(t: UpdateTensor) -> tuple[int, ...]:
    return t.shape if isinstance(t, RowSparse) else tuple(np.shape(t))


def _dense(t: UpdateTensor) -> np.ndarray:
    return t.dense() if isinstance(t, RowSparse) else np.asarray(t, np.float32)
