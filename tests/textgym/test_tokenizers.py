"""Tests of textgym.tokenizers: special ids, round trips, batch decoding, vocabularies, pickling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from textgym.tokenizers import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    WordTokenizer,
    make_tokenizer,
)

FAST = settings(max_examples=150, deadline=None)

ALPHABET = "abcxyz 0123456789+-=\né!"
WORDS = ("the", "food", "was", "not", "good", "i", "liked", "it", "42", "x_y")
CLOSING = (".", ",", "!", "?", ";", ":", ")", "%")
OPENING = ("(", "-", "'", '"', "#")
PUNCT = CLOSING + OPENING


def char_tok() -> CharTokenizer:
    return CharTokenizer(ALPHABET)


def word_tok() -> WordTokenizer:
    return WordTokenizer([*WORDS, *PUNCT])


def all_tokenizers() -> list[Tokenizer]:
    return [ByteTokenizer(), char_tok(), word_tok()]


TOKENIZER_IDS = ["byte", "char", "word"]


# --------------------------------------------------------------------------- special ids, sizes
def test_special_id_constants():
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert SPECIAL_TOKENS == ("<pad>", "<bos>", "<eos>", "<unk>")


@pytest.mark.parametrize("tok", all_tokenizers(), ids=TOKENIZER_IDS)
def test_every_tokenizer_reserves_the_same_special_ids(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert [tok.id_to_token(i) for i in range(4)] == ["<pad>", "<bos>", "<eos>", "<unk>"]


def test_vocab_sizes():
    assert ByteTokenizer().vocab_size == 260
    # 4 specials + distinct characters of the alphabet.
    assert CharTokenizer("abca").vocab_size == 4 + 3
    assert word_tok().vocab_size == 4 + len(WORDS) + len(PUNCT)
    # Duplicate vocabulary entries are dropped, first occurrence kept.
    assert WordTokenizer(["b", "a", "b"]).vocabulary == (*SPECIAL_TOKENS, "b", "a")


def test_char_vocabulary_is_sorted_after_specials():
    tok = CharTokenizer(["cb", "a", "b"])
    assert tok.vocabulary == (*SPECIAL_TOKENS, "a", "b", "c")
    assert tok.encode("abc") == [4, 5, 6]


def test_byte_ids_are_byte_plus_four():
    tok = ByteTokenizer()
    assert tok.encode("A") == [65 + 4]
    assert tok.encode("é") == [0xC3 + 4, 0xA9 + 4]
    assert tok.encode("") == []
    assert tok.id_to_token(65 + 4) == repr(b"A")


def test_token_to_id_and_id_to_token():
    tok = word_tok()
    assert tok.token_to_id("the") == 4
    assert tok.id_to_token(4) == "the"
    assert tok.token_to_id("zebra") == UNK_ID


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: CharTokenizer(""), "at least one character"),
        (lambda: WordTokenizer([]), "at least one entry"),
        (lambda: WordTokenizer(["two words"]), "single words or single punctuation"),
        (lambda: WordTokenizer(["ok", "?!"]), "single words or single punctuation"),
        (lambda: WordTokenizer(["<unk>"]), "single words or single punctuation"),
    ],
)
def test_constructor_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --------------------------------------------------------------------------------- round trips
@FAST
@given(st.text())
def test_byte_round_trip_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(4 <= i < 260 for i in ids)
    assert tok.decode(ids) == text


@FAST
@given(st.lists(st.integers(0, 259), max_size=40))
def test_byte_decode_never_fails_on_valid_ids(ids):
    out = ByteTokenizer().decode(ids)
    assert isinstance(out, str)


@FAST
@given(st.text(alphabet=ALPHABET))
def test_char_round_trip_in_alphabet(text):
    tok = char_tok()
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert UNK_ID not in ids
    assert tok.decode(ids) == text


@FAST
@given(st.text())
def test_char_unknown_characters_become_visible_marker(text):
    tok = char_tok()
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert [i == UNK_ID for i in ids] == [c not in ALPHABET for c in text]
    expected = "".join(c if c in ALPHABET else "\ufffd" for c in text)
    assert tok.decode(ids) == expected


_word_or_punct = st.sampled_from(WORDS + PUNCT)
_separator = st.sampled_from([" ", "  ", "\t", "\n", " \n\t "])


@st.composite
def vocab_text(draw, tokens=_word_or_punct):
    """Text made of vocabulary entries (random case) separated by arbitrary whitespace."""
    toks = draw(st.lists(tokens, max_size=25))
    upper = draw(st.lists(st.booleans(), min_size=len(toks), max_size=len(toks)))
    seps = draw(st.lists(_separator, min_size=len(toks) + 1, max_size=len(toks) + 1))
    parts = [seps[0]]
    for tok, up, sep in zip(toks, upper, seps[1:], strict=True):
        parts += [tok.upper() if up else tok, sep]
    return "".join(parts), toks


@FAST
@given(vocab_text())
def test_word_round_trip_is_idempotent_on_vocabulary_text(drawn):
    text, toks = drawn
    tok = word_tok()
    ids = tok.encode(text)
    assert UNK_ID not in ids
    assert [tok.id_to_token(i) for i in ids] == toks
    decoded = tok.decode(ids)
    assert tok.encode(decoded) == ids
    # Normalised spacing: single spaces only, none at the ends, none before closing punctuation.
    assert decoded == decoded.strip()
    assert "  " not in decoded and "\t" not in decoded and "\n" not in decoded
    for p in CLOSING:
        assert " " + p not in decoded


@FAST
@given(vocab_text(tokens=st.sampled_from(WORDS)))
def test_word_decode_of_plain_words_is_single_spaced_lowercase(drawn):
    text, toks = drawn
    tok = word_tok()
    assert tok.decode(tok.encode(text)) == " ".join(toks)


@FAST
@given(vocab_text(), st.data())
def test_word_decode_does_not_depend_on_original_spacing(drawn, data):
    text, toks = drawn
    tok = word_tok()
    respaced = data.draw(_separator).join(toks)
    assert tok.decode(tok.encode(text)) == tok.decode(tok.encode(respaced))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The food , was GOOD !", "the food, was good!"),
        ("( 42 % )", "( 42%)"),
        ("i liked it.It was good", "i liked it. it was good"),
        ("  good\n\tfood  ", "good food"),
        ("x_y: 42;not", "x_y: 42; not"),
        ("i - liked 'it'", "i - liked ' it '"),
        ("", ""),
    ],
)
def test_word_decode_normalises_by_hand(text, expected):
    tok = word_tok()
    assert tok.decode(tok.encode(text)) == expected


def test_word_lowercase_false_keeps_case():
    tok = WordTokenizer(["Good", "good"], lowercase=False)
    assert tok.encode("Good good GOOD") == [4, 5, UNK_ID]
    assert tok.decode(tok.encode("Good good")) == "Good good"


def test_word_unknown_words_encode_to_unk_and_decode_to_marker():
    tok = word_tok()
    ids = tok.encode("the zebra was good")
    assert ids[1] == UNK_ID
    assert UNK_ID not in ids[:1] + ids[2:]
    assert tok.decode(ids) == "the <unk> was good"
    assert tok.decode([UNK_ID]) == "<unk>"


def test_char_unknown_decodes_to_replacement_character():
    tok = CharTokenizer("ab")
    assert tok.encode("aXb") == [4, UNK_ID, 5]
    assert tok.decode([4, UNK_ID, 5]) == "a\ufffdb"


def test_byte_tokenizer_never_produces_unk():
    tok = ByteTokenizer()
    assert UNK_ID not in tok.encode("\x00\x01\x02\x03 any text, even \U0001f600")


@pytest.mark.parametrize("tok", all_tokenizers(), ids=TOKENIZER_IDS)
def test_decode_skips_pad_bos_eos(tok):
    ids = tok.encode("good")
    assert tok.decode([BOS_ID, *ids, EOS_ID, PAD_ID, PAD_ID]) == tok.decode(ids)
    assert tok.decode([PAD_ID, BOS_ID, EOS_ID]) == ""
    assert tok.decode([]) == ""


# ------------------------------------------------------------------------------- decode_batch
def _batch_strategy(tok: Tokenizer, texts):
    """Pad encoded texts into a 2-D array whose columns after each length hold random ids."""

    @st.composite
    def build(draw):
        rows = [tok.encode(t) for t in draw(texts)]
        width = max((len(r) for r in rows), default=0) + draw(st.integers(0, 3))
        ids = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            junk = draw(
                st.lists(st.integers(4, tok.vocab_size - 1), min_size=width - len(r), max_size=width - len(r))
            )
            ids[i, len(r) :] = junk
        return ids, np.array([len(r) for r in rows], dtype=np.int64)

    return build()


@FAST
@given(st.data())
def test_byte_decode_batch_with_lengths_equals_per_row_decode(data):
    tok = ByteTokenizer()
    texts = st.lists(st.text(max_size=12), min_size=1, max_size=6)
    ids, lengths = data.draw(_batch_strategy(tok, texts))
    out = tok.decode_batch(ids, lengths)
    assert out == [tok.decode(row[:n]) for row, n in zip(ids, lengths, strict=True)]


@FAST
@given(st.data())
def test_word_decode_batch_with_lengths_equals_per_row_decode(data):
    tok = word_tok()
    texts = st.lists(vocab_text().map(lambda d: d[0]), min_size=1, max_size=6)
    ids, lengths = data.draw(_batch_strategy(tok, texts))
    out = tok.decode_batch(ids, lengths)
    assert out == [tok.decode(row[:n]) for row, n in zip(ids, lengths, strict=True)]


def test_decode_batch_recovers_texts_by_hand():
    tok = ByteTokenizer()
    a, b = tok.encode("hi"), tok.encode("yo!")
    ids = np.array([[*a, 99, 99], [*b, 77]])  # columns after each length are garbage
    assert tok.decode_batch(ids, np.array([2, 3])) == ["hi", "yo!"]
    assert tok.decode_batch(ids, [2, 3]) == ["hi", "yo!"]
    padded = np.array([[*a, PAD_ID], [*b]])
    assert tok.decode_batch(padded) == ["hi", "yo!"]


@pytest.mark.parametrize("tok", all_tokenizers(), ids=TOKENIZER_IDS)
def test_decode_batch_rejects_one_dimensional_ids(tok):
    with pytest.raises(ValueError, match=r"2-D integer array.*shape \(3,\)"):
        tok.decode_batch(np.array([4, 5, 6]))


@pytest.mark.parametrize("tok", all_tokenizers(), ids=TOKENIZER_IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.bool_])
def test_decode_batch_rejects_non_integer_ids(tok, dtype):
    with pytest.raises(ValueError, match="2-D integer array"):
        tok.decode_batch(np.ones((2, 3), dtype=dtype))


@pytest.mark.parametrize("tok", all_tokenizers(), ids=TOKENIZER_IDS)
@pytest.mark.parametrize("bad", [-1, "vocab_size"])
def test_decode_batch_rejects_ids_out_of_range(tok, bad):
    bad = tok.vocab_size if bad == "vocab_size" else bad
    with pytest.raises(ValueError, match=rf"token ids must lie in \[0, {tok.vocab_size}\)"):
        tok.decode_batch(np.array([[4, bad]]))
    with pytest.raises(ValueError, match="token ids must lie in"):
        tok.decode([4, bad])


def test_decode_batch_rejects_negative_lengths():
    tok = ByteTokenizer()
    with pytest.raises(ValueError):
        tok.decode_batch(np.array([tok.encode("abc")]), np.array([-1]))


# --------------------------------------------------------------------------------- from_corpus
CORPUS = ["b a a", "c b a", "d"]  # counts: a 3, b 2, c 1, d 1


def test_word_from_corpus_most_frequent_first_ties_alphabetical():
    tok = WordTokenizer.from_corpus(CORPUS)
    assert tok.vocabulary == (*SPECIAL_TOKENS, "a", "b", "c", "d")
    tok = WordTokenizer.from_corpus(["zz yy xx", "yy", "zz"])  # zz 2, yy 2, xx 1
    assert tok.vocabulary[4:] == ("yy", "zz", "xx")


def test_word_from_corpus_is_deterministic_and_order_independent():
    corpus = ["The food was good .", "the service was slow , but the food was good !", "i liked it"]
    first = WordTokenizer.from_corpus(corpus)
    again = WordTokenizer.from_corpus(list(corpus))
    shuffled = WordTokenizer.from_corpus(corpus[::-1])
    assert first.vocabulary == again.vocabulary == shuffled.vocabulary
    assert first == again == shuffled
    # the 3, was 3, food 2, good 2: by count, then alphabetically.
    assert first.vocabulary[4:8] == ("the", "was", "food", "good")


def test_word_from_corpus_max_size_and_min_freq():
    assert WordTokenizer.from_corpus(CORPUS, max_size=2).vocabulary[4:] == ("a", "b")
    assert WordTokenizer.from_corpus(CORPUS, min_freq=2).vocabulary[4:] == ("a", "b")
    assert WordTokenizer.from_corpus(CORPUS, min_freq=3).vocabulary[4:] == ("a",)
    assert WordTokenizer.from_corpus(CORPUS, max_size=10).vocab_size == 4 + 4
    with pytest.raises(ValueError, match="at least one entry"):
        WordTokenizer.from_corpus(CORPUS, min_freq=4)


def test_word_from_corpus_lowercase_option():
    assert WordTokenizer.from_corpus(["A a"]).vocabulary[4:] == ("a",)
    assert WordTokenizer.from_corpus(["a A"], lowercase=False).vocabulary[4:] == ("A", "a")


def test_char_from_corpus_is_deterministic():
    first = CharTokenizer.from_corpus(["cab", "a"])
    assert first.vocabulary == (*SPECIAL_TOKENS, "a", "b", "c")
    assert CharTokenizer.from_corpus(["a", "cab"]) == first
    with pytest.raises(ValueError, match="at least one character"):
        CharTokenizer.from_corpus([])


# ------------------------------------------------------------------------------ make_tokenizer
def test_make_tokenizer_by_name():
    assert isinstance(make_tokenizer("byte"), ByteTokenizer)
    char = make_tokenizer("char", ["ba"])
    assert isinstance(char, CharTokenizer)
    assert char.vocabulary[4:] == ("a", "b")
    word = make_tokenizer("word", (t for t in CORPUS))  # any iterable, generators included
    assert isinstance(word, WordTokenizer)
    assert word.vocabulary[4:] == ("a", "b", "c", "d")


@pytest.mark.parametrize("name", ["char", "word"])
def test_make_tokenizer_needs_a_corpus(name):
    with pytest.raises(ValueError, match=rf"{name!r} builds its vocabulary from a corpus"):
        make_tokenizer(name)
    with pytest.raises(ValueError, match="none was given"):
        make_tokenizer(name, [])


def test_make_tokenizer_unknown_name():
    with pytest.raises(ValueError, match=r"unknown tokenizer 'bpe'; accepted: byte, char, word"):
        make_tokenizer("bpe", ["some text"])


# ------------------------------------------------------------------------------------- pickling
@pytest.mark.parametrize(
    "tok",
    [char_tok(), word_tok(), WordTokenizer(["Good"], lowercase=False)],
    ids=["char", "word", "word-cased"],
)
def test_table_tokenizers_pickle_and_compare_equal(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone == tok
    assert hash(clone) == hash(tok)
    assert clone.vocabulary == tok.vocabulary
    text = "the Good food, é! zebra"
    assert clone.encode(text) == tok.encode(text)
    assert clone.decode(tok.encode(text)) == tok.decode(tok.encode(text))


def test_tokenizers_of_different_vocabularies_differ():
    assert CharTokenizer("ab") != CharTokenizer("abc")
    assert WordTokenizer(["a"]) != WordTokenizer(["b"])
    assert CharTokenizer("a") != WordTokenizer(["a"])


def test_byte_tokenizer_pickles_and_behaves_the_same():
    tok = ByteTokenizer()
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.vocab_size == 260
    assert clone.encode("héllo") == tok.encode("héllo")
    assert clone.decode(tok.encode("héllo")) == "héllo"


def test_byte_tokenizer_compares_equal_after_unpickling():
    tok = ByteTokenizer()
    assert pickle.loads(pickle.dumps(tok)) == tok


def test_word_tokenizers_with_different_lowercase_are_not_equal():
    folded, cased = WordTokenizer(["a"], lowercase=True), WordTokenizer(["a"], lowercase=False)
    assert folded.encode("A") != cased.encode("A")  # they behave differently ...
    assert folded != cased  # ... so they should not compare equal
