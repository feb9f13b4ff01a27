"""Tests of textgym.tasks (built-in tasks, make_env_config, prompts) and textgym.corpora."""

from __future__ import annotations

import math

import pytest

from textgym import corpora
from textgym.rewards import (
    ExactMatchReward,
    FunctionReward,
    KeywordReward,
    LengthReward,
    RewardModel,
    SentimentReward,
)
from textgym.tasks import TASKS, EnvConfig, Task, get_task, load_prompts, make_env_config
from textgym.tokenizers import BOS_ID, UNK_ID, ByteTokenizer, CharTokenizer, WordTokenizer

# task: (tokenizer class, reward class, max_new_tokens, longest prompt in tokens with <bos>)
# Longest prompts, counted by hand:
#   sentiment  "review of the hotel : the breakfast was"  8 words + <bos> = 9
#   arithmetic "10+10="                                    6 chars + <bos> = 7
#   keyword    "once upon a time the fox walked to the"   9 words + <bos> = 10
DEFAULTS = {
    "sentiment": (WordTokenizer, SentimentReward, 8, 9),
    "arithmetic": (CharTokenizer, ExactMatchReward, 4, 7),
    "keyword": (WordTokenizer, KeywordReward, 10, 10),
}


# ------------------------------------------------------------------------------------ get_task
def test_task_registry():
    assert set(TASKS) == {"sentiment", "arithmetic", "keyword"}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_get_task(name):
    task = get_task(name)
    assert isinstance(task, Task)
    assert task.name == name
    assert task.prompts and all(isinstance(p, str) and p for p in task.prompts)
    assert task.corpus and all(isinstance(t, str) for t in task.corpus)
    assert task.tokenizer_kind == ("char" if name == "arithmetic" else "word")
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
        ValueError, match=rf"unknown task {name!r}; built-in tasks: default, sentiment, arithmetic, keyword"
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
    assert cfg.prompts == get_task(name).prompts
    assert len(cfg.prompt_ids) == len(cfg.prompts)
    assert all(ids[0] == BOS_ID for ids in cfg.prompt_ids)
    assert max(len(ids) for ids in cfg.prompt_ids) == longest
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
