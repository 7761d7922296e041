"""A synthetic population too large to hold: each user's ratings generated from its id when asked for.

The embedded synthetic dataset (``ratings.synthetic_ratings``) draws every user up front; a population of a
million users with ~80 ratings each would take gigabytes that way. Here only the item side (features,
biases, popularity: a few arrays of ``num_items`` rows) is drawn up front; user ``u``'s taste, bias, number
of ratings, rated items and ratings come from a generator seeded by (seed, u). So a round materialises only
its sampled clients, any process (a Ray worker on another machine) regenerates the very same user from the
same few arrays, and memory stays flat in the population's size.

The generative model is the embedded dataset's: planted low-rank tastes, log-normal activity (20 to 300
ratings), power-law item popularity, noisy scores rounded into 1..5. Items are drawn without replacement in
proportion to popularity by the Gumbel top-k trick (the same distribution as successive weighted draws, in
one vectorised pass over the items).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from fedrecon.core.batching import ClientExamples

#: The data source name ``load_dataset`` reads as a population of N users: ``population:1000000``.
POPULATION_PREFIX = "population:"


class SyntheticUsers:
    """The generator of every user: the item side, drawn once from ``seed``; a user from (seed, id)."""

    def __init__(self, *, num_items: int = 1000, rank: int = 6, seed: int = 0) -> None:
        if num_items < 20:
            raise ValueError("num_items must be at least 20 (every user rates at least 20 items)")
        self.num_items = num_items
        self.rank = rank
        self.seed = seed
        rng = np.random.default_rng([seed, 0x17E35])
        self.features = rng.normal(0.0, 1.0, (num_items, rank))
        self.item_bias = rng.normal(0.0, 0.45, num_items)
        popularity = 1.0 / np.arange(1, num_items + 1) ** 0.8
        popularity = popularity[rng.permutation(num_items)]
        self.log_popularity = np.log(popularity / popularity.sum())

    def user(self, user_id: int) -> ClientExamples:
        """User ``user_id``'s ratings, in a random order (as ``ratings.split_users`` shuffles them)."""
        rng = np.random.default_rng([self.seed, int(user_id)])
        taste = rng.normal(0.0, 1.0, self.rank) / np.sqrt(self.rank)
        bias = rng.normal(0.0, 0.35)
        count = int(np.clip(np.round(rng.lognormal(np.log(60), 0.8)), 20, 300))
        count = min(count, self.num_items)
        keys = self.log_popularity + rng.gumbel(size=self.num_items)
        rated = np.argpartition(-keys, count - 1)[:count]
        rated = rated[rng.permutation(count)]
        score = 3.6 + bias + self.item_bias[rated] + self.features[rated] @ taste * 0.9
        score += rng.normal(0.0, 0.5, count)
        return ClientExamples(x=rated.astype(np.int32), y=np.clip(np.rint(score), 1, 5).astype(np.float32))


class Population(Mapping[int, ClientExamples]):
    """Users ``user_ids`` (a ``range``: no per-user memory) of ``users``, generated on each lookup.

    A ``Mapping`` like the in-memory training dicts, so the simulator takes either; it never iterates over
    all users (selection draws positions in ``user_ids``). Looking a user up twice generates it twice: a
    round's clients are looked up once."""

    def __init__(self, users: SyntheticUsers, user_ids: range) -> None:
        self.users = users
        self.user_ids = user_ids

    def __getitem__(self, user_id: int) -> ClientExamples:
        if user_id not in self.user_ids:
            raise KeyError(user_id)
        return self.users.user(user_id)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self.user_ids

    def __len__(self) -> int:
        return len(self.user_ids)

    def __iter__(self) -> Iterator[int]:
        return iter(self.user_ids)


def population_size(source: str) -> int | None:
    """N for a data source named ``population:N`` (underscores allowed: ``population:1_000_000``), else
    None."""
    if not source.startswith(POPULATION_PREFIX):
        return None
    text = source.removeprefix(POPULATION_PREFIX)
    try:
        size = int(text)
    except ValueError:
        raise ValueError(f"{source!r}: expected {POPULATION_PREFIX}N with N a number of users") from None
    if size < 1:
        raise ValueError(f"{source!r}: the population needs at least one user")
    return size
