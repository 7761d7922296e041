"""Text data for next-word prediction: the readers (a JSON object and the folder layouts), the word
vocabulary (training users only), the split's invariants, the examples' layout and the synthetic texts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedrecon.simulations.text import (
    BOS,
    EOS,
    PAD,
    SPECIAL,
    build_vocabulary,
    examples,
    read_texts,
    sentences,
    split_texts,
    synthetic_texts,
)


def test_json_and_both_folder_layouts_read_the_same_users(tmp_path: Path) -> None:
    texts = {"alice": ["Hello there. How are you?"], "bob": ["Fine, thanks!", "And you?"]}
    (tmp_path / "users.json").write_text(json.dumps(texts))
    assert read_texts(tmp_path / "users.json") == texts
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "alice.txt").write_text(texts["alice"][0])
    (flat / "notes.md").write_text("not a user")
    nested = tmp_path / "nested"
    for name, parts in texts.items():
        (nested / name).mkdir(parents=True)
        for i, part in enumerate(parts):
            (nested / name / f"{i}.txt").write_text(part)
    assert read_texts(flat) == {"alice": texts["alice"]}
    assert read_texts(nested) == texts


def test_bad_sources_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such text file or folder"):
        read_texts(tmp_path / "missing")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="mapping each user to a list of texts"):
        read_texts(tmp_path / "list.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \.txt files"):
        read_texts(tmp_path / "empty")


def test_tokens_sentences_and_examples_by_hand() -> None:
    assert sentences(["To be, or not to be? That is\nthe question."]) == [
        ["to", "be", ",", "or", "not", "to", "be", "?"], ["that", "is"], ["the", "question", "."]]
    vocab = build_vocabulary({"u": ["a a a b b c"]}, 2, oov_buckets=3)
    assert vocab.words == ("a", "b") and vocab.oov_id == SPECIAL + 2 and vocab.size == 6
    assert vocab.accuracy_excludes() == (EOS, vocab.oov_id)
    got = examples(["a b zed a."], vocab, seq_len=3)  # 5 targets: a b OOV a . -> "." is unknown too
    a, b, oov = SPECIAL, SPECIAL + 1, vocab.oov_id
    np.testing.assert_array_equal(got.x[:, :, 0], [[BOS, a, b], [oov, a, oov]])
    np.testing.assert_array_equal(got.y, [[a, b, oov], [a, oov, EOS]])
    bucket = got.x[1, 0, 1]
    assert 1 <= bucket <= 3 and bucket == vocab.bucket("zed")  # the unknown input word's bucket
    assert got.x[0, :, 1].tolist() == [0, 0, 0]  # known words (and BOS) carry no bucket
    short = examples(["a"], vocab, seq_len=4)
    np.testing.assert_array_equal(short.y, [[a, EOS, PAD, PAD]])


def test_the_vocabulary_comes_from_training_users_only() -> None:
    texts = synthetic_texts(num_users=20, words_per_user=120, seed=3)
    texts["zz_speaker"] = ["onlyhere " * 200]
    data = split_texts(texts, vocab_size=500, seq_len=8, seed=1, min_words=50)
    index = {name: i for i, name in enumerate(data.users)}
    in_training = index["zz_speaker"] in data.train
    assert ("onlyhere" in data.vocabulary.words) == in_training
    training_words = {w for u in data.train for s in sentences(texts[data.users[u]]) for w in s}
    assert set(data.vocabulary.words) <= training_words


@pytest.mark.parametrize(("users", "fractions"), [(3, (0.8, 0.1, 0.1)), (5, (0.9, 0.05, 0.05)),
                                                  (7, (1.0, 0.0, 0.0)), (189, (0.8, 0.1, 0.1))])
def test_the_split_keeps_at_least_one_validation_and_one_test_user(users: int,
                                                                   fractions: tuple[float, float, float]
                                                                   ) -> None:
    texts = {f"u{i}": ["word " * 12] for i in range(users)}
    texts["quiet"] = ["too few words"]
    data = split_texts(texts, vocab_size=10, seq_len=4, min_words=10, fractions=fractions)
    assert data.dropped_users == 1 and "quiet" not in data.users
    parts = [set(data.train), set(data.validation), set(data.test)]
    assert all(parts) and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set().union(*parts) == set(range(users))
    if users == 189:  # the tiny Shakespeare run's count: 151 / 19 / 19
        assert [len(p) for p in parts] == [151, 19, 19]


def test_too_few_users_to_split_is_refused() -> None:
    with pytest.raises(ValueError, match="only 2 users have at least 10 words"):
        split_texts({"a": ["w " * 10], "b": ["w " * 10], "c": ["w"]}, vocab_size=5, seq_len=4, min_words=10)


def test_synthetic_texts_are_reproducible_and_personal() -> None:
    a, b = synthetic_texts(num_users=4, seed=5), synthetic_texts(num_users=4, seed=5)
    assert a == b and a != synthetic_texts(num_users=4, seed=6)
    assert len(a) == 4 and all(len(sentences(t)) > 1 for t in a.values())
