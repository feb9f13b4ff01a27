"""Tests of textgym.hf: the Hugging Face tokenizer adapter and the sequence-classifier reward,
against the ``tokenizers``/``transformers`` objects they wrap, on tiny models built offline."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import gymnasium as gym
import numpy as np
import tokenizers
import torch
import transformers
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import textgym  # noqa: F401  (registers TextGen-v0)
from textgym.hf import (
    MAPPING_FILE,
    HFClassifierReward,
    HFTokenizer,
    join_text,
    require,
    train_bpe_tokenizer,
    write_token_mapping,
)
from textgym.rewards import REWARD_MODELS, as_reward_model
from textgym.tasks import get_task, load_prompts, make_action_mask, make_env_config
from textgym.tokenizers import BOS_ID, EOS_ID, NUM_SPECIAL, PAD_ID, SPECIAL_TOKENS, UNK_ID, WordTokenizer

END = "<|endoftext|>"
LABELS = {0: "NEGATIVE", 1: "POSITIVE"}
TASK = get_task("sentiment")
EXTRA_TEXTS = ["café ☕ naïve 😀", "  two  spaces\tand a tab\n", "", "x", f"a{END}b", "The FOOD was GREAT!!!"]


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE ``transformers`` tokenizer trained on the sentiment task's text."""
    return train_bpe_tokenizer(list(TASK.corpus + TASK.prompts), vocab_size=400)


@pytest.fixture(scope="module")
def tok_dir(bpe, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf_tokenizer")
    bpe.save_pretrained(path)
    return path


def _classifier_dir(bpe, tmp_path_factory, num_labels: int) -> Path:
    torch.manual_seed(num_labels)
    end = bpe.eos_token_id
    labels = LABELS if num_labels == 2 else {0: "LABEL_0"}
    config = transformers.GPT2Config(
        vocab_size=len(bpe),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=128,
        initializer_range=0.2,  # scores that differ from text to text
        bos_token_id=end,
        eos_token_id=end,
        pad_token_id=end,
        num_labels=num_labels,
        id2label=labels,
        label2id={name: i for i, name in labels.items()},
    )
    path = tmp_path_factory.mktemp(f"hf_classifier_{num_labels}")
    bpe.save_pretrained(path)
    transformers.GPT2ForSequenceClassification(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cls2_dir(bpe, tmp_path_factory) -> Path:
    return _classifier_dir(bpe, tmp_path_factory, 2)


@pytest.fixture(scope="module")
def cls1_dir(bpe, tmp_path_factory) -> Path:
    return _classifier_dir(bpe, tmp_path_factory, 1)


def raw_backend(path: Path) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))


def sample_texts() -> list[str]:
    return [*TASK.prompts[:20], *TASK.corpus[:40], *EXTRA_TEXTS]


# --------------------------------------------------------------------------- HFTokenizer: ids
def test_ids_are_the_hugging_face_ids_shifted_by_four(tok_dir):
    tok = HFTokenizer(tok_dir)
    fast = transformers.AutoTokenizer.from_pretrained(tok_dir)
    raw = raw_backend(tok_dir)
    for text in sample_texts():
        expected = [i + NUM_SPECIAL for i in fast(text, add_special_tokens=False)["input_ids"]]
        assert tok.encode(text) == expected, text
        assert tok.encode(text) == [i + NUM_SPECIAL for i in raw.encode(text).ids], text


def test_sizes_and_spellings_match_the_wrapped_tokenizer(tok_dir, bpe):
    tok = HFTokenizer(tok_dir)
    raw = raw_backend(tok_dir)
    assert tok.hf_vocab_size == len(bpe) == raw.get_vocab_size(with_added_tokens=True)
    assert tok.vocab_size == len(bpe) + NUM_SPECIAL
    assert [tok.id_to_token(i) for i in range(NUM_SPECIAL)] == list(SPECIAL_TOKENS)
    for i in range(NUM_SPECIAL, tok.vocab_size):
        assert tok.id_to_token(i) == raw.id_to_token(i - NUM_SPECIAL)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (PAD_ID, BOS_ID, EOS_ID, UNK_ID)
    assert tok.special_tokens == {"pad": END, "bos": END, "eos": END, "unk": None}
    assert tok.hf_special_ids == {
        "pad": bpe.pad_token_id,
        "bos": bpe.bos_token_id,
        "eos": bpe.eos_token_id,
        "unk": None,
    }


def test_byte_level_text_round_trips(tok_dir):
    tok = HFTokenizer(tok_dir)
    for text in sample_texts():
        if END in text:  # the special token is dropped on decoding, as skip_special_tokens does
            continue
        assert tok.decode(tok.encode(text)) == text


def test_decode_agrees_with_the_wrapped_tokenizer_skipping_specials(tok_dir):
    tok = HFTokenizer(tok_dir)
    fast = transformers.AutoTokenizer.from_pretrained(tok_dir)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, tok.vocab_size, size=(40, 12))
    ids[:, 3] = NUM_SPECIAL + fast.eos_token_id  # the shifted copy of a special token
    ids[:, 5] = rng.integers(0, NUM_SPECIAL, size=40)  # textgym's own specials
    lengths = rng.integers(0, 13, size=40)
    full = tok.decode_batch(ids)
    cut = tok.decode_batch(ids, lengths)
    for row, n, text, text_cut in zip(ids, lengths, full, cut, strict=True):
        hf = [i - NUM_SPECIAL for i in row.tolist() if i >= NUM_SPECIAL]
        hf_cut = [i - NUM_SPECIAL for i in row[:n].tolist() if i >= NUM_SPECIAL]
        assert text == fast.decode(hf, skip_special_tokens=True)
        assert text_cut == fast.decode(hf_cut, skip_special_tokens=True)
        assert tok.decode(row[:n]) == text_cut
    assert tok.decode_batch(np.zeros((0, 5), dtype=np.int64)) == []


def test_decode_refuses_ids_outside_the_vocabulary(tok_dir):
    tok = HFTokenizer(tok_dir)
    with pytest.raises(ValueError, match="token ids must lie in"):
        tok.decode_batch(np.array([[tok.vocab_size]]))


def test_model_ids_map_textgym_ids_to_hugging_face_ids(tok_dir, bpe):
    tok = HFTokenizer(tok_dir)
    table = tok.model_ids()
    assert table.shape == (tok.vocab_size,)
    np.testing.assert_array_equal(table[NUM_SPECIAL:], np.arange(len(bpe)))
    assert table[PAD_ID] == bpe.pad_token_id
    assert table[BOS_ID] == bpe.bos_token_id
    assert table[EOS_ID] == bpe.eos_token_id
    assert table[UNK_ID] == 0  # no unk token: the fallback
    assert tok.model_ids(fallback=7)[UNK_ID] == 7


def word_level() -> tokenizers.Tokenizer:
    """A word-level tokenizer with an unk token and separate pad / eos special tokens."""
    vocab = {"[UNK]": 0, "the": 1, "food": 2, "was": 3, "good": 4, "[PAD]": 5, "[EOS]": 6}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.add_special_tokens(["[PAD]", "[EOS]"])
    return backend


def test_unknown_text_becomes_unk_and_specials_are_reserved():
    backend = word_level()
    tok = HFTokenizer(backend, pad_token="[PAD]", eos_token="[EOS]")
    text = "the food was awful"
    raw = backend.encode(text).ids
    assert raw[-1] == backend.token_to_id("[UNK]")
    assert tok.encode(text) == [*(i + NUM_SPECIAL for i in raw[:-1]), UNK_ID]
    assert tok.decode([BOS_ID, *tok.encode(text), EOS_ID]) == backend.decode(raw)  # <unk> is visible
    unk, pad, eos = (backend.token_to_id(t) for t in ("[UNK]", "[PAD]", "[EOS]"))
    assert tok.hf_special_ids == {"pad": pad, "bos": None, "eos": eos, "unk": unk}
    assert sorted(tok.reserved_ids()) == sorted(
        [PAD_ID, BOS_ID, UNK_ID, *(NUM_SPECIAL + i for i in (unk, pad, eos))]
    )
    # <bos> without a bos token reads as the eos token.
    np.testing.assert_array_equal(tok.model_ids()[:NUM_SPECIAL], [pad, eos, eos, unk])
    # Without any declared special but its unk, the model reads the missing ones as the fallback.
    bare = HFTokenizer(backend)
    np.testing.assert_array_equal(bare.model_ids(fallback=5)[:NUM_SPECIAL], [5, 5, 5, unk])


def test_override_tokens_must_be_in_the_vocabulary():
    with pytest.raises(ValueError, match=r"eos_token '<nope>' is not in the tokenizer's vocabulary"):
        HFTokenizer(word_level(), eos_token="<nope>")


def test_wrong_tokenizer_types_are_refused():
    with pytest.raises(TypeError, match=r"tokenizer must be a path, a tokenizers\.Tokenizer"):
        HFTokenizer(42)
    with pytest.raises(TypeError, match="fast transformers tokenizer"):
        HFTokenizer(WordTokenizer(["the", "food"]))


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        HFTokenizer(missing)


# ------------------------------------------------------------------- HFTokenizer: equality, pickle
def test_pickles_and_behaves_the_same(tok_dir):
    tok = HFTokenizer(tok_dir)
    copy = pickle.loads(pickle.dumps(tok))
    assert copy == tok and hash(copy) == hash(tok)
    for text in sample_texts():
        assert copy.encode(text) == tok.encode(text)
    ids = np.array([tok.encode("the food was great")])
    assert copy.decode_batch(ids) == tok.decode_batch(ids)
    assert copy.reserved_ids() == tok.reserved_ids()


def test_equal_tokenizers_compare_equal(tok_dir, bpe):
    a, b = HFTokenizer(tok_dir), HFTokenizer(tok_dir)
    assert a == b and hash(a) == hash(b)
    assert HFTokenizer(bpe) == a  # the loaded object, the same vocabulary and specials
    as_json = HFTokenizer(tok_dir / "tokenizer.json", pad_token=END, bos_token=END, eos_token=END)
    assert as_json == a
    assert HFTokenizer(tok_dir / "tokenizer.json") != a  # declares no pad, bos or eos
    other = train_bpe_tokenizer(list(TASK.corpus + TASK.prompts), vocab_size=300)
    assert HFTokenizer(other) != a
    assert a != WordTokenizer(["the", "food"])


# -------------------------------------------------------------------------------- in the env
def test_env_with_a_directory_encodes_prompts_and_decodes_completions(tok_dir, bpe):
    env = gym.make("TextGen-v0", task="sentiment", tokenizer=str(tok_dir), max_new_tokens=8)
    raw = env.unwrapped
    assert isinstance(raw.tokenizer, HFTokenizer)
    assert env.action_space.n == len(bpe) + NUM_SPECIAL
    obs, info = env.reset(seed=0)
    P = raw.prompt_window
    prompt_ids = [
        BOS_ID,
        *(i + NUM_SPECIAL for i in bpe(info["prompt"], add_special_tokens=False)["input_ids"]),
    ]
    np.testing.assert_array_equal(obs["input_ids"][P - len(prompt_ids) : P], prompt_ids)
    assert obs["attention_mask"][:P].sum() == len(prompt_ids)
    hf_ids = bpe(" really good food", add_special_tokens=False)["input_ids"]
    for i in hf_ids:
        obs, _, terminated, truncated, info = env.step(i + NUM_SPECIAL)
        assert not (terminated or truncated)
    _, _, terminated, _, info = env.step(EOS_ID)
    assert terminated
    assert info["completion"] == bpe.decode(hf_ids) == " really good food"


@pytest.mark.parametrize("form", ["path", "tokenizer.json", "mapping", "mapping-json"])
def test_tokenizer_arguments_of_the_env(tok_dir, bpe, form):
    spec = {
        "path": tok_dir,
        "tokenizer.json": str(tok_dir / "tokenizer.json"),
        "mapping": {"name": "hf", "path": str(tok_dir), "eos_token": END},
        "mapping-json": {"name": "hf", "path": str(tok_dir / "tokenizer.json"), "eos_token": END},
    }[form]
    env = gym.make("TextGen-v0", task="sentiment", tokenizer=spec)
    tok = env.unwrapped.tokenizer
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("the food") == [
        i + NUM_SPECIAL for i in bpe("the food", add_special_tokens=False)["input_ids"]
    ]
    expected_eos = None if form == "tokenizer.json" else bpe.eos_token_id
    assert tok.hf_special_ids["eos"] == expected_eos
    # Whatever the form, the special token's shifted copy stays out of the action mask.
    assert not env.unwrapped.action_masks()[NUM_SPECIAL + bpe.eos_token_id]
    obs, _ = env.reset(seed=1)
    assert env.observation_space.contains(obs)


def test_bad_tokenizer_mappings(tok_dir, tmp_path):
    with pytest.raises(ValueError, match="a mapping must be"):
        gym.make("TextGen-v0", tokenizer={"path": str(tok_dir)})
    with pytest.raises(ValueError, match="a mapping must be"):
        gym.make("TextGen-v0", tokenizer={"name": "word", "path": str(tok_dir)})
    with pytest.raises(TypeError, match=r"tokenizer: .*colour"):
        gym.make("TextGen-v0", tokenizer={"name": "hf", "path": str(tok_dir), "colour": "red"})
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        gym.make("TextGen-v0", tokenizer={"name": "hf", "path": str(tmp_path / "missing_dir")})
    with pytest.raises(ValueError, match=r"unknown tokenizer .*missing_dir"):
        gym.make("TextGen-v0", tokenizer=str(tmp_path / "missing_dir"))


def test_default_action_mask_excludes_the_shifted_special_tokens(tok_dir, bpe):
    tok = HFTokenizer(tok_dir)
    mask = make_action_mask(tok)
    shifted = {NUM_SPECIAL + i for i in bpe.all_special_ids}
    assert shifted == {NUM_SPECIAL + bpe.eos_token_id}
    expected = np.ones(tok.vocab_size, dtype=bool)
    expected[[PAD_ID, BOS_ID, UNK_ID, *shifted]] = False
    np.testing.assert_array_equal(mask, expected)
    assert set(tok.reserved_ids()) == {PAD_ID, BOS_ID, UNK_ID, *shifted}
    env = gym.make("TextGen-v0", task="sentiment", tokenizer=tok_dir)
    np.testing.assert_array_equal(env.unwrapped.action_masks(), expected)


def test_allowed_tokens_refuse_the_special_tokens(tok_dir, bpe):
    eos_copy = NUM_SPECIAL + bpe.eos_token_id
    with pytest.raises(ValueError, match=r"reserved token\), got \['<\|endoftext\|>'\]"):
        gym.make("TextGen-v0", task="sentiment", tokenizer=tok_dir, allowed_tokens=[eos_copy])
    with pytest.raises(ValueError, match="reserved token"):
        gym.make("TextGen-v0", task="sentiment", tokenizer=tok_dir, allowed_tokens=[END])
    # Ordinary tokens by their spelling (as id_to_token spells them) or id are fine.
    good = bpe(" good", add_special_tokens=False)["input_ids"]
    spelled = bpe.convert_ids_to_tokens(good)
    env = gym.make("TextGen-v0", task="sentiment", tokenizer=tok_dir, allowed_tokens=[*spelled, 100])
    expected = np.zeros(env.action_space.n, dtype=bool)
    expected[[EOS_ID, 100, *(i + NUM_SPECIAL for i in good)]] = True
    np.testing.assert_array_equal(env.unwrapped.action_masks(), expected)


def test_gymnasium_and_sb3_env_checkers_pass(tok_dir):
    env = gym.make("TextGen-v0", task="sentiment", tokenizer=tok_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env.unwrapped)
        sb3_check_env(env)
    assert [str(w.message) for w in caught] == []


# ---------------------------------------------------------------------- missing optional extra
def test_require_explains_how_to_install_the_extra(monkeypatch, tok_dir, cls2_dir):
    monkeypatch.setitem(sys.modules, "transformers", None)
    message = r"missing: transformers\): pip install 'textgym\[hf\]'"
    with pytest.raises(ImportError, match=message):
        require("transformers")
    with pytest.raises(ImportError, match=message):
        HFTokenizer(tok_dir)  # a directory is read by transformers
    with pytest.raises(ImportError, match=message):
        HFClassifierReward(cls2_dir, label="POSITIVE")
    # A tokenizer.json needs only the tokenizers package.
    assert HFTokenizer(tok_dir / "tokenizer.json").vocab_size > NUM_SPECIAL
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r"missing: tokenizers\)"):
        HFTokenizer(tok_dir / "tokenizer.json")


# ------------------------------------------------------------------------ HFClassifierReward
def reference_logits(path: Path, texts: list[str]) -> torch.Tensor:
    """(n, num_labels) logits of the saved classifier, one text per forward pass, unpadded."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    rows = []
    with torch.no_grad():
        for text in texts:
            rows.append(model(**tokenizer(text, return_tensors="pt")).logits[0])
    return torch.stack(rows).double()


def prompts_and_completions() -> tuple[list[str], list[str]]:
    """Pairs of very different lengths, so that batches are padded."""
    prompts = list(TASK.prompts[:9])
    completions = [
        "good",
        "the food was really really very good and the service was fast too",
        "bad.",
        "i liked it",
        "not great, not terrible, just fine i guess",
        "!",
        "awful",
        "a fine movie",
        "x",
    ]
    return prompts, completions


def test_join_text_by_hand():
    assert join_text("the food was", "good") == "the food was good"
    assert join_text("the food was ", "good") == "the food was good"
    assert join_text("the food was", " good") == "the food was good"
    assert join_text("the food was\n", "good") == "the food was\ngood"
    assert join_text("", "good") == "good"
    assert join_text("the food was", "") == "the food was"


@pytest.mark.parametrize("batch_size", [64, 4, 1])
def test_probability_of_a_label_equals_the_models_own_forward_pass(cls2_dir, batch_size):
    prompts, completions = prompts_and_completions()
    texts = [f"{p} {c}" for p, c in zip(prompts, completions, strict=True)]
    probs = reference_logits(cls2_dir, texts).softmax(-1).numpy()
    assert probs[:, 1].std() > 0.01  # the scores do depend on the text
    positive = HFClassifierReward(cls2_dir, label="POSITIVE", batch_size=batch_size)
    np.testing.assert_allclose(positive(prompts, completions), probs[:, 1], rtol=1e-5, atol=1e-6)
    negative = HFClassifierReward(cls2_dir, label=0, batch_size=batch_size)
    np.testing.assert_allclose(negative(prompts, completions), probs[:, 0], rtol=1e-5, atol=1e-6)


def test_padding_does_not_change_scores(cls2_dir):
    """Batch-size invariance: each text scores the same alone, in small and in large batches."""
    prompts, completions = prompts_and_completions()
    scores = [
        HFClassifierReward(cls2_dir, label="POSITIVE", output="logit", batch_size=b)(prompts, completions)
        for b in (1, 2, 3, 64)
    ]
    for other in scores[1:]:
        np.testing.assert_allclose(other, scores[0], rtol=1e-5, atol=1e-5)
    # and in another order, with other neighbours
    order = np.random.default_rng(0).permutation(len(prompts))
    reward = HFClassifierReward(cls2_dir, label="POSITIVE", output="logit", batch_size=4)
    shuffled = reward([prompts[i] for i in order], [completions[i] for i in order])
    np.testing.assert_allclose(shuffled, scores[0][order], rtol=1e-5, atol=1e-5)


def test_logit_output_and_completion_text(cls2_dir):
    prompts, completions = prompts_and_completions()
    logits = reference_logits(cls2_dir, completions).numpy()
    reward = HFClassifierReward(cls2_dir, label="POSITIVE", output="logit", text="completion")
    np.testing.assert_allclose(reward(prompts, completions), logits[:, 1], rtol=1e-5, atol=1e-5)
    # The prompt is not read: any other prompts give the same scores.
    np.testing.assert_allclose(reward(["x"] * len(prompts), completions), logits[:, 1], rtol=1e-5, atol=1e-5)


def test_one_label_head_is_a_sigmoid_and_needs_no_label(cls1_dir):
    prompts, completions = prompts_and_completions()
    texts = [join_text(p, c) for p, c in zip(prompts, completions, strict=True)]
    logits = reference_logits(cls1_dir, texts)[:, 0]
    reward = HFClassifierReward(cls1_dir)
    assert reward.label == 0
    np.testing.assert_allclose(reward(prompts, completions), logits.sigmoid().numpy(), rtol=1e-5, atol=1e-6)
    raw = HFClassifierReward(cls1_dir, output="logit", batch_size=2)
    np.testing.assert_allclose(raw(prompts, completions), logits.numpy(), rtol=1e-5, atol=1e-5)


def test_max_length_cuts_texts_to_their_first_tokens(cls2_dir, bpe):
    prompts, completions = prompts_and_completions()
    texts = [join_text(p, c) for p, c in zip(prompts, completions, strict=True)]
    cut = [bpe.decode(bpe(t)["input_ids"][:5]) for t in texts]
    assert any(c != t for c, t in zip(cut, texts, strict=True))
    expected = reference_logits(cls2_dir, cut).softmax(-1)[:, 1].numpy()
    reward = HFClassifierReward(cls2_dir, label="POSITIVE", max_length=5)
    np.testing.assert_allclose(reward(prompts, completions), expected, rtol=1e-5, atol=1e-6)


def test_an_empty_completion_is_scored_alone_as_in_a_batch(cls2_dir):
    reward = HFClassifierReward(cls2_dir, label="POSITIVE", text="completion")
    in_batch = reward(["p", "p"], ["", "good"])
    alone = reward(["p"], [""])
    np.testing.assert_allclose(alone, in_batch[:1], rtol=1e-5, atol=1e-6)


def test_labels_must_be_chosen_and_known(cls2_dir):
    with pytest.raises(ValueError, match=r"has 2 outputs \{0: 'NEGATIVE', 1: 'POSITIVE'\}; choose one"):
        HFClassifierReward(cls2_dir)
    with pytest.raises(ValueError, match=r"label 'NEUTRAL' is not one of .*'NEGATIVE'.*'POSITIVE'"):
        HFClassifierReward(cls2_dir, label="NEUTRAL")
    for bad in (2, -1, True, 1.0):
        with pytest.raises(ValueError, match=r"label must be an index in \[0, 2\)"):
            HFClassifierReward(cls2_dir, label=bad)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"output": "prob"}, "output must be 'probability' or 'logit', got 'prob'"),
        ({"text": "prompt"}, "text must be 'prompt\\+completion' or 'completion', got 'prompt'"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"max_length": 0}, "max_length must be a positive integer or None"),
    ],
)
def test_bad_arguments(cls2_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        HFClassifierReward(cls2_dir, label="POSITIVE", **kwargs)


def test_missing_classifier_directory_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_classifier_here"):
        HFClassifierReward(tmp_path / "no_classifier_here", label=0)


def test_registry_entry(cls2_dir):
    assert "hf-classifier" in REWARD_MODELS
    reward = as_reward_model({"name": "hf-classifier", "path": str(cls2_dir), "label": "POSITIVE"})
    assert isinstance(reward, HFClassifierReward) and reward.label == 1
    prompts, completions = prompts_and_completions()
    direct = HFClassifierReward(cls2_dir, label="POSITIVE")
    np.testing.assert_array_equal(reward(prompts, completions), direct(prompts, completions))


def test_env_rewards_with_the_classifier(cls2_dir, tok_dir, bpe):
    spec = {"name": "hf-classifier", "path": str(cls2_dir), "label": "POSITIVE"}
    hf_ids = bpe(" it was good", add_special_tokens=False)["input_ids"]
    env = gym.make(
        "TextGen-v0", task="sentiment", tokenizer=tok_dir, reward=spec, max_new_tokens=len(hf_ids) + 1
    )
    for seed in range(3):
        _, info = env.reset(seed=seed)
        prompt = info["prompt"]
        for i in hf_ids:
            _, reward, terminated, truncated, info = env.step(i + NUM_SPECIAL)
            assert reward == 0.0 and not (terminated or truncated)
        _, reward, terminated, truncated, info = env.step(EOS_ID)
        assert terminated and info["prompt"] == prompt
        assert info["completion"] == " it was good"
        text = join_text(prompt, " it was good")
        expected = float(reference_logits(cls2_dir, [text]).softmax(-1)[0, 1])
        assert reward == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert info["reward_components"]["score"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # The word tokenizer's env takes the same reward: the classifier reads text, not ids.
    env = gym.make("TextGen-v0", task="sentiment", reward=spec, max_new_tokens=2)
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(EOS_ID)
    expected = float(reference_logits(cls2_dir, [info["prompt"]]).softmax(-1)[0, 1])
    assert terminated and reward == pytest.approx(expected, rel=1e-5, abs=1e-6)


# ------------------------------------------------------- special tokens per model (textgym.json)
CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SMOLLM2_MAPPING = {"bos_token": END, "eos_token": END, "unk_token": None}


@pytest.fixture(scope="module")
def chat_bpe():
    """A tokenizer laid out as SmolLM2's: it declares the chat tokens as bos/eos and <|endoftext|> as unk."""
    byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = byte_level
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=CHAT_SPECIALS, initial_alphabet=byte_level.alphabet()
    )
    backend.train_from_iterator(list(TASK.corpus + TASK.prompts), trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token=END,
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def plain_dir(chat_bpe, tmp_path_factory) -> Path:
    """The tokenizer alone: no textgym.json."""
    path = tmp_path_factory.mktemp("plain")
    chat_bpe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mapped_dir(chat_bpe, tmp_path_factory) -> Path:
    """The tokenizer with the textgym.json that textgym.models writes for SmolLM2."""
    path = tmp_path_factory.mktemp("mapped")
    chat_bpe.save_pretrained(path)
    write_token_mapping(path, SMOLLM2_MAPPING, {"eos_token": "<|im_end|>"}, model="tiny")
    return path


def test_a_folder_without_textgym_json_keeps_the_declared_tokens(plain_dir):
    tok = HFTokenizer(plain_dir)
    assert tok.special_tokens == {"pad": "<|im_end|>", "bos": "<|im_start|>", "eos": "<|im_end|>", "unk": END}
    assert tok.model_ids()[:NUM_SPECIAL].tolist() == [2, 1, 2, 0]
    assert tok.encode(END) == [UNK_ID]
    assert HFTokenizer(plain_dir, chat=True) == tok  # no chat tokens to apply either


def test_textgym_json_chooses_the_special_tokens(mapped_dir):
    tok = HFTokenizer(mapped_dir)
    assert tok.special_tokens == {"pad": "<|im_end|>", "bos": END, "eos": END, "unk": None}
    assert tok.hf_special_ids == {"pad": 2, "bos": 0, "eos": 0, "unk": None}
    assert tok.model_ids()[[BOS_ID, EOS_ID]].tolist() == [0, 0]
    # <|endoftext|> in a text is the model's own token again, not <unk>; it stays out of the actions.
    assert tok.encode(f"the food{END}") == [*tok.encode("the food"), NUM_SPECIAL + 0]
    assert {NUM_SPECIAL + i for i in (0, 1, 2)} <= set(tok.reserved_ids())
    assert not make_action_mask(tok)[NUM_SPECIAL : NUM_SPECIAL + 3].any()
    chat = HFTokenizer(mapped_dir, chat=True)
    assert chat.special_tokens == {"pad": "<|im_end|>", "bos": END, "eos": "<|im_end|>", "unk": None}
    assert chat.model_ids()[[BOS_ID, EOS_ID]].tolist() == [0, 2]
    assert chat != tok


def test_arguments_win_over_textgym_json(mapped_dir):
    tok = HFTokenizer(mapped_dir, bos_token="<|im_start|>", unk_token=END)
    assert tok.special_tokens == {"pad": "<|im_end|>", "bos": "<|im_start|>", "eos": END, "unk": END}
    chat = HFTokenizer(mapped_dir, chat=True, eos_token=END)
    assert chat.special_tokens["eos"] == END


@pytest.mark.parametrize(
    "form", ["dir", "tokenizer.json", "env path", "env mapping", "env tokenizer.json mapping"]
)
def test_every_way_of_naming_the_folder_reads_its_textgym_json(mapped_dir, form):
    if form == "dir":
        tok = HFTokenizer(mapped_dir)
    elif form == "tokenizer.json":
        tok = HFTokenizer(mapped_dir / "tokenizer.json")  # the textgym.json beside it
    else:
        spec = {
            "env path": str(mapped_dir),
            "env mapping": {"name": "hf", "path": str(mapped_dir)},
            "env tokenizer.json mapping": {"name": "hf", "path": str(mapped_dir / "tokenizer.json")},
        }[form]
        tok = make_env_config(task="sentiment", tokenizer=spec).tokenizer
    assert tok.special_tokens["bos"] == tok.special_tokens["eos"] == END


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object, got list"),
        ('{"special_tokens": {"sep_token": "x"}}', "special_tokens: unknown key 'sep_token'"),
        ('{"special_tokens": {"bos_token": 3}}', "bos_token must be a token string or null, got 3"),
        ('{"chat_special_tokens": ["<|im_end|>"]}', "chat_special_tokens must be an object"),
        ('{"special_tokens": {"eos_token": "<|nope|>"}}', r"eos_token '<\|nope\|>' \(from textgym\.json in"),
    ],
)
def test_a_bad_textgym_json_is_refused_with_its_name(plain_dir, tmp_path, content, match):
    folder = tmp_path / "model"
    shutil.copytree(plain_dir, folder)
    (folder / MAPPING_FILE).write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        HFTokenizer(folder)
    assert str(folder) in str(info.value)


def test_save_pretrained_keeps_the_mapping(mapped_dir, chat_bpe, tmp_path):
    tok = HFTokenizer(mapped_dir)
    tok.save_pretrained(tmp_path / "a")
    assert HFTokenizer(tmp_path / "a") == tok
    assert HFTokenizer(tmp_path / "a", chat=True) == HFTokenizer(mapped_dir, chat=True)
    # Arguments go into the section in use; the other stays as the folder had it.
    chat = HFTokenizer(mapped_dir, chat=True, pad_token=END)
    chat.save_pretrained(tmp_path / "b")
    assert HFTokenizer(tmp_path / "b", chat=True) == chat
    assert HFTokenizer(tmp_path / "b") == tok
    # Nothing to say: no textgym.json, and a stale one goes.
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / MAPPING_FILE).write_text(json.dumps({"special_tokens": SMOLLM2_MAPPING}))
    HFTokenizer(chat_bpe).save_pretrained(tmp_path / "c")
    assert not (tmp_path / "c" / MAPPING_FILE).exists()
    # A bare tokenizer.json is written as one, and read back with its mapping.
    bare = HFTokenizer(mapped_dir / "tokenizer.json", pad_token=END)
    bare.save_pretrained(tmp_path / "d")
    assert HFTokenizer(tmp_path / "d" / "tokenizer.json") == bare


# ------------------------------------------------------------------------------- chat templates
@pytest.mark.parametrize("folder", ["plain", "mapped"])
def test_chat_prompts_read_as_the_template_to_the_model(plain_dir, mapped_dir, chat_bpe, folder):
    path = plain_dir if folder == "plain" else mapped_dir
    prompts = ["the food was", "two\nlines"]
    config = make_env_config(task="sentiment", tokenizer=str(path), prompts=prompts, chat_template=True)
    assert config.prompts == tuple(prompts)  # the reward model reads the prompts as written
    table = config.tokenizer.model_ids()
    for prompt, ids in zip(prompts, config.prompt_ids, strict=True):
        template = chat_bpe.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        template_ids = chat_bpe(template, add_special_tokens=False)["input_ids"]
        read = table[list(ids)].tolist()
        if folder == "plain":  # <bos> is <|im_start|>: it stands for the template's first token
            assert read == template_ids
        else:  # <bos> is <|endoftext|>, before the whole template
            assert read == [0, *template_ids]
    assert config.tokenizer.special_tokens["eos"] == "<|im_end|>"  # a reply ends its turn
    plain = make_env_config(task="sentiment", tokenizer=str(path), prompts=prompts)
    assert plain.prompt_ids[0] == (BOS_ID, *plain.tokenizer.encode(prompts[0]))
    assert config.max_prompt_tokens > plain.max_prompt_tokens


def test_chat_template_needs_a_tokenizer_that_has_one(tok_dir, mapped_dir):
    with pytest.raises(
        ValueError, match=r"chat_template=True needs a Hugging Face tokenizer .* WordTokenizer"
    ):
        make_env_config(task="sentiment", chat_template=True)
    with pytest.raises(ValueError, match=r"a bare tokenizer\.json .* has none"):
        make_env_config(task="sentiment", tokenizer=str(mapped_dir / "tokenizer.json"), chat_template=True)
    with pytest.raises(ValueError, match=r"this tokenizer .* has none"):
        make_env_config(task="sentiment", tokenizer=str(tok_dir), chat_template=True)
    with pytest.raises(TypeError, match="chat_template must be True or False"):
        make_env_config(task="sentiment", tokenizer=str(mapped_dir), chat_template="yes")


# ------------------------------------------------------------ prompt files that hold several lines
def test_json_and_jsonl_prompt_files_hold_multi_line_prompts(tmp_path):
    prompts = ["Review this film:\nThe plot was", "plain", ""]
    (tmp_path / "p.json").write_text(json.dumps(prompts), encoding="utf-8")
    lines = [json.dumps(prompts[0]), "", json.dumps({"prompt": prompts[1], "id": 7}), json.dumps(prompts[2])]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "p.JSON").write_text(json.dumps(prompts), encoding="utf-8")
    for name in ("p.json", "p.jsonl", "p.JSON"):
        assert load_prompts(tmp_path / name) == tuple(prompts), name
    (tmp_path / "p.txt").write_text("one\n\ntwo\n", encoding="utf-8")
    assert load_prompts(tmp_path / "p.txt") == ("one", "two")  # one prompt a line, as before
    config = make_env_config(task="sentiment", tokenizer="byte", prompts=tmp_path / "p.json")
    assert config.prompts == tuple(prompts)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("p.json", '["a", ', r"p\.json' is not valid JSON"),
        ("p.json", '{"prompts": ["a"]}', r"holds a JSON dict; a \.json file must hold a list of strings"),
        ("p.json", '["a", 3]', r"item 1 of the list in .*p\.json' is 3, not a string"),
        ("p.json", "[]", "holds no prompts"),
        ("p.jsonl", '"a"\n\n"b\n', r"line 3 of .*p\.jsonl' is not valid JSON"),
        (
            "p.jsonl",
            '"a"\n{"text": "b"}\n',
            r'line 2 of .*must be a JSON string or an object with a "prompt"',
        ),
        ("p.jsonl", "\n\n", "holds no prompts"),
    ],
)
def test_bad_json_prompt_files_name_the_file_and_place(tmp_path, name, content, match):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_prompts(tmp_path / name)
