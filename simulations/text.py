"""Text datasets for next-word prediction: users' texts, a word vocabulary, and fixed-length examples.

Readers:

- a JSON object mapping each user to a list of texts (``by_speaker.json`` of tiny Shakespeare: speakers
  of the plays, each with their utterances);
- a folder with one ``.txt`` file per user, or one sub-folder of ``.txt`` files per user (the user is the
  file's or sub-folder's name);
- ``synthetic_texts``: generated users who each favour a few words of a small language (for tests that
  need no files).

Users are split into training, validation and unseen test users by a seed, after dropping users with fewer
than ``min_words`` words (a user must have at least two batches of sequences: one to reconstruct from, one
to score). The vocabulary is built from training users only: the ``vocab_size`` most frequent words, with
ties broken alphabetically.

Token ids, examples and the encoding a task carries (``text_description`` / ``encoding_of``) are
``fedrecon.text_encoding``'s, shared with the client library so that a device encodes its text exactly as
the simulation did; they are re-exported here.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrecon.core.batching import ClientExamples
from fedrecon.text_encoding import (
    BOS,
    EOS,
    MAX_SEQUENCES_PER_USER,
    PAD,
    SPECIAL,
    Vocabulary,
    encoding_of,
    examples,
    sentences,
    text_description,
    words,
)


def read_texts(source: str | Path) -> dict[str, list[str]]:
    """Users' texts from a ``{user: [text, ...]}`` JSON file or a folder of per-user files/sub-folders."""
    path = Path(source)
    if path.is_file():
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise ValueError(f"{path}: expected a JSON object mapping each user to a list of texts")
        return {str(k): [str(t) for t in v] for k, v in data.items()}
    if not path.is_dir():
        raise FileNotFoundError(f"no such text file or folder: {path}")
    users: dict[str, list[str]] = {}
    for entry in sorted(path.iterdir()):
        if entry.is_file() and entry.suffix == ".txt":
            users[entry.stem] = [entry.read_text(errors="replace")]
        elif entry.is_dir():
            files = sorted(entry.rglob("*.txt"))
            if files:
                users[entry.name] = [f.read_text(errors="replace") for f in files]
    if not users:
        raise ValueError(f"{path}: no .txt files (one per user) and no sub-folders of .txt files")
    return users


def synthetic_texts(*, num_users: int = 60, words_per_user: int = 300, vocabulary: int = 80, seed: int = 0
                    ) -> dict[str, list[str]]:
    """Users who write from a shared small language, each favouring a handful of its words (so a personal
    part of a model has something to learn)."""
    rng = np.random.default_rng(seed)
    lexicon = [f"w{i}" for i in range(vocabulary)]
    base = rng.dirichlet(np.full(vocabulary, 0.3))
    users = {}
    for u in range(num_users):
        favourite = rng.choice(vocabulary, 4, replace=False)
        p = base * 0.5
        p[favourite] += 0.5 / 4
        tokens = rng.choice(vocabulary, words_per_user, p=p / p.sum())
        text = " ".join(lexicon[t] + ("." if i % 9 == 8 else "") for i, t in enumerate(tokens))
        users[f"user{u}"] = [text]
    return users


def build_vocabulary(texts: Mapping[str, Sequence[str]], size: int, *, oov_buckets: int = 1) -> Vocabulary:
    """The ``size`` most frequent words of ``texts`` (call it with training users only)."""
    counts: Counter[str] = Counter()
    for user_texts in texts.values():
        for sentence in sentences(user_texts):
            counts.update(sentence)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return Vocabulary(tuple(w for w, _ in ranked[:size]), oov_buckets)


@dataclass(frozen=True)
class FederatedText:
    vocabulary: Vocabulary
    train: dict[int, ClientExamples]
    validation: dict[int, ClientExamples]
    test: dict[int, ClientExamples]
    users: tuple[str, ...]  # user names by integer id
    dropped_users: int  # users under the minimum-text rule


@dataclass(frozen=True)
class UserSplit:
    """Users' names by part, after the minimum-text rule (``split_users``)."""

    kept: tuple[str, ...]  # users with enough text, sorted: a user's integer id is its index here
    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]
    dropped_users: int

    def ids(self, part: str) -> list[int]:
        """The integer ids of ``part``'s users (``train``, ``validation`` or ``test``)."""
        index = {name: i for i, name in enumerate(self.kept)}
        return [index[name] for name in getattr(self, part)]


def split_users(texts: Mapping[str, Sequence[str]], *, seed: int = 42,
                fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), min_words: int = 100) -> UserSplit:
    """Users split by ``seed`` into train/validation/test after dropping users with under ``min_words``
    words (tokens, punctuation included). Validation and test get ``fractions[1]`` and ``fractions[2]`` of
    the kept users, rounded, but at least one user each; training gets the rest. Needs no vocabulary, so a
    device command can pick its users exactly as the simulation that built the task's vocabulary did."""
    names = sorted(texts)
    kept = [n for n in names if sum(len(s) for s in sentences(texts[n])) >= min_words]
    if len(kept) < 3:
        raise ValueError(f"only {len(kept)} users have at least {min_words} words: too few to split")
    order = np.random.default_rng(seed).permutation(len(kept))
    # At least one validation and one test user (and so at most n - 2 training users), whatever the
    # fractions round to: a split without unseen users could neither select nor score a model.
    n_val = min(max(1, round(fractions[1] * len(kept))), len(kept) - 2)
    n_test = min(max(1, round(fractions[2] * len(kept))), len(kept) - 1 - n_val)
    n_train = len(kept) - n_val - n_test
    parts = [tuple(kept[i] for i in part)
             for part in (order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:])]
    return UserSplit(tuple(kept), parts[0], parts[1], parts[2], len(names) - len(kept))


def split_texts(texts: Mapping[str, Sequence[str]], *, vocab_size: int, seq_len: int, seed: int = 42,
                fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), min_words: int = 100,
                oov_buckets: int = 1, max_examples_per_user: int | None = MAX_SEQUENCES_PER_USER
                ) -> FederatedText:
    """``split_users``, then the vocabulary from training users only, then every user's examples."""
    users = split_users(texts, seed=seed, fractions=fractions, min_words=min_words)
    vocabulary = build_vocabulary({name: texts[name] for name in users.train}, vocab_size,
                                  oov_buckets=oov_buckets)
    return encode_split(texts, users, vocabulary, seq_len, max_examples_per_user=max_examples_per_user)


def encode_split(texts: Mapping[str, Sequence[str]], users: UserSplit, vocabulary: Vocabulary, seq_len: int,
                 *, max_examples_per_user: int | None = MAX_SEQUENCES_PER_USER) -> FederatedText:
    """Every kept user's examples under a given vocabulary (one built from training users, or a task's)."""
    split = [{i: examples(texts[users.kept[i]], vocabulary, seq_len, max_examples=max_examples_per_user)
              for i in users.ids(part)} for part in ("train", "validation", "test")]
    return FederatedText(vocabulary, split[0], split[1], split[2], users.kept, users.dropped_users)


def load_texts(data: str) -> dict[str, list[str]]:
    """``synthetic``, a JSON file, a folder holding ``by_speaker.json``, or a folder of per-user texts."""
    if data == "synthetic":
        return synthetic_texts()
    path = Path(data)
    if path.is_dir() and (path / "by_speaker.json").is_file():
        path = path / "by_speaker.json"
    return read_texts(path)


__all__ = ["BOS", "EOS", "MAX_SEQUENCES_PER_USER", "PAD", "SPECIAL", "FederatedText", "UserSplit",
           "Vocabulary", "build_vocabulary", "encode_split", "encoding_of", "examples", "load_texts",
           "read_texts", "sentences", "split_texts", "split_users", "synthetic_texts", "text_description",
           "words"]
