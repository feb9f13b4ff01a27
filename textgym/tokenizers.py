"""Offline tokenizers behind one interface: byte-level, character-level and word-level.

Every tokenizer reserves the same four special ids at the start of its vocabulary, so code that
handles padding, prompts and episode ends never has to ask which tokenizer it was given:

    0 ``<pad>``   fills the unused columns of an observation
    1 ``<bos>``   starts every prompt, so even an empty prompt gives the policy one real token
    2 ``<eos>``   ends an episode when the agent emits it
    3 ``<unk>``   stands for text outside the vocabulary (never produced by the byte tokenizer)

Decoding skips ``<pad>``, ``<bos>`` and ``<eos>``; ``<unk>`` decodes to a visible marker.
``decode_batch`` decodes many rows of a padded id array in one call: the environment uses it to
turn every finished episode of a step into text for the reward model at once.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
NUM_SPECIAL = len(SPECIAL_TOKENS)

# Words are runs of letters/digits; every other non-space character is a token of its own.
_WORD_RE = re.compile(r"\w+|[^\w\s]")
# Punctuation that attaches to the word before it when word tokens are joined back into text.
_CLOSING_PUNCTUATION = frozenset(".,!?;:)%")


class Tokenizer(ABC):
    """The interface every tokenizer of the environment implements."""

    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    unk_id: int = UNK_ID

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids, special ids included; actions are ``Discrete(vocab_size)``."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without ``<bos>`` or ``<eos>``."""

    @abstractmethod
    def decode_batch(self, ids: np.ndarray, lengths: np.ndarray | None = None) -> list[str]:
        """Decode each row ``ids[i, :lengths[i]]`` of a 2-D id array (all columns if no lengths)."""

    @abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of ``token_id`` (special tokens by their ``<name>``)."""

    def reserved_ids(self) -> tuple[int, ...]:
        """Ids that never belong in a completion: left out of the env's default action mask."""
        return (PAD_ID, BOS_ID, UNK_ID)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of ids; special tokens other than ``<unk>`` are skipped."""
        row = np.asarray(list(ids), dtype=np.int64).reshape(1, -1)  # (1, T)
        return self.decode_batch(row)[0]

    def _check_ids(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be a 2-D integer array, got shape {ids.shape} of {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}), got values in [{ids.min()}, {ids.max()}]"
            )
        return ids

    def _identity(self) -> tuple[object, ...]:
        """What makes two tokenizers of one class encode and decode alike."""
        return ()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._identity() == self._identity()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._identity()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


def _rows(ids: np.ndarray, lengths: np.ndarray | None) -> Iterable[np.ndarray]:
    if lengths is None:
        return iter(ids)
    lengths = np.asarray(lengths)
    if lengths.shape != (len(ids),) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"lengths must be {len(ids)} integers, one per row, got {lengths!r}")
    if len(lengths) and (lengths.min() < 0 or lengths.max() > ids.shape[1]):
        raise ValueError(
            f"lengths must lie in [0, {ids.shape[1]}], got values in [{lengths.min()}, {lengths.max()}]"
        )
    return (row[:n] for row, n in zip(ids, lengths.tolist(), strict=True))


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: id ``b + 4`` for byte ``b``. Any text round-trips; the vocabulary is 260 ids."""

    @property
    def vocab_size(self) -> int:
        return 256 + NUM_SPECIAL

    def encode(self, text: str) -> list[int]:
        return (np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) + NUM_SPECIAL).tolist()

    def decode_batch(self, ids: np.ndarray, lengths: np.ndarray | None = None) -> list[str]:
        ids = self._check_ids(ids)
        out = []
        for row in _rows(ids, lengths):
            data = (row[row >= NUM_SPECIAL] - NUM_SPECIAL).astype(np.uint8).tobytes()
            out.append(data.decode("utf-8", errors="replace"))
        return out

    def id_to_token(self, token_id: int) -> str:
        if token_id < NUM_SPECIAL:
            return SPECIAL_TOKENS[token_id]
        return repr(bytes([token_id - NUM_SPECIAL]))


class _TableTokenizer(Tokenizer):
    """A tokenizer whose decoding is a lookup in a table of strings, one per id."""

    def __init__(self, tokens: Sequence[str], piece_table: Sequence[str]) -> None:
        self._tokens = tuple(tokens)  # vocabulary entries, specials first
        self._index = {tok: i for i, tok in enumerate(self._tokens[NUM_SPECIAL:], NUM_SPECIAL)}
        if len(self._index) != len(self._tokens) - NUM_SPECIAL:
            raise ValueError("vocabulary entries must be unique")
        # What each id contributes to decoded text; specials skipped, <unk> visible.
        self._pieces = np.array(piece_table, dtype=object)

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def vocabulary(self) -> tuple[str, ...]:
        """All vocabulary entries in id order, the four special tokens first."""
        return self._tokens

    def id_to_token(self, token_id: int) -> str:
        return self._tokens[token_id]

    def token_to_id(self, token: str) -> int:
        """Id of a vocabulary entry, ``unk_id`` if absent."""
        return self._index.get(token, UNK_ID)

    def decode_batch(self, ids: np.ndarray, lengths: np.ndarray | None = None) -> list[str]:
        ids = self._check_ids(ids)
        return [self._join(self._pieces[row]) for row in _rows(ids, lengths)]

    def _join(self, pieces: np.ndarray) -> str:
        return "".join(pieces)

    def _identity(self) -> tuple[object, ...]:
        return self._tokens


class CharTokenizer(_TableTokenizer):
    """One id per character of a fixed alphabet; other characters encode to ``<unk>``.

    :param alphabet: the characters of the vocabulary (duplicates are ignored, order is sorted).
    """

    def __init__(self, alphabet: Iterable[str]) -> None:
        chars = sorted(set("".join(alphabet)))
        if not chars:
            raise ValueError("alphabet must contain at least one character")
        super().__init__([*SPECIAL_TOKENS, *chars], ["", "", "", "\ufffd", *chars])

    @classmethod
    def from_corpus(cls, texts: Iterable[str]) -> CharTokenizer:
        """The alphabet of every character that occurs in ``texts``."""
        return cls(set().union(*map(set, texts)))

    def encode(self, text: str) -> list[int]:
        get = self._index.get
        return [get(ch, UNK_ID) for ch in text]


class WordTokenizer(_TableTokenizer):
    """Words and punctuation marks from a vocabulary built from a corpus.

    Text is split into runs of word characters and single punctuation marks. Decoding joins words
    with single spaces and attaches closing punctuation to the word before it, so
    ``decode(encode(s))`` is ``s`` with normalised spacing (and lower-cased if ``lowercase``).

    :param vocabulary: the word and punctuation entries (without special tokens).
    :param lowercase: fold text to lower case before encoding.
    """

    def __init__(self, vocabulary: Iterable[str], lowercase: bool = True) -> None:
        words = list(dict.fromkeys(vocabulary))
        if not words:
            raise ValueError("vocabulary must contain at least one entry")
        bad = [w for w in words if _WORD_RE.fullmatch(w) is None]
        if bad:
            raise ValueError(
                f"vocabulary entries must be single words or single punctuation marks, got {bad[:5]}"
            )
        self.lowercase = lowercase
        # Each word carries its leading space so that decoding is a single join.
        pieces = [w if w in _CLOSING_PUNCTUATION else " " + w for w in words]
        super().__init__([*SPECIAL_TOKENS, *words], ["", "", "", " <unk>", *pieces])

    @classmethod
    def from_corpus(
        cls,
        texts: Iterable[str],
        max_size: int | None = None,
        min_freq: int = 1,
        lowercase: bool = True,
    ) -> WordTokenizer:
        """Vocabulary of the words in ``texts``, most frequent first (ties alphabetical).

        :param max_size: keep at most this many entries (special tokens not counted).
        :param min_freq: drop entries seen fewer times than this.
        """
        counts = Counter(
            tok for text in texts for tok in _WORD_RE.findall(text.lower() if lowercase else text)
        )
        ranked = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        return cls(ranked[:max_size], lowercase=lowercase)

    def _identity(self) -> tuple[object, ...]:
        return (self._tokens, self.lowercase)

    def tokenize(self, text: str) -> list[str]:
        """The word and punctuation strings that ``encode`` maps to ids."""
        return _WORD_RE.findall(text.lower() if self.lowercase else text)

    def encode(self, text: str) -> list[int]:
        get = self._index.get
        return [get(tok, UNK_ID) for tok in self.tokenize(text)]

    def _join(self, pieces: np.ndarray) -> str:
        return "".join(pieces).lstrip(" ")


TOKENIZER_NAMES = ("byte", "char", "word")


def make_tokenizer(name: str, corpus: Iterable[str] = ()) -> Tokenizer:
    """A tokenizer by name; ``char`` and ``word`` build their vocabulary from ``corpus``."""
    if name == "byte":
        return ByteTokenizer()
    texts = list(corpus)
    if name in ("char", "word") and not texts:
        raise ValueError(f"tokenizer {name!r} builds its vocabulary from a corpus, and none was given")
    if name == "char":
        return CharTokenizer.from_corpus(texts)
    if name == "word":
        return WordTokenizer.from_corpus(texts)
    raise ValueError(f"unknown tokenizer {name!r}; accepted: {', '.join(TOKENIZER_NAMES)}")
