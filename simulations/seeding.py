"""Random generators keyed by small integers, built for a whole round of clients at once.

The simulator draws what a client does at random from ``numpy.random.default_rng([seed, round, user,
purpose])``, so a client's draws depend on nothing but its key. Building such a generator costs about 25 µs,
most of it hashing the key (``SeedSequence``) in interpreted code one client at a time: a round of 100
clients spent 2.5 ms of its packing on it. ``keyed_generators`` hashes the keys of all clients together
(the same ``SeedSequence`` algorithm, vectorised over clients) and gives each ``PCG64`` its hashed words:
the very same generators, for about 3 µs each (``tests/test_seeding.py`` compares them with
``default_rng`` on keys across the range).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from numpy.random.bit_generator import ISeedSequence

# numpy.random.SeedSequence's constants (numpy/random/bit_generator.pyx; its output is stable across
# numpy versions, and the test above would catch a change).
_INIT_A = 0x43B0D7E5
_MULT_A = 0x931E8875
_INIT_B = 0x8B51F9DD
_MULT_B = 0x58F38DED
_MIX_MULT_L = 0xCA01F9DD
_MIX_MULT_R = 0x4973F715
_XSHIFT = np.uint32(16)
_POOL_SIZE = 4
_WORD = 1 << 32


class _HashedKey(ISeedSequence):
    """A key already hashed as ``SeedSequence(key).generate_state(4, uint64)`` would: what ``PCG64`` asks
    its seed sequence for (an ``ISeedSequence`` is how numpy lets a bit generator be seeded by anything)."""

    __slots__ = ("_words",)

    def __init__(self, words: np.ndarray) -> None:
        self._words = words

    def generate_state(self, n_words: int, dtype: Any = np.uint32) -> npt.NDArray[np.uint64]:
        if n_words != len(self._words) or np.dtype(dtype) != np.uint64:
            raise ValueError("a hashed key serves only PCG64's seeding (4 uint64 words)")
        return self._words


def _hashed_words(keys: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint64]:
    """``SeedSequence(list(k)).generate_state(4, np.uint64)`` for every row ``k`` of ``keys`` ([n, 4]
    uint32: four entropy words, no spawn key), computed for all rows at once."""
    hash_const = _INIT_A

    def hashmix(value: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint32]:
        nonlocal hash_const
        value = value ^ np.uint32(hash_const)
        hash_const = (hash_const * _MULT_A) % _WORD
        value = value * np.uint32(hash_const)
        return value ^ (value >> _XSHIFT)

    def mix(x: npt.NDArray[np.uint32], y: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint32]:
        result = x * np.uint32(_MIX_MULT_L) - y * np.uint32(_MIX_MULT_R)
        return result ^ (result >> _XSHIFT)

    pool = [hashmix(keys[:, i]) for i in range(_POOL_SIZE)]
    for src in range(_POOL_SIZE):
        for dst in range(_POOL_SIZE):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    state = np.empty((len(keys), 2 * _POOL_SIZE), np.uint32)
    hash_const = _INIT_B
    for i in range(2 * _POOL_SIZE):
        value = pool[i % _POOL_SIZE] ^ np.uint32(hash_const)
        hash_const = (hash_const * _MULT_B) % _WORD
        value = value * np.uint32(hash_const)
        state[:, i] = value ^ (value >> _XSHIFT)
    # uint64 words from pairs of uint32 words, the first of each pair the low half (as numpy's view on a
    # little-endian machine, which it also gives on a big-endian one)
    return state[:, 0::2].astype(np.uint64) | (state[:, 1::2].astype(np.uint64) << np.uint64(32))


def keyed_generators(prefix: Sequence[int], users: Sequence[int], suffix: Sequence[int] = ()
                     ) -> list[np.random.Generator]:
    """``[np.random.default_rng([*prefix, user, *suffix]) for user in users]``, the same generators
    (the same streams), made faster when the key has four words that each fit in 32 bits."""
    keys = [[*prefix, int(u), *suffix] for u in users]
    if not keys or len(keys[0]) != _POOL_SIZE or not all(0 <= v < _WORD for k in keys for v in k):
        return [np.random.default_rng(k) for k in keys]
    words = _hashed_words(np.array(keys, np.uint32))
    # numpy's type stubs name only SeedSequence, but a bit generator takes any ISeedSequence (its docs)
    return [np.random.Generator(np.random.PCG64(_HashedKey(w))) for w in words]  # type: ignore[arg-type]
