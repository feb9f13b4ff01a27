"""Action masks of TextGen-v0: the ``allowed_tokens`` argument and ``action_masks()``.

``allowed_tokens`` (ids, token strings as ``Tokenizer.id_to_token`` spells them, or strings that
encode to exactly one token) becomes a read-only ``(vocab_size,)`` bool mask in
``EnvConfig.action_mask``, always with ``<eos>``; left at ``None`` every token but ``<pad>``,
``<bos>`` and ``<unk>`` is allowed. The single env, the batched vector env and the SB3 adapter all
expose it through ``action_masks()`` (sb3-contrib's MaskablePPO protocol). The mask is advice: the
environment itself still accepts any token id.
"""

from __future__ import annotations

import copy
import json
import pickle
import re
import shlex
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from sb3_contrib.common.maskable.utils import get_action_masks, is_masking_supported
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.vec_env import VecMonitor

import textgym
from textgym import ByteTokenizer, TextGenVectorEnv, WordTokenizer
from textgym.sb3 import SB3VecEnv, make_sb3_vec_env
from textgym.tasks import env_arguments_error, make_action_mask, make_env_config

PAD, BOS, EOS, UNK = 0, 1, 2, 3
TASKS = list(textgym.TASKS)
TOKENIZERS = ["byte", "char", "word"]
SPECIAL_MESSAGE = re.escape("may not include <pad>, <bos> or <unk>")

# Sentiment words of the default task's word vocabulary.
WORDS = ["great", "good", "bad"]


# ----------------------------------------------------------------------------------------------
# helpers


def allowed(mask) -> set[int]:
    """The ids a 1-D mask (numpy or torch) allows."""
    return set(np.flatnonzero(np.asarray(mask)).tolist())


def word_ids(*words: str) -> list[int]:
    """Ids of vocabulary entries of the default task's word tokenizer; fails on unknown ones."""
    tok = make_env_config().tokenizer
    ids = [tok.token_to_id(w) for w in words]
    assert UNK not in ids, f"not all of {words} are in the sentiment vocabulary"
    return ids


def assert_bool_mask(mask, vocab_size: int) -> None:
    assert isinstance(mask, np.ndarray)
    assert mask.dtype == np.bool_
    assert mask.shape == (vocab_size,)


# ----------------------------------------------------------------------------------------------
# the default mask


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
@pytest.mark.parametrize("task", TASKS)
def test_default_mask_allows_every_token_but_pad_bos_unk(task, tokenizer):
    """allowed_tokens=None: (V,) bool, True everywhere except <pad>, <bos>, <unk>; <eos> allowed.
    The config's mask, make_action_mask and the env's action_masks() agree."""
    cfg = make_env_config(task, tokenizer=tokenizer)
    V = cfg.tokenizer.vocab_size
    mask = cfg.action_mask
    assert_bool_mask(mask, V)
    assert not mask[[PAD, BOS, UNK]].any()
    assert mask[EOS]
    assert mask[4:].all()
    assert int(mask.sum()) == V - 3
    np.testing.assert_array_equal(make_action_mask(cfg.tokenizer), mask)
    np.testing.assert_array_equal(make_action_mask(cfg.tokenizer, None), mask)
    env = gym.make("TextGen-v0", task=task, tokenizer=tokenizer)
    got = env.unwrapped.action_masks()
    assert_bool_mask(got, V)
    np.testing.assert_array_equal(got, mask)


def test_default_task_alias_gets_the_default_mask():
    """task="default" is sentiment, with the same default mask."""
    np.testing.assert_array_equal(
        make_env_config("default").action_mask, make_env_config("sentiment").action_mask
    )


# ----------------------------------------------------------------------------------------------
# allowed_tokens: what is accepted


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
@pytest.mark.parametrize("task", TASKS)
def test_allowed_ids_give_exactly_those_and_eos(task, tokenizer):
    """Python int ids (the first ordinary id, one in the middle, the last): exactly them + <eos>."""
    V = make_env_config(task, tokenizer=tokenizer).tokenizer.vocab_size
    ids = [4, V // 2, V - 1]
    cfg = make_env_config(task, tokenizer=tokenizer, allowed_tokens=ids)
    assert_bool_mask(cfg.action_mask, V)
    assert allowed(cfg.action_mask) == {EOS, *ids}


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
@pytest.mark.parametrize("task", TASKS)
def test_allowed_spelled_tokens_give_exactly_those_and_eos(task, tokenizer):
    """Token strings as id_to_token spells them (e.g. "b'a'", "b'\\xff'" for bytes, the word or the
    character itself for the table tokenizers) select their ids."""
    tok = make_env_config(task, tokenizer=tokenizer).tokenizer
    V = tok.vocab_size
    ids = [4, V // 2, V - 1]
    spelled = [tok.id_to_token(i) for i in ids]
    cfg = make_env_config(task, tokenizer=tokenizer, allowed_tokens=spelled)
    assert allowed(cfg.action_mask) == {EOS, *ids}


def test_byte_tokenizer_spellings_and_plain_characters():
    """Byte tokens are spelled like Python bytes literals; a one-byte string selects its byte too."""
    tok = ByteTokenizer()
    a = ord("a") + 4
    assert tok.id_to_token(a) == "b'a'"
    assert allowed(make_action_mask(tok, ["b'a'"])) == {EOS, a}
    assert allowed(make_action_mask(tok, ["a"])) == {EOS, a}
    assert allowed(make_action_mask(tok, [" ", "\n"])) == {EOS, ord(" ") + 4, ord("\n") + 4}
    assert allowed(make_action_mask(tok, ["b'\\xff'"])) == {EOS, 259}
    # ids, spellings and plain strings mix; duplicates are harmless
    assert allowed(make_action_mask(tok, [a, "b'a'", "a", 10, 10])) == {EOS, a, 10}


def test_word_tokenizer_words_are_lowercased_like_encode():
    """The sentiment word tokenizer lower-cases, so "Great" and "GREAT" select "great", as encode()
    would; surrounding spaces tokenize away."""
    (great,) = word_ids("great")
    for spelling in ("great", "Great", "GREAT", " great "):
        cfg = make_env_config("sentiment", allowed_tokens=[spelling])
        assert allowed(cfg.action_mask) == {EOS, great}, spelling


def test_case_sensitive_word_tokenizer_keeps_case():
    """A WordTokenizer(lowercase=False) accepts only the vocabulary's own case."""
    tok = WordTokenizer(["Great", "good"], lowercase=False)
    assert allowed(make_action_mask(tok, ["Great"])) == {EOS, 4}
    with pytest.raises(ValueError, match="'great'"):
        make_action_mask(tok, ["great"])


def test_char_tokenizer_characters_and_punctuation():
    """The arithmetic task's char tokenizer: digits and '+' select themselves."""
    cfg = make_env_config("arithmetic", allowed_tokens=[*"0123456789", "+"])
    tok = cfg.tokenizer
    expected = {EOS, *(tok.token_to_id(c) for c in "0123456789+")}
    assert UNK not in expected
    assert allowed(cfg.action_mask) == expected
    assert not cfg.action_mask[tok.token_to_id("=")]


def test_word_tokenizer_words_and_ids_mix():
    """Words, punctuation and ids together, as a tuple: exactly those plus <eos>."""
    great, good, period = word_ids("great", "good", ".")
    cfg = make_env_config("sentiment", allowed_tokens=("great", good, "."))
    assert allowed(cfg.action_mask) == {EOS, great, good, period}


def test_eos_alone_and_empty_list():
    """ "<eos>" (or id 2) is accepted though it is always allowed; an empty list allows only
    <eos>, so every episode can still end."""
    tok = ByteTokenizer()
    assert allowed(make_action_mask(tok, ["<eos>"])) == {EOS}
    assert allowed(make_action_mask(tok, [EOS])) == {EOS}
    assert allowed(make_action_mask(tok, [])) == {EOS}


def test_numpy_array_of_strings_is_accepted():
    """A numpy array of strings works like a list (np.str_ is a str)."""
    great, good = word_ids("great", "good")
    tok = make_env_config().tokenizer
    assert allowed(make_action_mask(tok, np.array(["great", "good"]))) == {EOS, great, good}


@pytest.mark.parametrize(
    "ids", [np.array([5, 6]), [np.int64(5), np.int64(6)], [np.int32(5), np.uint8(6)]], ids=repr
)
def test_numpy_integer_ids_are_accepted(ids):
    """numpy integers are ids like Python ints (the container may be an np.ndarray)."""
    assert allowed(make_action_mask(ByteTokenizer(), ids)) == {EOS, 5, 6}


# ----------------------------------------------------------------------------------------------
# allowed_tokens: what is refused


@pytest.mark.parametrize("token", ["zzzqqq", "great good", "<nope>", ""])
def test_unknown_or_multi_token_word_is_refused(token):
    """Strings that are neither a spelled token nor encode to exactly one known token: ValueError
    naming the string, the tokenizer and the id range."""
    V = make_env_config().tokenizer.vocab_size
    with pytest.raises(
        ValueError, match=re.escape(f"{token!r} is neither a token of the WordTokenizer")
    ) as e:
        make_env_config("sentiment", allowed_tokens=["great", token])
    assert f"[0, {V})" in str(e.value)


@pytest.mark.parametrize("token", ["ab", "é", "b'ab'", b"a"], ids=repr)
def test_byte_tokenizer_refuses_strings_of_several_bytes_and_bytes_objects(token):
    """ "é" is two UTF-8 bytes; a bytes object is not a token string."""
    with pytest.raises(ValueError, match=re.escape(f"{token!r} is neither a token of the ByteTokenizer")):
        make_action_mask(ByteTokenizer(), [token])


def test_char_tokenizer_refuses_characters_outside_its_alphabet():
    """'x' is not in the arithmetic alphabet: it would encode to <unk>, which is refused."""
    with pytest.raises(ValueError, match=re.escape("'x' is neither a token of the CharTokenizer")):
        make_env_config("arithmetic", allowed_tokens=["1", "x"])


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_id_out_of_range_is_refused(tokenizer):
    """Id V (one past the end) and beyond: ValueError naming the id and the range."""
    V = make_env_config(tokenizer=tokenizer).tokenizer.vocab_size
    for bad in (V, V + 100):
        with pytest.raises(ValueError, match=re.escape(f"id {bad} is outside the vocabulary [0, {V})")):
            make_env_config(tokenizer=tokenizer, allowed_tokens=[4, bad])


@pytest.mark.parametrize("bad", [-1, -260])
def test_negative_id_is_refused(bad):
    """A negative id: ValueError naming it and the accepted range."""
    with pytest.raises(ValueError, match=re.escape(f"id {bad} is outside the vocabulary [0, 260)")):
        make_action_mask(ByteTokenizer(), [bad])


def test_bools_and_floats_are_not_ids():
    """Booleans (Python and numpy, True and False) and floats are neither tokens nor ids."""
    tok = ByteTokenizer()
    for bad in (True, False, np.True_, np.False_, 5.0):
        with pytest.raises(ValueError, match=re.escape(f"{bad!r} is neither a token")):
            make_action_mask(tok, [bad])


@pytest.mark.parametrize("bad", ["great", b"great", 5, {5, 6}, {"great": 1}, iter([5])], ids=repr)
def test_allowed_tokens_must_be_a_sequence(bad):
    """A bare string (the commonest slip: "great" instead of ["great"]), bytes, an int, a set, a
    class or an iterator: TypeError naming the value and what is accepted."""
    with pytest.raises(TypeError, match="allowed_tokens must be a sequence of token strings or ids") as e:
        make_env_config("sentiment", allowed_tokens=bad)
    assert repr(bad) in str(e.value)


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
@pytest.mark.parametrize("special", ["<pad>", "<bos>", "<unk>", PAD, BOS, UNK])
def test_pad_bos_unk_are_refused(tokenizer, special):
    """<pad>, <bos> and <unk>, by name or id, never belong in a completion: ValueError."""
    with pytest.raises(ValueError, match=SPECIAL_MESSAGE):
        make_env_config(tokenizer=tokenizer, allowed_tokens=[4, special])


def test_unknown_word_reaches_the_word_tokenizer_as_unk_and_is_refused():
    """A word outside the vocabulary encodes to <unk> but is reported as unknown, not as <unk>."""
    with pytest.raises(ValueError, match=re.escape("'xylophone' is neither a token")):
        make_env_config("sentiment", allowed_tokens=["xylophone"])


def test_gym_make_and_make_vec_raise_the_same_errors():
    """The errors surface unchanged through gym.make, gym.make_vec and make_sb3_vec_env."""
    with pytest.raises(ValueError, match="'zzzqqq' is neither a token"):
        gym.make("TextGen-v0", allowed_tokens=["zzzqqq"])
    with pytest.raises(ValueError, match="'zzzqqq' is neither a token"):
        gym.make_vec("TextGen-v0", num_envs=2, allowed_tokens=["zzzqqq"])
    with pytest.raises(TypeError, match="must be a sequence"):
        make_sb3_vec_env(num_envs=2, allowed_tokens="great")


# ----------------------------------------------------------------------------------------------
# read-only mask, copies


@pytest.mark.parametrize("allowed_tokens", [None, WORDS])
def test_config_mask_is_read_only(allowed_tokens):
    """EnvConfig.action_mask cannot be written to (so no caller can change every env's mask)."""
    cfg = make_env_config(allowed_tokens=allowed_tokens)
    assert cfg.action_mask.flags.writeable is False
    with pytest.raises(ValueError, match="read-only"):
        cfg.action_mask[4] = not cfg.action_mask[4]
    assert make_action_mask(cfg.tokenizer, allowed_tokens).flags.writeable is False


def test_single_env_action_masks_returns_a_writable_copy():
    """Writing into the returned mask changes neither the config nor the next answer."""
    env = gym.make("TextGen-v0", allowed_tokens=WORDS).unwrapped
    first = env.action_masks()
    expected = first.copy()
    assert first.flags.writeable
    assert not np.shares_memory(first, env.config.action_mask)
    first[:] = True
    np.testing.assert_array_equal(env.action_masks(), expected)
    np.testing.assert_array_equal(env.config.action_mask, expected)


@pytest.mark.parametrize("array_type", ["numpy", "torch"])
def test_vector_env_action_masks_returns_a_writable_copy(array_type):
    """Same for the batched env, numpy and torch: changing one answer leaves the next intact."""
    venv = gym.make_vec("TextGen-v0", num_envs=3, allowed_tokens=WORDS, array_type=array_type)
    first = venv.action_masks()
    expected = np.asarray(first).copy()
    first[0, :] = True
    first[2, :] = False
    np.testing.assert_array_equal(np.asarray(venv.action_masks()), expected)
    np.testing.assert_array_equal(venv.unwrapped.config.action_mask, expected[0])


def test_pickled_and_copied_env_keep_the_mask():
    """A pickled or deep-copied env answers action_masks() as the original."""
    env = gym.make("TextGen-v0", allowed_tokens=WORDS).unwrapped
    for clone in (pickle.loads(pickle.dumps(env)), copy.deepcopy(env)):
        np.testing.assert_array_equal(clone.action_masks(), env.action_masks())


def test_pickled_and_copied_env_mask_stays_read_only():
    """The read-only guarantee of EnvConfig.action_mask survives pickle and deepcopy."""
    env = gym.make("TextGen-v0", allowed_tokens=WORDS).unwrapped
    for clone in (pickle.loads(pickle.dumps(env)), copy.deepcopy(env)):
        assert clone.config.action_mask.flags.writeable is False


# ----------------------------------------------------------------------------------------------
# gym.make, gym.make_vec


def test_gym_make_unwrapped_and_wrapper_attr_agree():
    """env.unwrapped.action_masks() and env.get_wrapper_attr("action_masks")() through gym.make's
    wrappers give the same (V,) bool mask: the allowed words and <eos>."""
    env = gym.make("TextGen-v0", allowed_tokens=[*WORDS, 10])
    V = env.unwrapped.tokenizer.vocab_size
    a = env.unwrapped.action_masks()
    b = env.get_wrapper_attr("action_masks")()
    assert_bool_mask(a, V)
    assert_bool_mask(b, V)
    np.testing.assert_array_equal(a, b)
    assert allowed(a) == {EOS, 10, *word_ids(*WORDS)}
    # sb3-contrib's helpers, on a single env
    assert is_masking_supported(env)
    np.testing.assert_array_equal(get_action_masks(env), a)


def test_mask_is_the_same_at_every_step():
    """The mask does not depend on the episode's state: before reset, after steps, after the end."""
    env = gym.make("TextGen-v0", allowed_tokens=WORDS, max_new_tokens=3)
    expected = env.unwrapped.config.action_mask.copy()
    np.testing.assert_array_equal(env.unwrapped.action_masks(), expected)
    env.reset(seed=0)
    for _ in range(3):
        np.testing.assert_array_equal(env.unwrapped.action_masks(), expected)
        env.step(word_ids("good")[0])
    np.testing.assert_array_equal(env.unwrapped.action_masks(), expected)


def test_make_vec_numpy_masks_have_one_equal_row_per_sub_env():
    """gym.make_vec(num_envs=3).action_masks(): a (3, V) bool numpy array, every row the single
    env's mask, unchanged by steps."""
    venv = gym.make_vec("TextGen-v0", num_envs=3, allowed_tokens=WORDS)
    assert isinstance(venv, TextGenVectorEnv)
    single = gym.make("TextGen-v0", allowed_tokens=WORDS).unwrapped.action_masks()
    V = single.size
    masks = venv.action_masks()
    assert isinstance(masks, np.ndarray)
    assert masks.dtype == np.bool_ and masks.shape == (3, V)
    for row in masks:
        np.testing.assert_array_equal(row, single)
    venv.reset(seed=0)
    venv.step(np.full(3, word_ids("great")[0]))
    np.testing.assert_array_equal(venv.action_masks(), masks)


def test_sync_vector_env_reference_gives_the_same_masks():
    """Gymnasium's SyncVectorEnv over single envs, asked with call("action_masks"), agrees."""
    sync = gym.make_vec("TextGen-v0", num_envs=2, vectorization_mode="sync", allowed_tokens=WORDS)
    batched = gym.make_vec("TextGen-v0", num_envs=2, allowed_tokens=WORDS)
    np.testing.assert_array_equal(np.stack(sync.call("action_masks")), batched.action_masks())


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.mark.parametrize("device", DEVICES)
def test_make_vec_torch_masks_are_bool_tensors_on_the_env_device(device):
    """array_type="torch": a (N, V) torch.bool tensor on the env's device, equal to the numpy one."""
    venv = gym.make_vec("TextGen-v0", num_envs=3, allowed_tokens=WORDS, array_type="torch", device=device)
    masks = venv.action_masks()
    assert isinstance(masks, torch.Tensor)
    assert masks.dtype == torch.bool
    assert masks.device == venv.device
    assert masks.device.type == device
    reference = gym.make_vec("TextGen-v0", num_envs=3, allowed_tokens=WORDS).action_masks()
    np.testing.assert_array_equal(masks.cpu().numpy(), reference)


# ----------------------------------------------------------------------------------------------
# Stable-Baselines3 and sb3-contrib


def test_sb3_adapter_env_method_gives_one_row_per_index():
    """SB3VecEnv.env_method("action_masks"): num_envs rows; indices=[1] or 1 one row; [0, 2] two."""
    inner = TextGenVectorEnv(3, autoreset_mode="same_step", allowed_tokens=WORDS)
    venv = SB3VecEnv(inner)
    expected = inner.config.action_mask
    rows = venv.env_method("action_masks")
    assert len(rows) == 3
    for row in rows:
        assert_bool_mask(row, expected.size)
        np.testing.assert_array_equal(row, expected)
    for indices, n in (([1], 1), (1, 1), ([0, 2], 2)):
        rows = venv.env_method("action_masks", indices=indices)
        assert len(rows) == n
        for row in rows:
            assert row.shape == expected.shape
            np.testing.assert_array_equal(row, expected)


def test_sb3_adapter_masks_through_vec_monitor_and_sb3_contrib_helpers():
    """make_sb3_vec_env (VecMonitor over SB3VecEnv): env_method passes through, and sb3-contrib's
    is_masking_supported / get_action_masks give a (N, V) bool array of the allowed tokens."""
    venv = make_sb3_vec_env(num_envs=3, allowed_tokens=WORDS)
    assert isinstance(venv, VecMonitor)
    expected = venv.venv.venv.config.action_mask
    assert len(venv.env_method("action_masks")) == 3
    (row,) = venv.env_method("action_masks", indices=[1])
    np.testing.assert_array_equal(row, expected)
    assert is_masking_supported(venv)
    masks = get_action_masks(venv)
    assert masks.dtype == np.bool_ and masks.shape == (3, expected.size)
    for row in masks:
        assert allowed(row) == {EOS, *word_ids(*WORDS)}
    # the bare adapter too, after stepping
    bare = make_sb3_vec_env(num_envs=2, monitor=False, allowed_tokens=WORDS)
    assert is_masking_supported(bare)
    bare.reset()
    bare.step(np.array([EOS, word_ids("bad")[0]]))
    assert get_action_masks(bare).shape == (2, expected.size)


# ----------------------------------------------------------------------------------------------
# the mask is advisory


def test_env_accepts_disallowed_tokens():
    """The env's docstring: the mask is advice for agents that read it; the env itself accepts any
    token id. A token outside allowed_tokens is stepped and lands in the observation, in the single
    and the batched env; <unk> (never allowed) too."""
    great, bad = word_ids("great", "bad")
    env = gym.make("TextGen-v0", allowed_tokens=["great"], max_new_tokens=4)
    assert not env.unwrapped.action_masks()[bad]
    P = env.unwrapped.prompt_window
    env.reset(seed=0)
    obs, _, terminated, truncated, _ = env.step(bad)
    assert obs["input_ids"][P] == bad and not (terminated or truncated)
    obs, *_ = env.step(UNK)
    assert obs["input_ids"][P + 1] == UNK

    venv = gym.make_vec("TextGen-v0", num_envs=2, allowed_tokens=["great"], max_new_tokens=4)
    venv.reset(seed=0)
    obs, *_ = venv.step(np.array([bad, great]))
    np.testing.assert_array_equal(obs["input_ids"][:, P], [bad, great])


# ----------------------------------------------------------------------------------------------
# env checkers


@pytest.mark.parametrize(
    "kwargs",
    [
        {"allowed_tokens": WORDS},
        {"task": "arithmetic", "allowed_tokens": list("0123456789")},
        {"task": "keyword", "tokenizer": "byte", "allowed_tokens": ["a", "b'b'", 36]},
    ],
    ids=["sentiment-words", "arithmetic-digits", "keyword-bytes"],
)
def test_gymnasium_and_sb3_env_checkers_pass_without_warnings(kwargs):
    """allowed_tokens changes nothing the checkers look at: no errors, no warnings."""
    env = gym.make("TextGen-v0", **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env.unwrapped)
        sb3_check_env(env)
    assert [str(w.message) for w in caught] == []


# ----------------------------------------------------------------------------------------------
# env_arguments_error (the scripts' --task / --env-kwargs check)


@pytest.mark.parametrize(
    ("task", "env_kwargs"),
    [
        ("default", {}),
        ("sentiment", {"allowed_tokens": ["great", "good", 10]}),
        ("arithmetic", {"allowed_tokens": list("0123456789")}),
        ("keyword", {"tokenizer": "byte", "allowed_tokens": ["a", 36]}),
        ("sentiment", {"allowed_tokens": None, "max_new_tokens": 4}),
    ],
    ids=["no-kwargs", "words-and-id", "digits", "bytes", "none"],
)
def test_env_arguments_error_none_for_good_arguments(task, env_kwargs):
    assert env_arguments_error(task, env_kwargs) is None


@pytest.mark.parametrize(
    ("task", "env_kwargs", "needles"),
    [
        ("sentiment", {"task": "keyword"}, ["--task", "not inside --env-kwargs"]),
        ("nope", {}, ["unknown task 'nope'", "sentiment, arithmetic, arithmetic2, keyword"]),
        ("sentiment", {"bogus": 1}, ["'bogus'"]),
        ("sentiment", {"allowed_tokens": ["zzzqqq"]}, ["'zzzqqq' is neither a token", "[0, {V})"]),
        ("sentiment", {"allowed_tokens": "great"}, ["must be a sequence", "'great'"]),
        ("sentiment", {"allowed_tokens": ["V"]}, ["id {V} is outside the vocabulary [0, {V})"]),
        ("sentiment", {"allowed_tokens": [-1]}, ["id -1 is outside the vocabulary [0, {V})"]),
        ("sentiment", {"allowed_tokens": ["<pad>"]}, ["may not include <pad>, <bos> or <unk>"]),
        # checked against the task's own tokenizer: a word is no token of the arithmetic chars
        ("arithmetic", {"allowed_tokens": ["great"]}, ["'great' is neither a token of the CharTokenizer"]),
    ],
    ids=[
        "task-key",
        "unknown-task",
        "unknown-keyword",
        "unknown-token",
        "bare-string",
        "id-out-of-range",
        "negative-id",
        "pad",
        "token-of-another-tokenizer",
    ],
)
def test_env_arguments_error_explains_bad_arguments(task, env_kwargs, needles):
    """A message naming the problem, under the scripts' option names. ("V" stands for the task's
    vocabulary size, one past the last id.)"""
    V = make_env_config(task if task in textgym.TASKS else "default").tokenizer.vocab_size
    if env_kwargs.get("allowed_tokens") == ["V"]:
        env_kwargs = {"allowed_tokens": [V]}
    needles = [n.format(V=V) for n in needles]
    message = env_arguments_error(task, env_kwargs)
    assert isinstance(message, str)
    for needle in needles:
        assert needle in message, (needle, message)
    if "task" not in env_kwargs:
        assert message.startswith("--task/--env-kwargs: ")


def test_env_arguments_error_wants_a_mapping():
    message = env_arguments_error("sentiment", ["great"])
    assert message is not None and "must be a JSON object" in message


def test_train_script_docstring_allowed_tokens_example_is_valid():
    """Every --env-kwargs with allowed_tokens in scripts/train.py's usage lines passes the check
    that train.py itself runs on them."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "train.py"
    lines = [
        ln for ln in script.read_text("utf-8").splitlines() if "allowed_tokens" in ln and "--env-kwargs" in ln
    ]
    assert lines, "no usage line with allowed_tokens in scripts/train.py"
    for line in lines:
        argv = shlex.split(line.split("#")[0])
        task = argv[argv.index("--task") + 1] if "--task" in argv else "default"
        env_kwargs = json.loads(argv[argv.index("--env-kwargs") + 1])
        assert env_arguments_error(task, env_kwargs) is None, line
