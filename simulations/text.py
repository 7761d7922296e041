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
ties broken alphabetically. Token ids: 0 padding, 1 beginning of sentence, 2 end of sentence, then the
vocabulary, then one out-of-vocabulary id (the prediction target of every unknown word); a model that
embeds unknown words per bucket reads the bucket (``hash mod oov_buckets``, stable across processes) from
the example's second channel.

An example is one sentence cut into windows of ``seq_len`` tokens: input ``[BOS, w1, ..., w_{T-1}]`` and
targets ``[w1, ..., EOS]``, padded with 0. ``x`` is ``[n, seq_len, 2]`` (token id, OOV bucket + 1 or 0 for
known words) and ``y`` ``[n, seq_len]``.

A task served to devices carries its encoding in its model description (``text``: the vocabulary's words,
``seq_len`` and ``oov_buckets``; ``text_description`` / ``encoding_of``), so a device turns its own text into
the very ids the model was trained on: the vocabulary always comes from the task, never from the device's
text (a vocabulary per device would give the same id different words on different devices).
"""

from __future__ import annotations

import json
import re
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedrecon.core.batching import ClientExamples

PAD, BOS, EOS = 0, 1, 2
SPECIAL = 3
#: Sequences kept per user (the first ones, in text order): bounds a device's step and the simulator's memory.
MAX_SEQUENCES_PER_USER = 256
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)*|[.,!?;:]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks of ``text`` (the tokenizer)."""
    return _WORD.findall(text.lower())


def sentences(texts: Sequence[str]) -> list[list[str]]:
    """A user's texts as tokenized sentences (split after . ! ? and at line ends)."""
    out = []
    for text in texts:
        for part in _SENTENCE_END.split(text):
            tokens = words(part)
            if tokens:
                out.append(tokens)
    return out


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


@dataclass(frozen=True)
class Vocabulary:
    """Word ids (``SPECIAL + rank``) of the most frequent training words, plus OOV handling."""

    words: tuple[str, ...]
    oov_buckets: int = 1

    @property
    def oov_id(self) -> int:
        return SPECIAL + len(self.words)

    @property
    def size(self) -> int:
        """Number of output classes: padding, BOS, EOS, the words and the OOV id."""
        return self.oov_id + 1

    def accuracy_excludes(self) -> tuple[int, ...]:
        """Targets the paper's accuracy does not count (padding is never a target): EOS and OOV."""
        return (EOS, self.oov_id)

    def bucket(self, word: str) -> int:
        """The OOV bucket of an unknown word, 1..oov_buckets (0: a known word)."""
        return 1 + zlib.crc32(word.encode()) % self.oov_buckets

    def encode(self, sentence: Sequence[str]) -> tuple[list[int], list[int]]:
        index = self._index()
        ids = [index.get(w, self.oov_id) for w in sentence]
        buckets = [0 if w in index else self.bucket(w) for w in sentence]
        return ids, buckets

    def _index(self) -> dict[str, int]:
        cached = self.__dict__.get("_cached_index")
        if cached is None:
            cached = {w: SPECIAL + i for i, w in enumerate(self.words)}
            object.__setattr__(self, "_cached_index", cached)
        return cached


def build_vocabulary(texts: Mapping[str, Sequence[str]], size: int, *, oov_buckets: int = 1) -> Vocabulary:
    """The ``size`` most frequent words of ``texts`` (call it with training users only)."""
    counts: Counter[str] = Counter()
    for user_texts in texts.values():
        for sentence in sentences(user_texts):
            counts.update(sentence)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return Vocabulary(tuple(w for w, _ in ranked[:size]), oov_buckets)


def examples(texts: Sequence[str], vocabulary: Vocabulary, seq_len: int, *, max_examples: int | None = None
             ) -> ClientExamples:
    """A user's sentences as next-word examples (see the module docstring), in text order."""
    xs, ys = [], []
    for sentence in sentences(texts):
        ids, buckets = vocabulary.encode(sentence)
        inputs = [BOS, *ids]
        in_buckets = [0, *buckets]
        targets = [*ids, EOS]
        for start in range(0, len(targets), seq_len):
            x = np.zeros((seq_len, 2), np.int32)
            y = np.zeros(seq_len, np.float32)
            chunk = slice(start, start + seq_len)
            n = len(targets[chunk])
            x[:n, 0] = inputs[chunk]
            x[:n, 1] = in_buckets[chunk]
            y[:n] = targets[chunk]
            xs.append(x)
            ys.append(y)
    if max_examples is not None:
        xs, ys = xs[:max_examples], ys[:max_examples]
    if not xs:
        return ClientExamples(x=np.zeros((0, seq_len, 2), np.int32), y=np.zeros((0, seq_len), np.float32))
    return ClientExamples(x=np.stack(xs), y=np.stack(ys))


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


def text_description(vocabulary: Vocabulary, seq_len: int) -> dict[str, Any]:
    """The ``text`` field of a model description: how a device encodes its text for this model."""
    return {"words": list(vocabulary.words), "seq_len": seq_len, "oov_buckets": vocabulary.oov_buckets}


def encoding_of(description: Mapping[str, Any]) -> tuple[Vocabulary, int] | None:
    """The vocabulary and sequence length a model description's ``text`` field states (None: the model
    takes no text)."""
    text = description.get("text")
    if text is None:
        return None
    return Vocabulary(tuple(text["words"]), int(text.get("oov_buckets", 1))), int(text["seq_len"])


def load_texts(data: str) -> dict[str, list[str]]:
    """``synthetic``, a JSON file, a folder holding ``by_speaker.json``, or a folder of per-user texts."""
    if data == "synthetic":
        return synthetic_texts()
    path = Path(data)
    if path.is_dir() and (path / "by_speaker.json").is_file():
        path = path / "by_speaker.json"
    return read_texts(path)
