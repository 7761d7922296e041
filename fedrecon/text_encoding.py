"""How a device turns its own text into a next-word model's input: the tokenizer, the task's vocabulary,
fixed-length examples, and the encoding a task's model description carries (its ``text`` field).

One implementation for every side: the simulator encodes its users with it (``simulations.text``), a device
encodes the text an app gives the client library, and a personalization encodes the prefix it completes,
so an id means the same word everywhere. NumPy only: the client library an app embeds imports it.

Token ids: 0 padding, 1 beginning of sentence, 2 end of sentence, then the vocabulary's words, then one
out-of-vocabulary id (the prediction target of every unknown word); a model that embeds unknown words per
bucket reads the bucket (``hash mod oov_buckets``, stable across processes) from the example's second
channel. An example is one sentence cut into windows of ``seq_len`` tokens: input ``[BOS, w1, ...,
w_{T-1}]`` and targets ``[w1, ..., EOS]``, padded with 0. ``x`` is ``[n, seq_len, 2]`` (token id, OOV
bucket + 1 or 0 for known words) and ``y`` ``[n, seq_len]``.

The vocabulary always comes from the task, never from the device's text: one built per device would give
the same id different words on different devices.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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

    def labels(self) -> list[str]:
        """A name for every output class, in id order (per-class metrics name words, not ids)."""
        return ["<pad>", "<bos>", "<eos>", *self.words, "<oov>"]

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


def device_examples(texts: Sequence[str], encoding: tuple[Vocabulary, int] | None, *, model: str
                    ) -> ClientExamples:
    """The texts an app gave the client library as ``model``'s examples, encoded with its task's
    ``encoding`` (``encoding_of`` of its description) and capped as the simulation caps a user; a model
    with no text encoding refuses them (``ValueError``: the app must give examples)."""
    if encoding is None:
        raise ValueError(f"texts were given, but {model} takes no text (its description has no text "
                         "encoding): give ClientExamples")
    return examples(texts, *encoding, max_examples=MAX_SEQUENCES_PER_USER)


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


def prefix_window(prefix: str, vocabulary: Vocabulary, seq_len: int) -> tuple[np.ndarray, int]:
    """The model input that ends with ``prefix``'s last sentence so far, and the position whose prediction is
    its next word: the sentence's tokens after BOS, cut into ``seq_len`` windows exactly as training cut
    them, and the window that holds the last token. A prefix that ends a sentence (or is empty) asks for
    the first word of a new one."""
    parts = _SENTENCE_END.split(prefix)
    ids, buckets = vocabulary.encode(words(parts[-1]) if parts else [])
    tokens, in_buckets = [BOS, *ids], [0, *buckets]
    last = len(tokens) - 1
    start = last - last % seq_len
    window = slice(start, start + seq_len)
    x = np.zeros((1, seq_len, 2), np.int32)
    n = len(tokens[window])
    x[0, :n, 0] = tokens[window]
    x[0, :n, 1] = in_buckets[window]
    return x, last - start


__all__ = ["BOS", "EOS", "MAX_SEQUENCES_PER_USER", "PAD", "SPECIAL", "Vocabulary", "encoding_of", "examples",
           "prefix_window", "sentences", "text_description", "words"]
