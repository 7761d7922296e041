"""Keyed generators built many at a time are numpy's own ``default_rng`` of the same key, draw for draw."""

from __future__ import annotations

import numpy as np
import pytest

from fedrecon.simulations.runner import local_rng, local_rngs, shuffle_rng, shuffle_rngs
from fedrecon.simulations.seeding import keyed_generators

EDGES = [0, 1, 2, 0xFFFF, 0x10000, 2**31, 2**32 - 1]


@pytest.mark.parametrize("prefix", [[0, 0], [0, 1], [7, 250], [2**32 - 1, 2**31], [12345, 0xFFFFFFFF]])
def test_keyed_generators_draw_what_default_rng_draws(prefix):
    users = EDGES + [int(u) for u in np.random.default_rng(3).integers(0, 2**32, 50)]
    for suffix in ([0x10CA1], [0], [2**32 - 1]):
        built = keyed_generators(prefix, users, suffix)
        for user, rng in zip(users, built, strict=True):
            reference = np.random.default_rng([*prefix, user, *suffix])
            assert rng.bit_generator.state == reference.bit_generator.state
            np.testing.assert_array_equal(rng.uniform(-1, 1, 20), reference.uniform(-1, 1, 20))


def test_keys_outside_32_bits_or_of_another_length_fall_back_to_default_rng():
    for prefix, suffix in (([2**32, 1], [5]), ([2**40], []), ([1, 2], [3, 4])):
        built = keyed_generators(prefix, [0, 3, 2**33], suffix)
        for user, rng in zip([0, 3, 2**33], built, strict=True):
            assert rng.random() == np.random.default_rng([*prefix, user, *suffix]).random()
    assert keyed_generators([1, 2], [], [3]) == []
    with pytest.raises(ValueError):  # as default_rng refuses a negative key
        keyed_generators([-1, 2], [3], [4])


def test_a_round_s_generators_are_its_clients_own():
    users = [5, 900, 2, 2397]
    for built, one in ((local_rngs(0, 17, users), local_rng), (shuffle_rngs(3, 1, users), shuffle_rng)):
        seed, round_num = (0, 17) if one is local_rng else (3, 1)
        for user, rng in zip(users, built, strict=True):
            np.testing.assert_array_equal(rng.random(8), one(seed, round_num, user).random(8))
