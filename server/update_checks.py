"""The per-report checks of the coordinator's hot path: an update's digest and its finiteness, cheaply.

Every accepted report is digested (an identical retry is recognised by its digest, and a different
update from the same client is refused) and checked for NaN and infinities, so both run once per report
on the whole update. They are kept here, apart from the round logic, because their cost is most of what
the coordinator spends per report outside gRPC:

* The digest is XXH3-128 (``xxhash``) over the arrays' own buffers (no ``tobytes`` copy): about 20 times
  cheaper than SHA-256 for a 738 KB update. It need not be cryptographic: it only tells one client's
  retried update from a different one of the *same* client (a client that forged a collision would only
  have its own second update answered as if it were its first); it never identifies a client or
  authenticates anything. Prefixed with its name, so a stored digest says how it was made.
* Finiteness from one BLAS pass: the sum of squares of finite float32 values is finite unless it
  overflows, so a finite sum proves every value finite, and only a non-finite sum (NaN, an infinity, or a
  huge but finite update) pays for the exact element-wise check.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash

from fedrecon.core.compression import RowSparse, UpdateTensor

DIGEST_PREFIX = "xxh3:"


def update_digest(weight: float, delta: Sequence[UpdateTensor]) -> str:
    """What identifies an update: its weight and tensors; a row-sparse tensor by its rows and their values,
    so no dense copy is made for it. 37 characters."""
    h = xxhash.xxh3_128(np.float64(weight).tobytes())
    for d in delta:
        if isinstance(d, RowSparse):
            h.update(b"rows:")
            h.update(np.ascontiguousarray(d.indices, np.int64))
            h.update(np.ascontiguousarray(d.values))
        else:
            h.update(np.ascontiguousarray(d))
    return DIGEST_PREFIX + h.hexdigest()


def all_finite(values: np.ndarray) -> bool:
    """Whether every value is finite (see the module docstring for why one dot product mostly suffices)."""
    flat = np.ascontiguousarray(values).reshape(-1)
    if flat.dtype.kind != "f":
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        square = np.dot(flat, flat)
    return bool(np.isfinite(square)) or bool(np.isfinite(flat).all())
