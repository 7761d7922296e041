"""MovieLens readers (three formats, plain and gzipped) and the federated user split."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from fedrecon.simulations.ratings import Ratings, read_ratings, split_users, synthetic_ratings

ROWS = [(1, 10, 5.0), (1, 30, 3.0), (2, 20, 4.0), (3, 10, 1.0), (3, 40, 2.5)]


def _write(path: Path, text: str) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def _check(r) -> None:  # type: ignore[no-untyped-def]
    assert r.users.tolist() == [1, 1, 2, 3, 3]
    assert r.item_ids.tolist() == [10, 20, 30, 40]
    assert r.items.tolist() == [0, 2, 1, 0, 3]  # dense ids in sorted original-id order
    assert r.ratings.tolist() == [5.0, 3.0, 4.0, 1.0, 2.5]
    assert r.num_items == 4


@pytest.mark.parametrize("gz", [False, True])
def test_ratings_dat(tmp_path: Path, gz: bool) -> None:
    text = "".join(f"{u}::{i}::{int(r) if r.is_integer() else r}::97830076{k}\n" for k, (u, i, r) in
                   enumerate(ROWS))
    _check(read_ratings(_write(tmp_path / ("ratings.dat.gz" if gz else "ratings.dat"), text)))


@pytest.mark.parametrize("gz", [False, True])
def test_u_data_tab_separated(tmp_path: Path, gz: bool) -> None:
    text = "".join(f"{u}\t{i}\t{r}\t881250949\n" for u, i, r in ROWS)
    path = _write(tmp_path / ("u.data.gz" if gz else "u.data"), text)
    _check(read_ratings(tmp_path))  # a folder is searched for the known file names
    _check(read_ratings(path))


@pytest.mark.parametrize("gz", [False, True])
def test_ratings_csv_with_header(tmp_path: Path, gz: bool) -> None:
    text = "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r},1260759144\n" for u, i, r in ROWS)
    _check(read_ratings(_write(tmp_path / ("ratings.csv.gz" if gz else "ratings.csv"), text)))


def test_malformed_lines_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected user::item::rating"):
        read_ratings(_write(tmp_path / "ratings.dat", "1::2\n"))
    with pytest.raises(ValueError, match=r"u\.data:2: expected integer user and item ids"):
        read_ratings(_write(tmp_path / "u.data", "1\t2\t3\t0\n1\tx\t3\t0\n"))
    with pytest.raises(ValueError, match=r"ratings\.dat:1: rating 'nan' is not a finite number"):
        read_ratings(_write(tmp_path / "ratings.dat", "1::2::nan::0\n"))
    with pytest.raises(FileNotFoundError, match="no such data folder or ratings file"):
        read_ratings(tmp_path / "absent")
    with pytest.raises(ValueError, match="expected header"):
        read_ratings(_write(tmp_path / "ratings.csv", "a,b,c\n1,2,3\n"))
    with pytest.raises(FileNotFoundError):
        read_ratings(tmp_path / "nothing-here")


def test_split_is_seeded_disjoint_and_capped() -> None:
    ratings = synthetic_ratings(num_users=200, num_items=150, seed=1)
    a = split_users(ratings, seed=42, max_examples_per_user=30)
    b = split_users(ratings, seed=42, max_examples_per_user=30)
    c = split_users(ratings, seed=7, max_examples_per_user=30)
    assert (len(a.train), len(a.validation), len(a.test)) == (160, 20, 20)
    assert not set(a.train) & set(a.validation) and not set(a.train) & set(a.test)
    assert not set(a.validation) & set(a.test)
    assert set(a.train) == set(b.train) and set(a.train) != set(c.train)
    assert max(len(e) for e in a.train.values()) == 30
    u = next(iter(a.train))
    np.testing.assert_array_equal(a.train[u].x, b.train[u].x)


def test_synthetic_data_is_deterministic_and_movielens_like() -> None:
    a, b = synthetic_ratings(seed=0), synthetic_ratings(seed=0)
    np.testing.assert_array_equal(a.ratings, b.ratings)
    assert set(np.unique(a.ratings).tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    per_user = np.bincount(a.users)
    per_user = per_user[per_user > 0]
    assert per_user.min() >= 20 and per_user.max() <= 300 and per_user.std() > 20  # heterogeneous users
    popularity = np.sort(np.bincount(a.items))[::-1]
    assert popularity[: len(popularity) // 10].sum() > 0.25 * popularity.sum()  # a popular head


def test_shared_movielens_subset_reads_completely(ml_2998_dir: Path) -> None:
    r = read_ratings(ml_2998_dir)
    assert len(r) == 487_515
    assert len(np.unique(r.users)) == 2_998
    assert r.num_items == 3_615
    assert np.bincount(r.ratings.astype(int))[1:].tolist() == [27_452, 53_822, 127_155, 170_551, 108_535]


def test_a_dataset_too_small_to_split_is_refused() -> None:
    one_user = Ratings(users=np.ones(40, np.int64), items=np.arange(40, dtype=np.int32),
                       ratings=np.full(40, 3.0, np.float32), item_ids=np.arange(40, dtype=np.int64))
    with pytest.raises(ValueError, match="too few users to split: 1 users give 1 training, 0 validation"):
        split_users(one_user)
