"""Tests of textgym.tasks (built-in tasks, make_env_config, prompts) and textgym.corpora."""

from __future__ import annotations

import math
import random

import pytest

from textgym import corpora
from textgym.rewards import (
    ExactMatchReward,
    FunctionReward,
    KeywordReward,
    LengthReward,
    RewardModel,
    SentimentReward,
    TranslationReward,
    VaderReward,
    arithmetic_answer,
)
from textgym.tasks import (
    SPLITS,
    TASKS,
    EnvConfig,
    Task,
    get_task,
    held_out,
    load_prompts,
    make_env_config,
)
from textgym.tokenizers import BOS_ID, UNK_ID, ByteTokenizer, CharTokenizer, WordTokenizer

# task: (tokenizer class, reward class, max_new_tokens, longest prompt in tokens with <bos>)
# Longest prompts, counted by hand:
#   sentiment  "review of the hotel : the breakfast was"  8 words + <bos> = 9
#   arithmetic "10+10="                                    6 chars + <bos> = 7
#   arithmetic2 "10+10="                                   6 chars + <bos> = 7 (no operand has 3 digits)
#   keyword    "once upon a time the fox walked to the"   9 words + <bos> = 10
#   reviews    "I have used it every day for a month, and the battery life is"  61 bytes + <bos> = 62
#   translate  "the big dogs see the small cats . ="        9 words + <bos> = 10
DEFAULTS = {
    "sentiment": (WordTokenizer, SentimentReward, 8, 9),
    "arithmetic": (CharTokenizer, ExactMatchReward, 4, 7),
    "arithmetic2": (CharTokenizer, ExactMatchReward, 4, 7),
    "keyword": (WordTokenizer, KeywordReward, 10, 10),
    "reviews": (ByteTokenizer, VaderReward, 24, 62),
    "translate": (WordTokenizer, TranslationReward, 10, 10),
}
KINDS = {
    "sentiment": "word",
    "arithmetic": "char",
    "arithmetic2": "char",
    "keyword": "word",
    "reviews": "byte",
    "translate": "word",
}


# ------------------------------------------------------------------------------------ get_task
def test_task_registry():
    assert set(TASKS) == {"sentiment", "arithmetic", "arithmetic2", "keyword", "reviews", "translate"}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_get_task(name):
    task = get_task(name)
    assert isinstance(task, Task)
    assert task.name == name
    assert task.prompts and all(isinstance(p, str) and p for p in task.prompts)
    assert task.corpus and all(isinstance(t, str) for t in task.corpus)
    assert task.tokenizer_kind == KINDS[name]
    assert task.max_new_tokens == DEFAULTS[name][2]
    assert isinstance(task.reward(), DEFAULTS[name][1])
    assert get_task(name) is task  # cached


def test_default_task_is_sentiment():
    default, sentiment = get_task("default"), get_task("sentiment")
    assert default.name == "sentiment"
    assert default == sentiment
    assert default.prompts == sentiment.prompts and default.corpus == sentiment.corpus


@pytest.mark.parametrize("name", ["nope", "Sentiment", ""])
def test_get_task_unknown_lists_names(name):
    with pytest.raises(
        ValueError,
        match=rf"unknown task {name!r}; built-in tasks: default, sentiment, arithmetic, arithmetic2, keyword, reviews, translate",
    ):
        get_task(name)


def test_task_prompt_sets_by_hand():
    assert len(get_task("arithmetic").prompts) == 20 * 20
    assert get_task("arithmetic").prompts[:3] == ("0+0=", "0+1=", "0+2=")
    assert get_task("keyword").prompts[0] == "once upon a time the fox walked to the"
    assert "review of the hotel : the breakfast was" in get_task("sentiment").prompts


# ---------------------------------------------------------------------------- make_env_config
@pytest.mark.parametrize("name", sorted(TASKS))
def test_make_env_config_defaults(name):
    tok_cls, reward_cls, max_new, longest = DEFAULTS[name]
    cfg = make_env_config(name)
    assert isinstance(cfg, EnvConfig)
    assert cfg.task == name
    assert type(cfg.tokenizer) is tok_cls
    assert type(cfg.reward) is reward_cls
    assert cfg.max_new_tokens == max_new
    assert cfg.max_prompt_tokens == longest
    assert cfg.seq_len == longest + max_new
    assert cfg.length_penalty == 0.0
    task = get_task(name)
    assert (
        cfg.split
        == task.default_split
        == ("train" if name in ("reviews", "arithmetic2", "translate") else "all")
    )
    assert cfg.prompts == task.split_prompts(task.default_split)
    assert len(cfg.prompt_ids) == len(cfg.prompts)
    assert all(ids[0] == BOS_ID for ids in cfg.prompt_ids)
    # The window fits the longest prompt of every split, which may lie outside the default one.
    assert max(len(ids) for ids in cfg.prompt_ids) <= longest
    assert max(len(ids) for ids in make_env_config(name, split="all").prompt_ids) == longest
    assert all(UNK_ID not in ids for ids in cfg.prompt_ids)


def test_make_env_config_default_task():
    cfg = make_env_config()
    assert cfg.task == "sentiment"
    assert isinstance(cfg.reward, SentimentReward)
    assert make_env_config("default").prompts == make_env_config("sentiment").prompts


def test_keyword_task_reward_and_vocabulary():
    cfg = make_env_config("keyword")
    assert cfg.reward.keywords == ("happy", "friend", "home")
    # The agent must be able to produce the words it is rewarded for.
    for word in cfg.reward.keywords:
        assert cfg.tokenizer.token_to_id(word) != UNK_ID


def test_arithmetic_prompt_ids_by_hand():
    cfg = make_env_config("arithmetic")
    tok = cfg.tokenizer
    assert tok.vocabulary[4:] == ("+", *"0123456789", "=")
    # "0+0=" -> <bos> '0' '+' '0' '='; '+' is 4, digits 5..14, '=' 15
    assert cfg.prompt_ids[0] == (BOS_ID, 5, 4, 5, 15)


def test_override_reward():
    assert isinstance(make_env_config("sentiment", reward="length").reward, LengthReward)
    kw = make_env_config("sentiment", reward={"name": "keyword", "keywords": ["great"]}).reward
    assert isinstance(kw, KeywordReward) and kw.keywords == ("great",)

    def my_reward(prompt, completion):
        return 1.0

    fn = make_env_config("arithmetic", reward=my_reward).reward
    assert isinstance(fn, FunctionReward) and fn.name == "my_reward"
    instance = LengthReward(target=3)
    assert make_env_config("keyword", reward=instance).reward is instance
    with pytest.raises(ValueError, match="unknown reward model 'bleu'"):
        make_env_config(reward="bleu")


def test_each_config_gets_a_fresh_default_reward():
    a, b = make_env_config("keyword"), make_env_config("keyword")
    assert isinstance(a.reward, RewardModel) and a.reward is not b.reward


def test_override_tokenizer_by_name():
    cfg = make_env_config("arithmetic", tokenizer="byte")
    assert isinstance(cfg.tokenizer, ByteTokenizer)
    # "0+0=" in bytes 48 43 48 61, each + 4
    assert cfg.prompt_ids[0] == (BOS_ID, 52, 47, 52, 65)
    assert cfg.max_prompt_tokens == 7

    word = make_env_config("arithmetic", tokenizer="word")
    assert isinstance(word.tokenizer, WordTokenizer)
    # "10+10=" -> 10 + 10 = -> 4 tokens + <bos>
    assert word.max_prompt_tokens == 5

    char = make_env_config("sentiment", tokenizer="char")
    assert isinstance(char.tokenizer, CharTokenizer)
    assert all(UNK_ID not in ids for ids in char.prompt_ids)
    assert char.max_prompt_tokens == len("review of the restaurant : the dessert was") + 1


def test_override_tokenizer_instance():
    tok = CharTokenizer("0123456789+=")
    cfg = make_env_config("arithmetic", tokenizer=tok)
    assert cfg.tokenizer is tok
    assert cfg.prompt_ids[0] == (BOS_ID, *tok.encode("0+0="))


@pytest.mark.parametrize("bad", ["bpe", "Word", ""])
def test_unknown_tokenizer_name(bad):
    with pytest.raises(
        ValueError, match=rf"unknown tokenizer {bad!r}; accepted: byte, char, word or a Tokenizer"
    ):
        make_env_config(tokenizer=bad)


@pytest.mark.parametrize("bad", [5, ByteTokenizer, ["word"]])
def test_tokenizer_wrong_type(bad):
    with pytest.raises(TypeError, match="tokenizer must be a Tokenizer"):
        make_env_config(tokenizer=bad)


def test_override_lengths_and_penalty():
    cfg = make_env_config("sentiment", max_new_tokens=3, length_penalty=0.25)
    assert cfg.max_new_tokens == 3
    assert cfg.seq_len == 9 + 3
    assert cfg.length_penalty == 0.25
    penalty = make_env_config("sentiment", length_penalty=1).length_penalty
    assert penalty == 1.0 and type(penalty) is float
    assert make_env_config("sentiment", length_penalty=-0.5).length_penalty == -0.5
    roomy = make_env_config("sentiment", max_prompt_tokens=20)
    assert roomy.max_prompt_tokens == 20 and roomy.seq_len == 28


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, False, "3"])
def test_bad_max_new_tokens(bad):
    with pytest.raises(ValueError, match=r"max_new_tokens must be a positive integer, got"):
        make_env_config(max_new_tokens=bad)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "x", True, None, [0.1]])
def test_bad_length_penalty(bad):
    with pytest.raises(ValueError, match=r"length_penalty must be a finite number, got"):
        make_env_config(length_penalty=bad)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "9"])
def test_bad_max_prompt_tokens(bad):
    with pytest.raises(ValueError, match=r"max_prompt_tokens must be a positive integer, got"):
        make_env_config(max_prompt_tokens=bad)


def test_max_prompt_tokens_too_small_names_prompt_and_refuses_to_cut():
    # Arithmetic prompts are ordered a*20 + b; the first 7-token prompt is "10+10=" at 10*20 + 10.
    # Those with two two-digit operands (10..19 each) are too long: 100 of them.
    with pytest.raises(
        ValueError, match=r"prompt 210 \('10\+10='\) is 7 tokens with <bos>, over max_prompt_tokens=6"
    ) as info:
        make_env_config("arithmetic", max_prompt_tokens=6)
    message = str(info.value)
    assert "(100 prompt(s) are too long)" in message
    assert "prompts are never cut" in message


def test_max_prompt_tokens_error_with_own_prompts():
    prompts = ["short one", "this prompt is much longer than the others", "x"]
    with pytest.raises(ValueError, match=r"prompt 1 \('this prompt is much longer") as info:
        make_env_config("sentiment", prompts=prompts, max_prompt_tokens=3)
    assert "prompts are never cut" in str(info.value)
    assert "(1 prompt(s) are too long)" in str(info.value)


def test_max_prompt_tokens_none_fits_longest_prompt():
    cfg = make_env_config("sentiment", prompts=["a", "a b c d e", "b c"], max_prompt_tokens=None)
    assert cfg.max_prompt_tokens == 6  # 5 words + <bos>
    exact = make_env_config("sentiment", prompts=["a", "a b c d e", "b c"], max_prompt_tokens=6)
    assert exact.max_prompt_tokens == 6


def test_task_must_be_a_string():
    with pytest.raises(TypeError, match="task must be the name of a built-in task"):
        make_env_config(task=3)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_env_config(task="nope")


# -------------------------------------------------------------------------------------- prompts
def test_prompts_from_list():
    cfg = make_env_config("sentiment", prompts=["The hotel was", "i"])
    assert cfg.prompts == ("The hotel was", "i")
    assert len(cfg.prompt_ids) == 2
    assert cfg.max_prompt_tokens == 4


def test_prompts_from_tuple_and_generator():
    assert load_prompts(("a", "b")) == ("a", "b")
    assert load_prompts(p for p in ["a", "b"]) == ("a", "b")
    assert load_prompts(["", "x"]) == ("", "x")  # a list is taken as given, empty prompts included


def test_prompts_from_file_skip_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("the food was\n\n   \nreview of the movie : i\r\n\t\nlast one", encoding="utf-8")
    expected = ("the food was", "review of the movie : i", "last one")
    assert load_prompts(path) == expected
    assert load_prompts(str(path)) == expected
    cfg = make_env_config("sentiment", prompts=path)
    assert cfg.prompts == expected
    assert cfg.max_prompt_tokens == 1 + 6  # review of the movie : i


def test_prompts_file_is_utf8(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("café crème\n".encode())
    assert load_prompts(path) == ("café crème",)


@pytest.mark.parametrize("missing", ["no_such_file.txt", "hello world"])
def test_prompts_missing_file(tmp_path, missing):
    path = tmp_path / missing
    with pytest.raises(FileNotFoundError, match="prompts: no file"):
        make_env_config(prompts=path)
    with pytest.raises(FileNotFoundError, match="or a list of strings"):
        make_env_config(prompts=str(path))


def test_prompts_directory_is_not_a_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompts: no file"):
        load_prompts(tmp_path)


def test_prompts_empty_list():
    with pytest.raises(ValueError, match="prompts: the list holds no prompts; at least one is needed"):
        make_env_config(prompts=[])


def test_prompts_file_with_only_blank_lines(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("\n   \n\t\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"prompts: the file '.*blank\.txt' holds no prompts"):
        make_env_config(prompts=path)
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompts(empty)


@pytest.mark.parametrize(
    "bad, index, kind", [(["ok", 3], 1, "int"), ([None], 0, "NoneType"), (["a", "b", b"c"], 2, "bytes")]
)
def test_prompts_non_string_element(bad, index, kind):
    with pytest.raises(TypeError, match=rf"prompts\[{index}\] must be a string, got {kind}"):
        make_env_config(prompts=bad)


def test_prompts_not_iterable():
    with pytest.raises(
        TypeError, match="prompts must be a list of strings or a path to a text file, got int"
    ):
        make_env_config(prompts=5)


def test_word_tokenizer_covers_overridden_prompts():
    prompts = ["Zebras galloped across Xanadu", "quokka smiles ; wombat naps"]
    cfg = make_env_config("sentiment", prompts=prompts)
    assert isinstance(cfg.tokenizer, WordTokenizer)
    for ids in cfg.prompt_ids:
        assert UNK_ID not in ids
    assert cfg.tokenizer.decode(cfg.prompt_ids[0]) == "zebras galloped across xanadu"
    # The task corpus still supplies the rest of the vocabulary.
    for word in ("great", "terrible", "food"):
        assert cfg.tokenizer.token_to_id(word) != UNK_ID
    # ... and the default tokenizer, built without these prompts, did not know them.
    assert UNK_ID in make_env_config("sentiment").tokenizer.encode("zebras galloped")


def test_char_tokenizer_covers_overridden_prompts():
    cfg = make_env_config("arithmetic", prompts=["3*4=", "9-2="])
    assert "*" in cfg.tokenizer.vocabulary and "-" in cfg.tokenizer.vocabulary
    assert all(UNK_ID not in ids for ids in cfg.prompt_ids)
    assert cfg.reward(list(cfg.prompts), ["12", "7"]).tolist() == [1.0, 1.0]


# -------------------------------------------------------------------------------------- corpora
@pytest.mark.parametrize("kind", ["reviews", "stories"])
def test_generate_is_deterministic_for_a_seed(kind):
    first = corpora.generate(kind, 50, seed=7)
    assert first == corpora.generate(kind, 50, seed=7)
    assert len(first) == 50 and all(isinstance(t, str) and t for t in first)
    assert first != corpora.generate(kind, 50, seed=8)
    assert corpora.generate(kind, 20, seed=7) == first[:20]  # a prefix of the longer draw


def test_generate_unknown_corpus():
    with pytest.raises(ValueError, match="unknown corpus 'poems'; accepted: reviews, stories"):
        corpora.generate("poems", 3)


def test_task_corpora_match_generated_corpora():
    assert get_task("sentiment").corpus == tuple(corpora.generate("reviews", 4000, seed=0))
    assert get_task("keyword").corpus == tuple(corpora.generate("stories", 2000, seed=0))
    assert get_task("arithmetic").corpus[:2] == ("0+0=0", "0+1=1")
    assert "19+19=38" in get_task("arithmetic").corpus


@pytest.mark.parametrize("task, kind", [("sentiment", "reviews"), ("keyword", "stories")])
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_generated_text_has_no_unk_for_task_tokenizer(task, kind, seed):
    tok = make_env_config(task).tokenizer
    for text in corpora.generate(kind, 300, seed=seed):
        assert UNK_ID not in tok.encode(text), text


def test_arithmetic_corpus_has_no_unk_for_task_tokenizer():
    tok = make_env_config("arithmetic").tokenizer
    for text in get_task("arithmetic").corpus:
        assert UNK_ID not in tok.encode(text)


# --------------------------------------------------------------------------------------- splits
@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_partition_the_prompts_and_keep_their_order(name):
    task = get_task(name)
    train, test, every = (task.split_prompts(s) for s in SPLITS)
    assert every == task.prompts
    assert set(train).isdisjoint(test) and sorted(train + test) == sorted(every)
    assert train == tuple(p for p in every if p not in set(test))
    assert test == tuple(p for p in every if p in set(test))
    assert task.split_indices("test") == task.test_indices


def test_split_sizes_by_hand():
    # round(0.2 * distinct keys): sentiment 68 -> 13.6 -> 14, keyword 56 -> 11.2 -> 11,
    # reviews 378 -> 75.6 -> 76. Arithmetic: 20 * 21 / 2 = 210 unordered pairs -> 42 held out,
    # 82 prompts (two orders each, but one for a pair a == b: 2 such pairs here). Arithmetic2:
    # 100 * 101 / 2 = 5050 pairs -> 1010 held out; 2000 prompts, so 20 of them pairs a == b.
    # Translate: 5000 distinct sentences -> 1000 held out.
    sizes = {
        name: (len(get_task(name).split_prompts("train")), len(get_task(name).test_indices)) for name in TASKS
    }
    assert sizes == {
        "sentiment": (54, 14),
        "keyword": (45, 11),
        "reviews": (302, 76),
        "arithmetic": (318, 82),
        "arithmetic2": (8000, 2000),
        "translate": (4000, 1000),
    }


def test_splits_are_pinned():
    # Results on "test" are comparable across versions only while the split stays the same.
    assert get_task("arithmetic").split_prompts("test")[:3] == ("0+10=", "0+18=", "1+5=")
    assert get_task("reviews").split_prompts("test")[:3] == (
        "The movie was",
        "I have to say that the movie was",
        "Frankly, the plot",
    )


def test_held_out_is_seeded_and_keeps_equal_keys_together():
    keys = ["a", "b", "a", "c", "d", "b", "e"]  # five distinct keys
    first = held_out(keys, 0.4, seed=3)
    assert first == held_out(keys, 0.4, seed=3)
    chosen = {keys[i] for i in first}
    assert len(chosen) == 2  # round(0.4 * 5)
    assert first == tuple(i for i, k in enumerate(keys) if k in chosen)
    assert any(held_out(keys, 0.4, seed=s) != first for s in range(1, 10))
    assert held_out(keys, 0.0) == ()
    assert held_out(keys, 1.0) == tuple(range(len(keys)))


@pytest.mark.parametrize("name", ["arithmetic", "arithmetic2"])
def test_arithmetic_holds_out_operand_pairs_in_both_orders_and_their_answers(name):
    task = get_task(name)
    test = set(task.split_prompts("test"))
    for prompt in task.prompts:
        a, b = prompt[:-1].split("+")
        assert (prompt in test) == (f"{b}+{a}=" in test), prompt
    # The corpus (pretraining text) holds the training equations only; the vocabulary is unchanged.
    assert task.corpus == tuple(p + arithmetic_answer(p) for p in task.split_prompts("train"))
    assert not {line.split("=")[0] + "=" for line in task.corpus} & test
    assert make_env_config(name).tokenizer.vocabulary[4:] == ("+", *"0123456789", "=")


def test_arithmetic2_prompts_answers_and_split_by_hand():
    task = get_task("arithmetic2")
    assert len(task.prompts) == 100 * 100
    assert task.prompts[:2] == ("0+0=", "0+1=") and task.prompts[-1] == "99+99="
    assert task.default_split == "train"  # a new task: the held-out prompts are opt-in
    cfg = make_env_config("arithmetic2")
    assert cfg.split == "train" and len(cfg.prompts) == 8000
    test = make_env_config("arithmetic2", split="test")
    assert not set(cfg.prompts) & set(test.prompts)
    assert set(cfg.prompts) | set(test.prompts) == set(task.prompts)
    assert test.prompts[:3] == task.split_prompts("test")[:3]
    # answers, by hand: carries into a third digit, zeros, and the largest sum
    reward = cfg.reward
    assert reward.score(["57+68=", "0+0=", "99+99=", "40+60="], ["125", "0", "198", "100"]) == [1.0] * 4
    assert reward.score(["57+68=", "57+68="], ["115", "1250"]) == [0.0, 0.0]
    assert "57+68=125" in task.corpus or "57+68=" in test.prompts
    assert len(task.corpus) == 8000 and all(c.count("=") == 1 for c in task.corpus)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_split_shares_the_tokenizer_and_the_window(name):
    task = get_task(name)
    configs = {split: make_env_config(name, split=split) for split in SPLITS}
    every = configs["all"]
    for split, cfg in configs.items():
        assert cfg.split == split and cfg.prompts == task.split_prompts(split)
        assert cfg.tokenizer == every.tokenizer
        assert (cfg.max_prompt_tokens, cfg.seq_len) == (every.max_prompt_tokens, every.seq_len)
        assert cfg.prompt_ids == tuple(every.prompt_ids[i] for i in task.split_indices(split))


def test_default_split_keeps_the_older_tasks_prompt_sets():
    for name in ("default", "sentiment", "arithmetic", "keyword"):
        cfg = make_env_config(name)
        assert cfg.split == "all" and cfg.prompts == get_task(name).prompts
    assert len(make_env_config("arithmetic").prompts) == 400
    reviews = make_env_config("reviews")
    assert reviews.split == "train" and reviews.prompts == get_task("reviews").split_prompts("train")


@pytest.mark.parametrize("bad", ["Train", "validation", "", 3, ["test"]])
def test_bad_split_names_the_value_and_what_is_accepted(bad):
    with pytest.raises(
        ValueError,
        match=r"split must be one of 'train', 'test', 'all', or None for the task's default "
        r"\('train' for task 'reviews'\); got ",
    ) as info:
        make_env_config("reviews", split=bad)
    assert repr(bad) in str(info.value)


def test_split_with_prompts_of_ones_own():
    own = ["The soup was", "I thought the bread"]
    assert make_env_config("reviews", prompts=own).split == "all"
    assert make_env_config("reviews", prompts=own, split="all").prompts == tuple(own)
    with pytest.raises(
        ValueError, match=r"split='test' selects among the built-in prompts of task 'reviews'"
    ):
        make_env_config("reviews", prompts=own, split="test")
    with pytest.raises(ValueError, match="split must be one of"):
        make_env_config("reviews", prompts=own, split="dev")


# -------------------------------------------------------------------------------------- reviews
def test_reviews_task_openings():
    task = get_task("reviews")
    # 9 templates x 42 subjects, all distinct
    assert len(task.prompts) == len(corpora.OPENINGS) * 42 == 378 == len(set(task.prompts))
    assert {"The movie was", "I thought the food", "Frankly, the hotel room"} <= set(task.prompts)
    assert "I have used it every day for a month, and the battery life is" in task.prompts
    assert all(p[0].isupper() for p in task.prompts)  # natural case, not the lowercase corpus
    assert sum("," in p for p in task.prompts) == 6 * 42  # the six templates with a comma
    # No opening carries sentiment of its own, for VADER or for the lexicon: the completion decides.
    vader = VaderReward()
    assert vader(list(task.prompts), list(task.prompts)).tolist() == [0.0] * 378
    assert SentimentReward()(list(task.prompts), list(task.prompts)).tolist() == [0.0] * 378
    assert isinstance(task.reward(), VaderReward) and task.reward().text == "completion"


def test_reviews_default_tokenizer_is_byte_level_and_offline():
    cfg = make_env_config("reviews", split="test")
    assert isinstance(cfg.tokenizer, ByteTokenizer) and cfg.tokenizer.vocab_size == 260
    assert cfg.tokenizer.decode(cfg.prompt_ids[0]) == "The movie was"
    assert cfg.max_prompt_tokens == 62 and cfg.max_new_tokens == 24


def test_reviews_corpus_opens_with_the_training_openings_only():
    task = get_task("reviews")
    train = task.split_prompts("train")
    assert task.corpus == tuple(corpora.natural_reviews(4000, seed=0, openings=train))
    assert len(set(task.corpus)) > 3500


def test_natural_reviews_by_hand():
    rng = random.Random(0)
    for opening, verb in [
        ("I thought the headphones", " were "),  # past after "I thought", plural
        ("Frankly, the laptop", " is "),  # the product domain is in the present
        ("Frankly, the bed", " was "),
    ]:
        text = corpora.natural_review(rng, [opening])
        assert text.startswith(opening + verb), text
    texts = corpora.natural_reviews(300, seed=5)
    assert texts == corpora.natural_reviews(300, seed=5) != corpora.natural_reviews(300, seed=6)
    openings = set(corpora.review_openings())
    for text in texts:
        first = text.split(".")[0].split("!")[0]
        assert any(first.startswith(o + " ") for o in openings), text
        assert text.endswith((".", "!")) and text[0].isupper()
    scores = VaderReward()(texts, texts)
    assert (scores > 0.3).sum() > 60 and (scores < -0.3).sum() > 60  # both moods are in the corpus
