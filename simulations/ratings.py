"""Rating data: MovieLens readers, the embedded synthetic dataset, and the federated user split.

MovieLens ships in three formats, all read here, plain or gzipped:
``ratings.dat`` (ML-1M/10M, ``user::item::rating::time``), ``u.data`` (ML-100K, tab separated) and
``ratings.csv`` (ml-latest, with a header). Item ids are remapped densely to ``0..num_items-1``.

Federated split (the paper's protocol): users are shuffled with a seed and split 80/10/10 into training,
validation and unseen test users; each user's ratings are shuffled with a seed and capped at 300.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedrecon.core.batching import ClientExamples
from fedrecon.simulations.population import Population, SyntheticUsers, population_size

RATING_FILES = ("ratings.dat", "u.data", "ratings.csv")


@dataclass(frozen=True)
class Ratings:
    """A ratings table with dense item ids."""

    users: np.ndarray  # int64 user ids as in the source
    items: np.ndarray  # int32 dense item ids
    ratings: np.ndarray  # float32
    item_ids: np.ndarray  # int64 original id of each dense item id

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def __len__(self) -> int:
        return len(self.ratings)


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="latin-1")
    return open(path, encoding="latin-1")


def _rows(path: Path) -> Iterator[tuple[int, str, str, str]]:
    """(line number, user, item, rating) of each non-empty line."""
    name = path.name.removesuffix(".gz")
    with _open_text(path) as f:
        if name.endswith(".csv"):
            header = f.readline().strip().lower().split(",")
            if header[:3] != ["userid", "movieid", "rating"]:
                raise ValueError(f"{path}: expected header userId,movieId,rating,..., got {header}")
            sep = ","
        elif name.endswith(".dat"):
            sep = "::"
        else:
            sep = "\t"
        for lineno, line in enumerate(f, start=2 if sep == "," else 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(sep)
            if len(parts) < 3:
                raise ValueError(f"{path}:{lineno}: expected user{sep}item{sep}rating, got {line[:80]!r}")
            yield lineno, parts[0], parts[1], parts[2]


def find_ratings_file(path: str | Path) -> Path:
    """The ratings file itself, or the one a MovieLens folder holds (plain or gzipped)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"no such data folder or ratings file: {path}")
    for name in RATING_FILES:
        for candidate in (path / name, path / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"no {', '.join(RATING_FILES)} (optionally .gz) in {path}")


def read_ratings(path: str | Path) -> Ratings:
    """Read any of the three MovieLens rating formats into a dense-id table."""
    file = find_ratings_file(path)
    users, items, values = [], [], []
    try:
        for lineno, u, i, r in _rows(file):
            try:
                user, item, value = int(u), int(i), float(r)
            except ValueError as err:
                raise ValueError(f"{file}:{lineno}: expected integer user and item ids and a numeric rating, "
                                 f"got {u[:20]!r}, {i[:20]!r}, {r[:20]!r}") from err
            if not np.isfinite(value):
                raise ValueError(f"{file}:{lineno}: rating {r!r} is not a finite number")
            users.append(user)
            items.append(item)
            values.append(value)
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as err:
        raise ValueError(f"{file}: not a readable ratings file ({err})") from err
    if not values:
        raise ValueError(f"{file}: no ratings")
    raw_items = np.asarray(items, np.int64)
    item_ids, dense = np.unique(raw_items, return_inverse=True)
    return Ratings(users=np.asarray(users, np.int64), items=dense.astype(np.int32),
                   ratings=np.asarray(values, np.float32), item_ids=item_ids)


def synthetic_ratings(*, num_users: int = 1200, num_items: int = 600, rank: int = 6, seed: int = 0
                      ) -> Ratings:
    """A deterministic MovieLens-like dataset: planted low-rank tastes, heterogeneous users, popular items.

    User activity is log-normal (20 to 300 ratings), item popularity follows a power law, each user has a
    taste vector and a bias, and ratings are a noisy low-rank score rounded into 1..5. Small enough that the
    main job runs in seconds with no download, structured enough that learning shows.
    """
    rng = np.random.default_rng(seed)
    tastes = rng.normal(0.0, 1.0, (num_users, rank)) / np.sqrt(rank)
    features = rng.normal(0.0, 1.0, (num_items, rank))
    user_bias = rng.normal(0.0, 0.35, num_users)
    item_bias = rng.normal(0.0, 0.45, num_items)
    popularity = 1.0 / np.arange(1, num_items + 1) ** 0.8
    popularity = popularity[rng.permutation(num_items)]
    popularity /= popularity.sum()
    counts = np.clip(np.round(rng.lognormal(np.log(60), 0.8, num_users)), 20, 300).astype(int)
    users, items, ratings = [], [], []
    for u in range(num_users):
        rated = rng.choice(num_items, size=min(counts[u], num_items), replace=False, p=popularity)
        score = 3.6 + user_bias[u] + item_bias[rated] + features[rated] @ tastes[u] * 0.9
        score += rng.normal(0.0, 0.5, len(rated))
        users.append(np.full(len(rated), u + 1))
        items.append(rated)
        ratings.append(np.clip(np.rint(score), 1, 5))
    item_arr = np.concatenate(items)
    item_ids, dense = np.unique(item_arr, return_inverse=True)
    return Ratings(users=np.concatenate(users).astype(np.int64), items=dense.astype(np.int32),
                   ratings=np.concatenate(ratings).astype(np.float32), item_ids=item_ids.astype(np.int64))


@dataclass(frozen=True)
class FederatedRatings:
    """Per-user examples split into training, validation and unseen test users."""

    train: Mapping[int, ClientExamples]  # a dict, or a ``Population`` generated on demand
    validation: dict[int, ClientExamples]
    test: dict[int, ClientExamples]
    num_items: int
    mean_rating: float  # over training users' kept ratings (a data statistic the server may know)
    # The dataset's own id (e.g. the MovieLens movie id) of each dense item index, in dense order: what a
    # task's item vocabulary lists, and how examples are turned back into the dataset's ids.
    item_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def split_users(ratings: Ratings, *, seed: int = 42, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                max_examples_per_user: int | None = 300) -> FederatedRatings:
    """The paper's protocol: a seeded 80/10/10 user split; each user's ratings seeded-shuffled and capped."""
    if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise ValueError("fractions must be non-negative and sum to 1")
    order = np.argsort(ratings.users, kind="stable")
    users_sorted = ratings.users[order]
    user_ids, starts = np.unique(users_sorted, return_index=True)
    ends = np.append(starts[1:], len(order))
    rng = np.random.default_rng(seed)
    examples: dict[int, ClientExamples] = {}
    for uid, a, b in zip(user_ids, starts, ends, strict=True):
        idx = order[a:b][rng.permutation(b - a)]
        if max_examples_per_user is not None:
            idx = idx[:max_examples_per_user]
        examples[int(uid)] = ClientExamples(x=ratings.items[idx], y=ratings.ratings[idx])
    shuffled = [int(u) for u in np.random.default_rng(seed).permutation(user_ids)]
    n_train = round(fractions[0] * len(shuffled))
    n_val = round(fractions[1] * len(shuffled))
    sizes = (n_train, n_val, len(shuffled) - n_train - n_val)
    if any(n < 1 and f > 0 for n, f in zip(sizes, fractions, strict=True)):
        # An empty part would train on nothing, or score 0 examples and print RMSE 0.
        raise ValueError(f"too few users to split: {len(shuffled)} users give {sizes[0]} training, "
                         f"{sizes[1]} validation and {sizes[2]} test users; every part needs at least one")
    parts = (shuffled[:n_train], shuffled[n_train:n_train + n_val], shuffled[n_train + n_val:])
    train, val, test = ({u: examples[u] for u in part} for part in parts)
    kept = np.concatenate([e.y for e in train.values()]) if train else np.zeros(1)
    return FederatedRatings(train=train, validation=val, test=test, num_items=ratings.num_items,
                            mean_rating=float(kept.mean()), item_ids=np.asarray(ratings.item_ids, np.int64))


def population_ratings(num_users: int, *, seed: int = 42, held_out: int | None = None) -> FederatedRatings:
    """A population of ``num_users`` training users generated on demand (``population.Population``: ids
    1..num_users, nothing held in memory per user), and ``held_out`` validation and as many test users
    (the next ids; default min(1000, num_users // 8), at least 1), materialised: they are scored in full.
    Users never have more than 300 ratings, the cap the MovieLens split applies."""
    users = SyntheticUsers(seed=seed)
    count = held_out if held_out is not None else max(1, min(1000, num_users // 8))
    start = num_users + 1
    validation = {u: users.user(u) for u in range(start, start + count)}
    test = {u: users.user(u) for u in range(start + count, start + 2 * count)}
    # The offset a model with biases starts from: the mean rating of (up to) 200 training users spread over
    # the population, a statistic the server may know.
    sample = range(1, num_users + 1, max(1, num_users // 200))
    mean = float(np.concatenate([users.user(u).y for u in sample]).mean())
    return FederatedRatings(train=Population(users, range(1, num_users + 1)), validation=validation,
                            test=test, num_items=users.num_items, mean_rating=mean,
                            item_ids=np.arange(users.num_items, dtype=np.int64))


def load_dataset(source: str, *, seed: int = 42, max_examples_per_user: int | None = 300) -> FederatedRatings:
    """``synthetic`` (the embedded default), ``population:N`` (N synthetic users generated on demand,
    ``population_ratings``; ``seed`` seeds the generator) or a MovieLens folder / ratings file."""
    size = population_size(source)
    if size is not None:
        return population_ratings(size, seed=seed)
    ratings = synthetic_ratings() if source == "synthetic" else read_ratings(source)
    return split_users(ratings, seed=seed, max_examples_per_user=max_examples_per_user)
